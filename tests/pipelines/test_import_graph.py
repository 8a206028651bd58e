"""The training side of ``pipelines/`` imports one way: verb → job core → worker → library.

Every ``import`` in these modules counts, including the ones inside functions (they run
too). A module may import modules of a lower layer only; the library (``instalign``) and the
shared services (tracking, loader, resources, Ray connection) sit at the bottom.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"

#: Higher imports lower, never the reverse (nor sideways within the training side).
LAYERS = {
    "train": 4, "tune": 4,                                      # CLI verbs and their Python entry points
    "flags": 3.5, "tune_report": 3,                             # the verbs' helpers
    "tune_trial": 2.5, "job": 2,                                # the training-job core (Tune's trial wraps it)
    "worker": 1,                                                # one Ray Train worker
    "resume": 0.5,                                              # the worker's resume rules
    "ray_utils": 0,
    "run_inputs": 0.5,                                          # what a training run starts from
    "tune_space": 0, "resources": 0, "loader": 0, "tracking_mlflow": 0, "system_metrics": 0,  # services
}
#: Verbs (and the steps of one) nothing else on the training side may import.
OTHER_VERBS = {"cli", "quickstart", "prepare", "prepare_records", "prepare_shards", "prepare_output", "evaluate",
               "predict", "registry", "bench"}
#: ``instalign prepare``: the verb (driver + CLI) over its steps; the record checks at the bottom.
PREPARE_LAYERS = {"prepare": 2, "prepare_shards": 1, "prepare_output": 1, "prepare_records": 0}


def imported_pipelines_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pipelines":
                found |= {a.name for a in node.names}
            elif node.module.startswith("pipelines."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipelines.")}
    return found


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_point_down(module):
    imports = imported_pipelines_modules(PIPELINES / f"{module}.py") - {module}
    upward = sorted(m for m in imports if m in LAYERS and LAYERS[m] >= LAYERS[module])
    assert not upward, f"pipelines.{module} (layer {LAYERS[module]}) imports {upward}"
    assert not imports & OTHER_VERBS, f"pipelines.{module} imports the verb(s) {sorted(imports & OTHER_VERBS)}"


@pytest.mark.parametrize("module", sorted(PREPARE_LAYERS))
def test_prepare_imports_point_down(module):
    imports = imported_pipelines_modules(PIPELINES / f"{module}.py") - {module}
    sideways = sorted(m for m in imports if m in PREPARE_LAYERS and PREPARE_LAYERS[m] >= PREPARE_LAYERS[module])
    assert not sideways, f"pipelines.{module} (layer {PREPARE_LAYERS[module]}) imports {sideways}"
    assert not imports & (OTHER_VERBS - set(PREPARE_LAYERS)), f"pipelines.{module} imports another verb"


def imported_top_level(path: Path) -> set[str]:
    """Top-level package names a module imports (``from tests.x import y`` -> ``tests``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
    return found


SHIPPED = sorted(p for package in ("pipelines", "instalign") for p in (PIPELINES.parent / package).rglob("*.py"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(PIPELINES.parent)))
def test_shipped_code_never_imports_the_tests(path):
    # Test and CI tooling (the cluster-manifest checker, fixtures, worker hooks) lives in tests/,
    # which the installed package does not contain: an import of it would fail on a cluster node.
    assert "tests" not in imported_top_level(path), f"{path.relative_to(PIPELINES.parent)} imports from tests/"


def test_the_checker_sees_function_level_imports(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from pipelines.training.train import train\n    import pipelines.training.job\n"
                                   "from pipelines import worker\n")
    assert imported_pipelines_modules(tmp_path / "m.py") == {"train", "job", "worker"}
    (tmp_path / "n.py").write_text("def g():\n    from tests.support.cluster_config import check_directory\n")
    assert imported_top_level(tmp_path / "n.py") == {"tests"}
