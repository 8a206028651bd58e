"""No name is used that the module never defines or imports.

Moving code between modules (issue 15's splits) can leave a caller behind that still uses a
helper under its old, now undefined, name; Python only says so when that line runs — for a
served page's endpoint, on a user's request (HTTP 500). pyflakes finds such names statically.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_no_undefined_names_in_shipped_code():
    api = pytest.importorskip("pyflakes.api")
    messages = pytest.importorskip("pyflakes.messages")
    from pyflakes.reporter import Reporter

    class Collect(Reporter):
        def __init__(self) -> None:
            self.found: list[str] = []

        def flake(self, message) -> None:
            if isinstance(message, messages.UndefinedName):
                self.found.append(str(message))

        def unexpectedError(self, filename, msg) -> None:
            self.found.append(f"{filename}: {msg}")

        def syntaxError(self, filename, msg, lineno, offset, text) -> None:
            self.found.append(f"{filename}:{lineno}: {msg}")

    reporter = Collect()
    for package in ("instalign", "pipelines"):
        for path in sorted((REPO / package).rglob("*.py")):
            api.check(path.read_text(), str(path.relative_to(REPO)), reporter)
    assert reporter.found == []
