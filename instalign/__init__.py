"""InstAlign: Instance-Aware Generalized Referring Expression Segmentation (arXiv 2411.15087).

A pure-PyTorch library (no Ray, no MLflow: those live in ``pipelines/``). Importing the
package is instant and side-effect free; the public names below are resolved lazily on
first access (PEP 562), so ``import instalign`` does not pull in torch, timm or
transformers until something needs them::

    from instalign import Predictor
    pred = Predictor.from_checkpoint("runs/best")
    result = pred.predict("kitchen.jpg", "the two mugs on the left")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → defining module
_LAZY = {
    "Config": "instalign.config",
    "load_config": "instalign.config",
    "build_model": "instalign.modeling.builders",
    "build_criterion": "instalign.losses",
    "GRESMetrics": "instalign.metrics",
    "RefZOMMetrics": "instalign.metrics",
    "build_optimizer": "instalign.optim",
    "build_scheduler": "instalign.optim",
    "train_one_epoch": "instalign.engine",
    "evaluate": "instalign.engine",
    "postprocess": "instalign.engine",
    "save_checkpoint": "instalign.checkpoint",
    "load_model": "instalign.checkpoint",
    "load_training_state": "instalign.checkpoint",
    "Predictor": "instalign.predictor",
    "Prediction": "instalign.predictor",
    "overlay": "instalign.visualize",
    "save_overlay": "instalign.visualize",
    "Tracker": "instalign.tracking",
    "NullTracker": "instalign.tracking",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from instalign.checkpoint import load_model, load_training_state, save_checkpoint
    from instalign.config import Config, load_config
    from instalign.engine import evaluate, postprocess, train_one_epoch
    from instalign.losses import build_criterion
    from instalign.metrics import GRESMetrics, RefZOMMetrics
    from instalign.modeling.builders import build_model
    from instalign.optim import build_optimizer, build_scheduler
    from instalign.predictor import Prediction, Predictor
    from instalign.tracking import NullTracker, Tracker
    from instalign.visualize import overlay, save_overlay


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'instalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
