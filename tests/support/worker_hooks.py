"""Worker hooks the training tests install (``train(..., worker_hook=...)``; ``pipelines.training.worker``).

* :class:`SampleLog` — every rank appends its events to ``<dir>/rank<r>.jsonl``: ``start``
  (with the node id), ``resume`` (the checkpoint and the damaged ones skipped), and one line
  per step with the sample ids of the batch the rank trained on: an audit of the data order.
* :class:`CrashOnce` — the last rank dies with ``os._exit`` before a chosen step, once (a
  marker file remembers): what a lost node looks like to Ray, no exception and no cleanup.

The hooks travel to Ray workers pickled *by value* (registered below): the workers'
``sys.path`` holds the repository root, not ``tests/``, so they could not import this module.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SampleLog:
    """Append each rank's events to ``<directory>/rank<r>.jsonl``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = str(directory)

    def __call__(self, event: str, info: dict) -> None:
        rank = info["rank"]
        if event == "start":
            record = {"event": "start", "rank": rank, "world": info["world"], "node_id": info["node_id"]}
        elif event == "resume":
            record = {"event": "resume", "rank": rank, "from": info["checkpoint"], "skipped": info["skipped"]}
        else:
            record = {"epoch": info["epoch"], "step": info["step"], "sample_ids": info["sample_ids"]}
        path = Path(self.directory) / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CrashOnce:
    """Kill the last rank before step ``at_step + 1`` the first time it gets there; then ``then``."""

    def __init__(self, at_step: int, marker: str | Path, then: SampleLog | None = None) -> None:
        self.at_step, self.marker, self.then = at_step, str(marker), then

    def __call__(self, event: str, info: dict) -> None:
        if (event == "step" and info["step"] == self.at_step + 1 and info["rank"] == info["world"] - 1
                and not os.path.exists(self.marker)):
            Path(self.marker).write_text(f"killed rank {info['rank']} before step {info['step']}\n")
            os._exit(1)
        if self.then is not None:
            self.then(event, info)
