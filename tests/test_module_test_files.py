"""Every module of ``instalign/`` and ``pipelines/`` has its own test file at the mirror path.

``pipelines/data/prepare.py`` is tested in ``tests/pipelines/data/test_prepare.py`` (more files
may test it too, e.g. ``test_prepare_security.py``): whoever changes a module knows where its
tests start, and a module nobody tests shows up here, not in production.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Modules without a test file of their own, each with the reason. Only faces and entry
#: points belong here: code with behaviour of its own gets a test file.
ALLOWED_WITHOUT = {
    # The command-line face: it routes verbs to their modules. Its error handling is tested in
    # tests/pipelines/test_cli_errors.py, every verb through it in the verb's own test file.
    "pipelines/cli.py",
}


def modules_without_a_test_file(root: Path) -> list[str]:
    """Modules under ``root``'s ``instalign/`` and ``pipelines/`` (package ``__init__`` faces aside)
    with no ``tests/<same folders>/test_<module>.py``."""
    missing = []
    for package in ("instalign", "pipelines"):
        for module in sorted((root / package).rglob("*.py")):
            relative = module.relative_to(root)
            if module.name == "__init__.py":
                continue
            if not (root / "tests" / relative.parent / f"test_{module.name}").is_file():
                missing.append(relative.as_posix())
    return missing


def test_every_module_has_its_own_test_file():
    missing = [m for m in modules_without_a_test_file(ROOT) if m not in ALLOWED_WITHOUT]
    assert not missing, "modules without tests/<mirror path>/test_<module>.py:\n  " + "\n  ".join(missing)


def test_the_allow_list_holds_only_modules_that_exist_and_lack_a_test_file():
    # An entry for a module that was removed or got its test file is stale: it would hide the next one.
    stale = sorted(ALLOWED_WITHOUT - set(modules_without_a_test_file(ROOT)))
    assert not stale, f"stale allow-list entries: {stale}"


def test_the_lister_finds_a_module_without_a_test_file(tmp_path):
    for path in ("pipelines/__init__.py", "pipelines/data/__init__.py", "pipelines/data/a.py",
                 "pipelines/data/b.py", "tests/pipelines/data/test_a.py", "instalign/c.py", "tests/test_c.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    assert modules_without_a_test_file(tmp_path) == ["instalign/c.py", "pipelines/data/b.py"]
