"""The request guard without Ray: which Host names and which POSTs reach the model.

``test_serve.py`` checks the same rules over HTTP on a deployed application; these run the
guard's ASGI middleware on its own, so every rule is checked in milliseconds.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from pipelines.serving.guard import ALLOWED_HOSTS_ENV, RequestGuard, bound_hosts, host_allowed


def call(path: str, *, method: str = "GET", host: str = "127.0.0.1:8000", content_type: str | None = None):
    """Status and JSON body of one request through the guard, in front of an app that answers 200."""
    headers = [(b"host", host.encode())] + ([(b"content-type", content_type.encode())] if content_type else [])
    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(RequestGuard(app)(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_names_the_server_was_bound_to():
    names = bound_hosts("0.0.0.0", 8000, ("proxy.example",))
    assert names == ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "0.0.0.0:8000", "proxy.example"]
    assert bound_hosts("::1", 9000)[-1] == "[::1]:9000"
    assert host_allowed("LOCALHOST:8000", tuple(names)) and host_allowed("proxy.example:443", tuple(names))
    assert not host_allowed("localhost:8001", tuple(names)) and not host_allowed("rebound.example:8000", tuple(names))
    assert host_allowed("localhost", ("localhost:80",))  # a browser leaves port 80 out
    assert host_allowed("anything", ("*",))


def test_a_foreign_host_is_403_except_on_the_health_routes(monkeypatch):
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "127.0.0.1:8000,proxy.example")
    assert call("/", host="127.0.0.1:8000")[0] == 200
    assert call("/samples", host="proxy.example:8443")[0] == 200
    status, answer = call("/", host="rebound.example:8000")
    assert status == 403 and answer["error_code"] == "FORBIDDEN" and "--allowed-host" in answer["message"]
    assert call("/ping", host="10.0.0.7:8000")[0] == 200 and call("/health/", host="")[0] == 200


@pytest.mark.parametrize("content_type, status", [("application/json", 200), ("application/json; charset=utf-8", 200),
                                                  ("text/plain", 415), (None, 415)])
def test_a_post_must_be_json(monkeypatch, content_type, status):
    monkeypatch.delenv(ALLOWED_HOSTS_ENV, raising=False)  # loopback on any port
    got, answer = call("/invocations", method="POST", host="localhost:1234", content_type=content_type)
    assert got == status
    if status == 415:
        assert answer["error_code"] == "UNSUPPORTED_MEDIA_TYPE" and "application/json" in answer["message"]
