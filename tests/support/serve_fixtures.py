"""Shared set-up of the Ray Serve tests: a tiny model in a temporary registry, served for real.

``register`` logs a tiny random checkpoint (``tests.support.tiny_checkpoint``) as
``models:/NAME@champion`` in a temporary sqlite MLflow store. ``serving`` starts a local Ray
cluster when none is running (token auth kept, as for every cluster here), starts Serve's
HTTP proxy on loopback at a free port and deploys ``pipelines.serving.serve.build_app`` — the same
application ``instalign serve`` deploys — then shuts Serve down.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def png(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    """A small PNG with a red ball and a green box (plain background past 1000 px); ``seed`` tints it."""
    import io

    from PIL import Image, ImageDraw

    img = Image.new(mode, size, 40 if mode == "L" else (40 + seed * 20, 60, 80))
    if max(size) < 1000:
        draw = ImageDraw.Draw(img)
        draw.ellipse([10, 8, 45, 40], fill=(220, 40, 40))
        draw.rectangle([55, 20, 90, 55], fill=(40, 200, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(root: Path, name: str, **biases: float) -> dict[str, Any]:
    from pipelines.models.registry import log_and_register
    from tests.support.mlflow_store import tracking_store
    from tests.support.tiny_checkpoint import make_checkpoint

    checkpoint = make_checkpoint(root / "checkpoint", **biases)
    with tracking_store(root, "serve-test") as uri:
        version = log_and_register(checkpoint, registered_model_name=name, alias="champion")
    return {"checkpoint": checkpoint, "tracking_uri": uri, "model": f"models:/{name}@champion",
            "version": str(version.version)}


@contextmanager
def serving(model: dict[str, Any], **options: Any):
    """Yields the base URL of the application serving ``model`` (from :func:`register`)."""
    import ray
    from ray import serve

    from pipelines.serving.serve import APP_NAME, build_app

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, logging_level="ERROR", log_to_driver=False, include_dashboard=True,
                 dashboard_host="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        options.setdefault("cpus_per_replica", 0.5)
        serve.run(build_app(model["model"], tracking_uri=model["tracking_uri"], **options), name=APP_NAME,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(url: str, body: bytes | dict, *, content_type: str = "application/json", host: str | None = None,
         timeout: float = 120) -> tuple[int, dict]:
    """POST ``body`` (JSON-encoded unless bytes); ``host`` overrides the Host header."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type, **({"Host": host} if host else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"message": text}


def get(url: str, timeout: float = 30, host: str | None = None) -> tuple[int, bytes]:
    """GET ``url``; ``host`` overrides the Host header."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host} if host else {}),
                                    timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
