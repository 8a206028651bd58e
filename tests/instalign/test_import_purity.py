"""DESIGN §6.1: ``instalign/`` never imports ray or mlflow, not even lazily at import time.

Each check runs in a fresh interpreter: the test session itself may already hold Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import instalign

REPO = Path(__file__).resolve().parents[2]

_PROBE = r"""
import importlib, json, sys
import instalign
light = sorted(m for m in ("torch", "timm", "transformers", "ray", "mlflow") if m in sys.modules)
failed = {}
names = NAMES
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # report, do not hide: the test fails on any import error
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps({
    "modules": names,
    "failed": failed,
    "heavy_after_bare_import": light,
    "forbidden": sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow")),
}))
"""


def _module_names() -> list[str]:
    """Every module file under instalign/ (also in folders without ``__init__.py``)."""
    names = []
    for path in sorted((REPO / "instalign").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="module")
def probe() -> dict:
    """One fresh interpreter imports ``instalign``, then every module under it."""
    code = f"NAMES = {_module_names()!r}\n" + _PROBE
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_instalign_module_imports_without_ray_or_mlflow(probe):
    result = probe
    expected = set(_module_names())
    assert set(result["modules"]) == expected
    # The engine-side modules this suite owns must be among them.
    for name in ("instalign.engine", "instalign.optim", "instalign.checkpoint", "instalign.predictor",
                 "instalign.visualize", "instalign.tracking", "instalign.config"):
        assert name in expected
    assert result["failed"] == {}, result["failed"]
    assert result["forbidden"] == [], f"instalign pulled in {result['forbidden']}"


def test_bare_package_import_is_light(probe):
    # `import instalign` only defines lazy names: no torch, no Ray, no MLflow.
    assert probe["heavy_after_bare_import"] == []


def test_lazy_public_names_resolve():
    proc = subprocess.run(
        [sys.executable, "-c", "import instalign, sys; print(instalign.__version__); "
                               "print(instalign.NullTracker.__module__, instalign.load_config.__module__); "
                               "print('ray' in sys.modules, 'mlflow' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, modules, flags = proc.stdout.strip().splitlines()
    assert version == instalign.__version__
    assert modules == "instalign.tracking instalign.config"
    assert flags == "False False"


def test_every_public_name_resolves():
    for name in instalign.__all__:
        assert getattr(instalign, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        instalign.no_such_name  # noqa: B018
