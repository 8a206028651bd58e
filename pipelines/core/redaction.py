"""Credentials never written down: the one redaction rule for logs, manifests and MLflow.

Command lines and storage paths are worth recording (they say how a result was made), but
they can carry secrets: ``s3://KEY:SECRET@bucket/path``, ``https://host/x?token=…``,
``--password hunter2``, ``AWS_SECRET_ACCESS_KEY=…`` — as argv words or already joined. Everything the project records
passes through :func:`redact` first, so a secret typed on a command line never reaches a
``_manifest.json``, an MLflow param or tag, or a log line.

What is hidden: the user-info part of any URI (``scheme://user:pass@host`` keeps
``scheme://***@host``), the values of query parameters whose names look like secrets
(token, key, secret, password, passphrase, signature, credential, auth, sig), ``--flag value``
and ``--flag=value`` pairs whose flag names do, ``NAME=value`` words whose names do, and HTTP
credentials (``Authorization: …`` header values, ``Bearer …`` tokens).

What the user sees goes through the same rule. ``instalign`` (``pipelines.cli.main``) runs
every verb inside :func:`redacted_output`: whatever the verb, MLflow, Ray or Python prints
on ``sys.stdout``/``sys.stderr`` — a ``RegistryError`` quoting the tracking URI, a summary
line, a log record, a ``--debug`` traceback — is redacted as it is written, so no print
site can forget. Files a verb writes for the user (batch ``predict``'s ``summary.json``) go
through :func:`write_json`.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

MASK = "***"

#: ``token`` and ``auth`` as words, not as the start of ``max_tokens``, ``tokenizer`` or ``author``
#: (counts and paths every verb prints).
_SECRET_WORD = r"(?:token(?![a-z])|secret|passw(?:or)?d|passphrase|pwd|api[_-]?key|access[_-]?key|private[_-]?key|" \
               r"credential|auth(?!or)|signature|sig|session[_-]?key|client[_-]?secret|sas)"
_NAME = r"[A-Za-z0-9_.\-]"
#: A name that looks like a secret: one holding a :data:`_SECRET_WORD`, or ``key`` alone or
#: as its last part (``key``, ``ssh-key``, ``signing_key``; not ``keyboard`` nor ``monkey``).
_SECRET_NAME = rf"(?:{_NAME}*{_SECRET_WORD}{_NAME}*|(?:{_NAME}*[_.\-])?key(?!{_NAME}))"
#: ``scheme://user[:pass]@`` — the whole user-info is a credential (S3, HTTP basic, DB URIs).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
#: ``?token=…`` / ``&X-Amz-Signature=…`` / ``?key=…`` in a URL query.
_QUERY = re.compile(rf"(?P<key>[?&;](?:[^=&\s#]*{_SECRET_WORD}[^=&\s#]*|(?:[^=&\s#]*[_.\-])?key)=)"
                    rf"(?P<value>[^&\s#]*)", re.IGNORECASE)
#: ``NAME=value`` where NAME looks like a secret (``AWS_SECRET_ACCESS_KEY=…``, ``--token=…``).
_ASSIGN = re.compile(rf"(?P<key>(?:^|(?<=[\s'\"]))(?:--?)?{_SECRET_NAME}=)"
                     rf"(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)", re.IGNORECASE)
_FLAG = re.compile(rf"^--?{_SECRET_NAME}$", re.IGNORECASE)
#: ``--token VALUE`` inside an already joined command line: the word after a secret-looking flag.
_FLAG_VALUE = re.compile(rf"(?P<key>(?:^|(?<=\s))--?{_SECRET_NAME})(?P<space>\s+)"
                         rf"(?!-)(?P<value>(?:'[^']*'|\"[^\"]*\"|\S+))", re.IGNORECASE)
#: ``Bearer abc.def`` — an HTTP bearer token wherever it is quoted (case as HTTP writes it).
_BEARER = re.compile(r"(?P<key>\bBearer\s+)(?P<value>[A-Za-z0-9\-._~+/]+=*)")
#: ``Authorization: Basic …`` / ``'Authorization': '…'`` — a header's value, its scheme kept.
_AUTH_HEADER = re.compile(r"(?P<key>\b(?:Proxy-)?Authorization['\"]?\s*[:=]\s*['\"]?"
                          r"(?:(?:Bearer|Basic|Digest|Token|Negotiate)\s+)?)(?P<value>[^\s'\",;]+)", re.IGNORECASE)

def redact(text: str) -> str:
    """``text`` with every credential replaced by ``***`` (see the module docstring)."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['key']}{MASK}", text)
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


def redact_data(data: Any) -> Any:
    """``data`` (JSON-like: dicts, lists, scalars) with every string redacted, keys included."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, Mapping):
        return {redact(k) if isinstance(k, str) else k: redact_data(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_data(v) for v in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, redacted: for files a verb leaves the user (summaries)."""
    Path(path).write_text(json.dumps(redact_data(data), indent=2))


class RedactedStream:
    """A text stream that redacts what is written to it before passing it on.

    Everything else (``isatty``, ``fileno``, ``encoding``, ``flush`` …) is the wrapped
    stream's, so Ray's and the progress bars' checks see the terminal as it is. Each write is
    redacted on its own: ``print`` writes each argument whole, a log handler its whole record.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _redacting_excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """``sys.excepthook`` that prints the traceback redacted (a bug, or ``--debug``)."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))


@contextmanager
def redacted_output() -> Iterator[None]:
    """Redact everything printed on ``sys.stdout`` and ``sys.stderr`` while the block runs.

    Also installs a redacting ``sys.excepthook`` (left in place): an exception that ends the
    process is printed after the block has exited.
    """
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if isinstance(s, RedactedStream) else RedactedStream(s) for s in saved)
    sys.excepthook = _redacting_excepthook
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


__all__ = ["redact", "redact_argv", "redact_data", "command_line", "write_json", "redacted_output", "RedactedStream",
           "MASK"]
