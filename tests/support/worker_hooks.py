"""Worker observers the training tests install in Ray Train workers (``pipelines.training.observers``).

* :class:`SampleLog` — every rank appends its events to ``<dir>/rank<r>.jsonl``: ``start``
  (with the node id), ``resume`` (the checkpoint and the damaged ones skipped), and one line
  per step with the sample ids of the batch the rank trained on: an audit of the data order.
* :class:`CrashOnce` — the last rank dies with ``os._exit`` before a chosen step, once (a
  marker file remembers): what a lost node looks like to Ray, no exception and no cleanup.

Installed around a run with :func:`observing`, which names this file, :func:`from_json` and the
observer's settings in ``INSTALIGN_WORKER_OBSERVER``; the training job forwards that variable
to its workers, and each worker loads this file by its path (a worker cannot import ``tests``).
Production code holds no test switch: only that variable, which no production setting sets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from pipelines.training.observers import OBSERVER_ENV, Observer, Place


class SampleLog(Observer):
    """Append each rank's events to ``<directory>/rank<r>.jsonl``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = str(directory)
        self.rank: Optional[int] = None

    def settings(self) -> dict[str, Any]:
        return {"sample_log": self.directory}

    def started(self, place: Place) -> None:
        self.rank = place.rank
        self._write({"event": "start", "rank": place.rank, "world": place.world, "node_id": place.node_ids[place.rank]})

    def resumed(self, checkpoint: str, skipped: Sequence[tuple[str, str]]) -> None:
        self._write({"event": "resume", "rank": self.rank, "from": checkpoint, "skipped": [n for n, _ in skipped]})

    def batch(self, epoch: int, step: int, sample_ids: Sequence[str]) -> None:
        self._write({"epoch": epoch, "step": step, "sample_ids": list(sample_ids)})

    def _write(self, record: dict[str, Any]) -> None:
        path = Path(self.directory) / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CrashOnce(Observer):
    """Kill the last rank before step ``at_step + 1`` the first time it gets there; ``then`` sees the rest."""

    def __init__(self, at_step: int, marker: str | Path, then: Optional[SampleLog] = None) -> None:
        self.at_step, self.marker, self.then = at_step, str(marker), then
        self.place: Optional[Place] = None

    def settings(self) -> dict[str, Any]:
        return {"crash_once": {"at_step": self.at_step, "marker": self.marker,
                               "then": self.then.settings() if self.then else None}}

    def started(self, place: Place) -> None:
        self.place = place
        if self.then is not None:
            self.then.started(place)

    def resumed(self, checkpoint: str, skipped: Sequence[tuple[str, str]]) -> None:
        if self.then is not None:
            self.then.resumed(checkpoint, skipped)

    def batch(self, epoch: int, step: int, sample_ids: Sequence[str]) -> None:
        if (step == self.at_step + 1 and self.place.rank == self.place.world - 1
                and not os.path.exists(self.marker)):
            Path(self.marker).write_text(f"killed rank {self.place.rank} before step {step}\n")
            os._exit(1)
        if self.then is not None:
            self.then.batch(epoch, step, sample_ids)


def from_json(text: str) -> Observer:
    """The observer :meth:`settings` described (what a worker builds from ``INSTALIGN_WORKER_OBSERVER``)."""
    return _build(json.loads(text))


def _build(settings: dict[str, Any]) -> Observer:
    if "sample_log" in settings:
        return SampleLog(settings["sample_log"])
    crash = settings["crash_once"]
    return CrashOnce(crash["at_step"], crash["marker"], then=_build(crash["then"]) if crash["then"] else None)


@contextmanager
def observing(observer: SampleLog | CrashOnce) -> Iterator[str]:
    """Every Train worker of the jobs started inside the block runs ``observer`` (a copy built from
    its settings); yields the variable's value."""
    value = f"{os.path.abspath(__file__)}:from_json:{json.dumps(observer.settings())}"
    before = os.environ.get(OBSERVER_ENV)
    os.environ[OBSERVER_ENV] = value
    try:
        yield value
    finally:
        if before is None:
            os.environ.pop(OBSERVER_ENV, None)
        else:
            os.environ[OBSERVER_ENV] = before
