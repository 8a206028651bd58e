"""Credentials never written down: the one redaction rule for logs, manifests and MLflow.

Command lines and storage paths are worth recording (they say how a result was made), but
they can carry secrets: ``s3://KEY:SECRET@bucket/path``, ``https://host/x?token=…``,
``--password hunter2``, ``AWS_SECRET_ACCESS_KEY=…`` — as argv words or already joined. Everything the project records
passes through :func:`redact` first, so a secret typed on a command line never reaches a
``_manifest.json``, an MLflow param or tag, or a log line.

What is hidden: the user-info part of any URI (``scheme://user:pass@host`` keeps
``scheme://***@host``), the values of query parameters whose names look like secrets
(token, key, secret, password, signature, credential, auth, sig), ``--flag value`` and
``--flag=value`` pairs whose flag names do, and ``NAME=value`` words whose names do.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

MASK = "***"

_SECRET_WORD = r"(?:token|secret|passw(?:or)?d|pwd|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth|" \
               r"signature|sig|session[_-]?key|client[_-]?secret|sas)"
#: ``scheme://user[:pass]@`` — the whole user-info is a credential (S3, HTTP basic, DB URIs).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
#: ``?token=…`` / ``&X-Amz-Signature=…`` in a URL query.
_QUERY = re.compile(rf"(?P<key>[?&;][^=&\s#]*{_SECRET_WORD}[^=&\s#]*=)(?P<value>[^&\s#]*)", re.IGNORECASE)
#: ``NAME=value`` where NAME looks like a secret (``AWS_SECRET_ACCESS_KEY=…``, ``--token=…``).
_ASSIGN = re.compile(rf"(?P<key>(?:^|(?<=[\s'\"]))(?:--?)?[A-Za-z0-9_.\-]*{_SECRET_WORD}[A-Za-z0-9_.\-]*=)"
                     rf"(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)", re.IGNORECASE)
_FLAG = re.compile(rf"^--?[A-Za-z0-9_.\-]*{_SECRET_WORD}[A-Za-z0-9_.\-]*$", re.IGNORECASE)
#: ``--token VALUE`` inside an already joined command line: the word after a secret-looking flag.
_FLAG_VALUE = re.compile(rf"(?P<key>(?:^|(?<=\s))--?[A-Za-z0-9_.\-]*{_SECRET_WORD}[A-Za-z0-9_.\-]*)(?P<space>\s+)"
                         rf"(?!-)(?P<value>(?:'[^']*'|\"[^\"]*\"|\S+))", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``***`` (see the module docstring)."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _FLAG_VALUE.sub(lambda m: f"{m['key']}{m['space']}{MASK}", text)
    return _ASSIGN.sub(lambda m: f"{m['key']}{MASK}", text)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line's words redacted; the word after a secret-looking ``--flag`` is hidden too."""
    out: list[str] = []
    hide_next = False
    for word in argv:
        word = str(word)
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        if "=" not in word and _FLAG.match(word):
            hide_next = True
            out.append(word)
            continue
        out.append(redact(word))
    return out


def command_line(argv: Iterable[str]) -> str:
    """A shell-quoted, redacted command line for manifests, run tags and logs."""
    return " ".join(shlex.quote(w) for w in redact_argv(argv))


__all__ = ["redact", "redact_argv", "command_line", "MASK"]
