"""What the library needs from an experiment tracker (``instalign.tracking``): the protocol, the
tracker that records nothing, and the metrics every backend accepts. The MLflow tracker is in
``tests/pipelines/core/test_tracking.py``."""

from __future__ import annotations

import numpy as np
import torch

from instalign.tracking import NullTracker, Tracker, finite_metrics


def test_only_finite_scalars_are_kept_as_floats():
    got = finite_metrics({"loss": torch.tensor(0.5), "np": np.float32(2.0), "int": 3, "nan": float("nan"),
                          "inf": float("inf"), "flag": True, "text": "x", "vector": torch.ones(2),
                          "nan_tensor": torch.tensor(float("nan"))})
    assert got == {"loss": 0.5, "np": 2.0, "int": 3.0}
    assert all(type(v) is float for v in got.values())


def test_the_null_tracker_is_a_tracker_and_a_context_manager():
    with NullTracker() as tracker:
        assert isinstance(tracker, Tracker)
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert not isinstance(object(), Tracker)
