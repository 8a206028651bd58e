"""``pipelines/`` imports one way: stage packages in order, ``cli`` and ``quickstart`` on top.

Every ``import`` counts, including the ones inside functions (they run too). The allowed
imports are not written here: each stage package's ``__init__`` docstring states them in a
line ``May import: ...`` and this test reads that line, so the docs and the rule cannot drift.

Also held here: no import circles among ``pipelines`` modules, no ``_private`` name imported
from another module, ``instalign`` never imports ``pipelines``, and nothing shipped imports
``tests``.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines"
#: The stage packages, in the order a model lives through them (``pipelines/__init__``).
STAGES = ("core", "data", "models", "training", "tuning", "evaluation", "inference", "serving", "bench")
#: The modules above the stages. Nothing imports them; ``cli`` reaches the verbs by name.
TOP = ("cli", "quickstart")


def module_name(path: Path, root: Path = ROOT) -> str:
    """``pipelines/data/prepare.py`` -> ``pipelines.data.prepare``; a package's ``__init__`` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def shipped_modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = shipped_modules("pipelines") | shipped_modules("instalign")


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, str | None]]:
    """Every import in a module as ``(module, name)``: ``name`` is what ``from module import name`` takes,
    ``None`` for ``import module``. Relative imports are resolved against the module's package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(module, a.name) for a in node.names]
    return found


def project_modules(pairs: list[tuple[str, str | None]]) -> set[str]:
    """The project modules (``pipelines.*``, ``instalign.*``) among ``imports``' pairs; ``from p import m``
    where ``p.m`` is a module counts as ``p.m``."""
    found = set()
    for module, name in pairs:
        if name is not None and f"{module}.{name}" in MODULES:
            found.add(f"{module}.{name}")
        elif module in MODULES:
            found.add(module)
    return found


@cache
def imported_modules(path: Path) -> frozenset[str]:
    return frozenset(project_modules(imports(path)) - {module_name(path)})


def package_of(module: str) -> str:
    """``pipelines.data.prepare`` -> ``data``; ``pipelines.cli`` -> ``cli``; ``pipelines`` -> ``pipelines``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def may_import(stage: str) -> set[str]:
    """The stages ``pipelines/<stage>/__init__.py`` says it may import (its ``May import:`` paragraph)."""
    doc = ast.get_docstring(ast.parse((PIPELINES / stage / "__init__.py").read_text())) or ""
    paragraph = re.search(r"^May import:(.*?)(?:\n\s*\n|\Z)", doc, re.M | re.S)
    assert paragraph, f"pipelines/{stage}/__init__.py has no 'May import: ...' line"
    if "any stage" in paragraph.group(1):
        return set(STAGES) - {stage}
    named = set(re.findall(r"``pipelines\.(\w+)``", paragraph.group(1)))
    assert named <= set(STAGES), f"pipelines/{stage} may import unknown packages {sorted(named - set(STAGES))}"
    return named


#: The rule, as data: stage -> the stages it may import (read from the ``__init__`` docstrings).
ALLOWED = {stage: may_import(stage) for stage in STAGES}


def test_the_rule_read_from_the_docstrings_is_the_designed_one():
    # The docstrings are the source; this pins them, so a loosened line is a visible change here too.
    assert ALLOWED == {
        "core": set(),
        "data": {"core"},
        "models": {"core"},
        "training": {"core", "data", "models"},
        "tuning": {"core", "data", "models", "training"},
        "evaluation": {"core", "data", "models"},
        "inference": {"core", "data", "models"},
        "serving": {"core", "models"},
        "bench": set(STAGES) - {"bench"},
    }


def test_only_cli_and_quickstart_sit_above_the_stages():
    # A new folder is a new stage (its __init__ says what it may import, and STAGES places it);
    # a new module at the top would be a third entry point.
    top = {p.stem for p in PIPELINES.glob("*.py") if p.name != "__init__.py"}
    folders = {p.name for p in PIPELINES.iterdir() if (p / "__init__.py").is_file()}
    assert (top, folders) == (set(TOP), set(STAGES))


def test_no_stage_may_import_bench_or_the_top():
    assert not any("bench" in allowed or set(TOP) & allowed for allowed in ALLOWED.values())


PIPELINES_MODULES = sorted(m for m in MODULES if m.startswith("pipelines"))


@pytest.mark.parametrize("module", PIPELINES_MODULES)
def test_imports_follow_the_stage_order(module):
    stage = package_of(module)
    imported = {package_of(m) for m in imported_modules(MODULES[module]) if m.startswith("pipelines.")}
    if stage in TOP:
        forbidden = imported & set(TOP)
    elif stage == "pipelines":  # the package face: a docstring
        forbidden = imported
    else:
        forbidden = imported - ALLOWED[stage] - {stage}
    assert not forbidden, f"{module} imports {sorted(forbidden)}; pipelines/{stage} may import {sorted(ALLOWED.get(stage, ()))}"


def test_cli_verbs_name_modules_that_exist_and_have_add_arguments_and_run():
    tree = ast.parse((PIPELINES / "cli.py").read_text())
    verbs = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "VERBS")
    assert verbs, "pipelines/cli.py has no VERBS table"
    for verb, (module, _help) in verbs.items():
        assert module in MODULES, f"verb {verb!r}: no module {module}"
        defined = {node.name for node in ast.parse(MODULES[module].read_text()).body
                   if isinstance(node, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= defined, f"verb {verb!r}: {module} lacks {sorted({'add_arguments', 'run'} - defined)}"


def import_graph() -> dict[str, set[str]]:
    return {m: {i for i in imported_modules(MODULES[m]) if i.startswith("pipelines")} for m in PIPELINES_MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles_among_pipelines_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_is_imported_from_another_module(module):
    # A leading underscore says "only this module uses it"; another module that needs it
    # needs a public name (or the thing moved to where both use it).
    private = sorted(f"{source}.{name}" for source, name in imports(MODULES[module])
                     if name and name.startswith("_") and not name.startswith("__")
                     and source.split(".")[0] in {"pipelines", "instalign"})
    assert not private, f"{module} imports private names {private}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("instalign")))
def test_the_library_never_imports_pipelines(module):
    assert not {m for m in imported_modules(MODULES[module]) if m.startswith("pipelines")} and not any(
        source.split(".")[0] == "pipelines" for source, _ in imports(MODULES[module])), f"{module} imports pipelines"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_shipped_code_never_imports_the_tests(module):
    # Test and CI tooling (the cluster-manifest checker, fixtures, worker hooks) lives in tests/,
    # which the installed package does not contain: an import of it would fail on a cluster node.
    assert not any(source.split(".")[0] == "tests" for source, _ in imports(MODULES[module])), f"{module} imports from tests/"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "pipelines" / "serving" / "m.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from pipelines.training.train import train\n    import pipelines.training.job\n"
                      "    from pipelines.core import flags\n    from .invocation import _parse\n"
                      "    from tests.support.cluster_config import check_directory\n")
    found = imports(source, root=tmp_path)
    assert found == [("pipelines.training.train", "train"), ("pipelines.training.job", None),
                     ("pipelines.core", "flags"), ("pipelines.serving.invocation", "_parse"),
                     ("tests.support.cluster_config", "check_directory")]
    assert project_modules(found) == {"pipelines.training.train", "pipelines.training.job", "pipelines.core.flags",
                                      "pipelines.serving.invocation"}
