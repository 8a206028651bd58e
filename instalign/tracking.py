"""Experiment tracking behind a small Protocol (DESIGN §6.9).

The training loop and the evaluation code talk to a ``Tracker``; they never import a
tracking backend. The MLflow implementation lives in ``pipelines/core/tracking.py``
(``instalign/`` must not import mlflow, not even lazily) and is active on rank 0 only;
every other rank — and every test, and the laptop quickstart without a store — gets the
``NullTracker``, so call sites carry no ``if tracking:`` branches (torchtune's
``MetricLoggerInterface``, nanochat's ``DummyWandb``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Protocol, Union, runtime_checkable

__all__ = ["Tracker", "NullTracker", "finite_metrics"]


@runtime_checkable
class Tracker(Protocol):
    """What the library needs from an experiment tracker."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record run parameters once (``Config.flat()``: dotted keys → values)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at a global optimizer step."""

    def log_artifact(self, path: Union[str, Path], artifact_path: Optional[str] = None) -> None:
        """Attach a local file or directory to the run, optionally under ``artifact_path``."""

    def log_image(self, image: Any, name: str) -> None:
        """Attach a PIL image (an overlay) under ``name`` (e.g. ``overlays/epoch_3/0.png``)."""

    def close(self) -> None:
        """Flush and end the run; further calls are errors for real backends."""


class NullTracker:
    """A tracker that records nothing: the default off rank 0 and in tests."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Union[str, Path], artifact_path: Optional[str] = None) -> None:
        pass

    def log_image(self, image: Any, name: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalars only, as floats; non-finite values dropped (backends reject NaN differently).

    Why: a metric such as N-acc is undefined (NaN) on a split without no-target samples;
    logging it would fail in one backend and plot garbage in another.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
                value = value.item()
            else:
                continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out
