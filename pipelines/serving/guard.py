"""Which requests reach ``instalign serve``'s model: the ``Host`` check and JSON-only POSTs.

Every request passes :class:`RequestGuard` before any route runs: a ``Host`` header that is
not one of the names the server was bound to (loopback and ``--host``, with ``--port``, plus
``--allowed-host``: :func:`bound_hosts`) is a 403, so a web page reaching the loopback server
through DNS rebinding gets nothing; a POST that is not ``Content-Type: application/json`` is
a 415, so no other site's page can send one without the CORS preflight this server never
grants. The health routes answer whatever the Host: probes call them by address.

The names travel to the replicas in ``INSTALIGN_SERVE_ALLOWED_HOSTS`` (:func:`allowed_hosts`
reads it there). :func:`error_response` is the one error body of the server, refusals here
included: MLflow's ``{"error_code", "message"}``, redacted.
"""

from __future__ import annotations

import os
from typing import Optional

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from pipelines.core.redaction import redact

__all__ = ["ALLOWED_HOSTS_ENV", "LOOPBACK_HOSTS", "HEALTH_ROUTES", "error_response", "allowed_hosts", "host_allowed",
           "bound_hosts", "request_refusal", "RequestGuard"]

#: The names the application answers to, comma-separated (``--allowed-host``): ``NAME`` on any
#: port or ``NAME:PORT``; ``*`` turns the check off (a proxy in front checks Host itself).
ALLOWED_HOSTS_ENV = "INSTALIGN_SERVE_ALLOWED_HOSTS"
#: Loopback, the default when nothing is set (any port).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: Routes answered whatever the Host (probes call them by address; they reveal nothing).
HEALTH_ROUTES = ("/ping", "/health")


def error_response(status: int, message: str, error_code: str) -> JSONResponse:
    """An error as MLflow's scoring server answers it. Redacted: an exception's message may
    quote a tracking URI or an image URI with credentials in it."""
    return JSONResponse({"error_code": error_code, "message": redact(message)}, status_code=status)


def _split_host(value: str) -> tuple[str, Optional[str]]:
    """``host[:port]`` (``[v6]:port`` too) → (lower-case host, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value.partition("]")
        return host + "]", rest[1:] if rest.startswith(":") else None
    if value.count(":") > 1:  # a bare IPv6 address, as --host takes it
        return f"[{value}]", None
    host, sep, port = value.partition(":")
    return host, port if sep else None


def allowed_hosts(environ: Optional[dict] = None) -> tuple[str, ...]:
    """The Host names this process answers to: ``INSTALIGN_SERVE_ALLOWED_HOSTS``, else loopback."""
    value = (os.environ if environ is None else environ).get(ALLOWED_HOSTS_ENV, "")
    return tuple(h.strip() for h in value.split(",") if h.strip()) or LOOPBACK_HOSTS


def host_allowed(header: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request's ``Host`` header names this server. Checked so that DNS rebinding (a
    page whose own name resolves to 127.0.0.1 calling this server) finds no answer."""
    if "*" in allowed:
        return True
    host, port = _split_host(header)
    port = port or "80"  # a browser leaves HTTP's default port out
    for entry in allowed:
        want_host, want_port = _split_host(entry)
        if host == want_host and want_port in (None, port):
            return True
    return False


def bound_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``Host`` names a server bound to ``host:port`` answers to: loopback and ``host``,
    each with the port, then ``extra`` (``--allowed-host``) as given."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = [f"{name}:{port}" for name in dict.fromkeys((*LOOPBACK_HOSTS, shown.lower()))]
    return names + [h.strip() for h in extra if h.strip()]


def request_refusal(scope: dict) -> Optional[JSONResponse]:
    """Why a request is refused before any route runs, or None.

    * a ``Host`` this server does not answer to (:func:`host_allowed`) → 403, except the
      health routes;
    * a POST whose ``Content-Type`` is not ``application/json`` → 415: a page on another
      site can send a "simple" cross-site POST (``text/plain``, forms) to a server on the
      user's loopback without asking; ``application/json`` needs the browser's CORS
      preflight, which this server never grants.
    """
    headers = Headers(scope=scope)
    if not scope.get("path", "").rstrip("/").endswith(HEALTH_ROUTES):
        host, allowed = headers.get("host", ""), allowed_hosts()
        if not host_allowed(host, allowed):
            return error_response(403, f"this server does not answer to Host {host[:100]!r} (allowed: "
                                       f"{', '.join(allowed)}); add the name with instalign serve --allowed-host "
                                       f"({ALLOWED_HOSTS_ENV})", "FORBIDDEN")
    if scope.get("method") == "POST":
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return error_response(415, f"Content-Type must be application/json, got {content_type[:100] or 'none'!r}",
                                  "UNSUPPORTED_MEDIA_TYPE")
    return None


class RequestGuard:
    """ASGI middleware: :func:`request_refusal` before the application sees the request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        refusal = request_refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)
