"""``instalign serve``: a registered model as a Ray Serve application, with a page for people.

One deployment, :class:`InstAlignService`, whose replicas each hold a ``Predictor`` (GPU
when one is assigned) behind a FastAPI ingress:

* ``POST /invocations`` — the MLflow pyfunc's contract (``pipelines.models.pyfunc``), so a client
  written against ``mlflow models serve`` works unchanged: ``{"dataframe_records": [...]}``
  or ``{"dataframe_split": {"columns": [...], "data": [...]}}`` with ``text`` and ``image``
  (base64 of the encoded bytes) or ``image_path``; the answer is ``{"predictions": [...]}``
  in ``prediction_to_record``'s format. Refusals are the pyfunc's own, raised by the same
  code (``pyfunc.predict_records``: rows, payload bytes and decoded pixels per request,
  texts, image headers; ``pipelines.models.limits.ServingLimits`` from the ``INSTALIGN_SERVING_*``
  environment) and answered as MLflow answers them — ``{"error_code", "message"}`` with 400,
  413 or 503 — never with a stack trace. Unlike MLflow's scoring server, the raw body is
  bounded too (``pipelines.serving.invocation.max_body_bytes``: the payload limit in base64 plus JSON
  slack) and read no further once over it.
* ``GET /ping`` and ``GET /health`` — 200 once the replica has loaded the model.
* ``GET /`` — the page (``pipelines/serving/web``): pick a bundled sample or upload an image, type an
  expression, see the overlay that ``instalign predict --out`` draws
  (``instalign.visualize.overlay``), the verdict and the raw JSON; it posts to
  ``POST /explain`` (one image, one expression → the record and the overlay PNG:
  ``pipelines.serving.explain``).

Dynamic batching (``@serve.batch``): a request is checked and decoded in a worker thread by
``predict_records``; its rows then join the replica's batch queue, where rows of concurrent
requests are run through the model together (up to ``max_batch_size`` rows, waiting at most
``batch_wait_timeout_s`` for a batch to fill: :data:`DEFAULT_BATCH_WAIT_S`). The serving gate (``PredictionGate``) lets as
many requests decode at once as a batch has rows, so decoded images in memory stay bounded
by ``max_batch_size`` requests of at most ``pyfunc._CHUNK`` rows each.

Devices: each replica asks Ray for ``--gpus-per-replica`` GPUs — by default one when the
cluster has GPUs, none otherwise (:func:`resolve_gpus_per_replica`) — and puts its model on
CUDA exactly when Ray assigned it a GPU (:func:`replica_device`).

Where it listens: ``serve.start(http_options={"host", "port"})`` — loopback unless
``--host`` says otherwise. The page and ``/invocations`` have no authentication: put a proxy
that authenticates in front before binding a public interface. Every request passes
``pipelines.serving.guard.RequestGuard`` first: a ``Host`` the server was not bound to is a
403 (DNS rebinding), a POST that is not ``application/json`` a 415 (no cross-site posts
without a CORS preflight). Bodies are read with bounds
(``pipelines.serving.invocation.read_json``: rows counted while parsing) in a worker thread. On Kubernetes,
``cluster/kuberay/rayservice.yaml`` deploys :func:`app_builder` from a Serve config.
"""


import argparse
import asyncio
import base64
import functools
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from mlflow.exceptions import MlflowException
from ray import serve

from instalign.checkpoint import checkpoint_files
from instalign.predictor import Predictor
from pipelines.core import flags
from pipelines.core.ray_cluster import init_ray
from pipelines.core.resources import cluster_totals, resolve_gpus_per_worker
from pipelines.models.limits import ENV, PredictionGate, ServingLimits
from pipelines.models.pyfunc import predict_records
from pipelines.models.source import configure_tracking, is_model_uri, resolve_checkpoint
from pipelines.serving.explain import explain_record, overlay_colours
from pipelines.serving.guard import ALLOWED_HOSTS_ENV, RequestGuard, bound_hosts, error_response
from pipelines.serving.invocation import RequestError, max_body_bytes, parse_invocation

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
#: Files of the page served under ``/static`` (a fixed list: nothing else under WEB_DIR is reachable).
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
APP_NAME = "instalign"
#: Rows per model call across concurrent requests.
DEFAULT_MAX_BATCH_SIZE = 8
#: How long a batch waits to fill (``--batch-wait-ms``). Every lone request pays it in full,
#: while requests that arrive together join a batch within a fraction of it: 2 ms is a small
#: share of the < 30 ms a single request is meant to take on a GPU (issue 28), where the
#: 10 ms used before was a third of it.
DEFAULT_BATCH_WAIT_S = 0.002

api = FastAPI(title="InstAlign", docs_url=None, redoc_url=None, openapi_url=None)
api.add_middleware(RequestGuard)


def _pyfunc_error(e) -> JSONResponse:
    """A pyfunc refusal (an ``MlflowException``) answered as MLflow's scoring server does."""
    return error_response(e.get_http_status_code(), e.message, e.error_code)


@dataclass
class _Stats:
    """What this replica's batch queue did (``GET /stats``): batches run and rows per batch."""

    batches: int = 0
    rows: int = 0
    largest: int = 0

    def add(self, n: int) -> None:
        self.batches, self.rows, self.largest = self.batches + 1, self.rows + n, max(self.largest, n)


def replica_device(gpu_ids: list, cuda_available: bool) -> str:
    """``"cuda"`` when Ray assigned this replica a GPU (``ray.get_gpu_ids()``) and torch can use
    it, else ``"cpu"``.

    Asked of Ray rather than of torch alone: a replica without ``num_gpus`` on a GPU node may
    still see the node's GPUs, and would then share one with the replicas that reserved it.
    A GPU that torch cannot use (a CPU build of torch) is said in the log, not hidden. Defined
    above :class:`InstAlignService`: Serve pickles that class as it is decorated, with only the
    module's names defined by then.
    """
    if not gpu_ids:
        return "cpu"
    if not cuda_available:
        log.warning("Ray assigned this replica GPU %s but torch sees no CUDA device: the model runs on CPU",
                    ",".join(map(str, gpu_ids)))
        return "cpu"
    return "cuda"


class _QueuedModel:
    """What ``pyfunc.predict_records`` sees as the predictor: the real transform (for the text
    checks) and a ``predict_batch`` that queues each row on the replica's event loop, where
    ``@serve.batch`` runs rows of concurrent requests through the model together."""

    def __init__(self, service: "InstAlignService", loop: asyncio.AbstractEventLoop) -> None:
        self.transform = service.predictor.transform
        self._service, self._loop = service, loop

    def predict_batch(self, pictures, texts, batch_size: int = 16):
        futures = [asyncio.run_coroutine_threadsafe(self._service.predict_row((p, t)), self._loop)
                   for p, t in zip(pictures, texts)]
        return [f.result() for f in futures]


#: How often a replica told to stop looks for requests still in flight (Serve's
#: ``graceful_shutdown_wait_loop_s``). Serve waits one such period before its first look, so
#: with its default of 2 s an idle replica took 2 s to stop and Ctrl-C as much longer. Requests
#: in flight are still drained, for up to Serve's ``graceful_shutdown_timeout_s`` (20 s).
SHUTDOWN_CHECK_S = 0.1


@serve.deployment(name="InstAlign", max_ongoing_requests=32, graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S)
@serve.ingress(api)
class InstAlignService:
    """One replica: the model, the serving limits, the batch queue.

    Args:
        model: checkpoint directory or ``models:/NAME@ALIAS`` (resolved on the replica's node
            through the registry cache: ``pipelines.models.registry.resolve_checkpoint``).
        tracking_uri: MLflow tracking URI for a ``models:/`` model.
        max_batch_size: rows per model call across concurrent requests.
        batch_wait_timeout_s: how long a batch waits to fill.
        top_words: words reported per instance.
    """

    def __init__(self, model: str, tracking_uri: Optional[str] = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S, top_words: int = 3) -> None:
        import ray

        if is_model_uri(model):
            configure_tracking(tracking_uri)
        checkpoint = resolve_checkpoint(model)
        device = replica_device(ray.get_gpu_ids(), torch.cuda.is_available())
        self.predictor = Predictor.from_checkpoint(checkpoint, device=device, top_words=top_words)
        self.model = model
        self.limits = ServingLimits.load()
        slots = max(self.limits.max_concurrent, max_batch_size)
        self.gate = PredictionGate(slots, self.limits.queue_timeout_s)
        # Two pools, never asyncio's default one: request threads block until their rows come
        # back from the batch queue, so the model must not need a thread from the same pool
        # (with the default pool's min(32, CPUs + 4) threads that deadlocks under load).
        self._requests = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="instalign-request")
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instalign-model")
        self.max_body = max_body_bytes(self.limits.max_request_bytes)
        self.predict_row.set_max_batch_size(max_batch_size)
        self.predict_row.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.stats = _Stats()
        self.batching = {"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_timeout_s * 1000.0,
                         "device": device}
        self.samples = json.loads((WEB_DIR / "samples" / "samples.json").read_text())["samples"]
        log.info("InstAlign replica ready: %s on %s, batches of up to %d rows", model, device, max_batch_size)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def predict_row(self, items: list[tuple[Any, str]]) -> list[Any]:
        """A batch of (decoded image, text) rows from any requests → their ``Prediction``\\ s."""
        pictures, texts = [p for p, _ in items], [t for _, t in items]
        self.stats.add(len(items))
        run = functools.partial(self.predictor.predict_batch, pictures, texts, batch_size=len(items))
        return await asyncio.get_running_loop().run_in_executor(self._model, run)

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes :attr:`max_body`."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise RequestError(413, f"the body is {declared} bytes, above the limit of {self.max_body} bytes",
                               "RESOURCE_EXHAUSTED")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise RequestError(413, f"the body is over the limit of {self.max_body} bytes", "RESOURCE_EXHAUSTED")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _records(self, frame) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        run = functools.partial(predict_records, _QueuedModel(self, loop), frame, limits=self.limits, gate=self.gate)
        return await loop.run_in_executor(self._requests, run)

    @api.get("/ping")
    @api.get("/health")
    def ping(self) -> Response:
        return Response("\n", media_type="text/plain")

    @api.get("/stats")
    def batch_stats(self) -> dict[str, Any]:
        """Batches run so far, and how this replica batches (its limits and its device)."""
        return {"batches": self.stats.batches, "rows": self.stats.rows, "largest_batch": self.stats.largest,
                **self.batching}

    @api.post("/invocations")
    async def invocations(self, request: Request) -> Response:
        try:  # Host and Content-Type were checked before this (RequestGuard)
            body = await self._body(request)
            # Read off the event loop (a big body takes a while), rows counted as they are read.
            frame = await asyncio.to_thread(parse_invocation, body, max_rows=self.limits.max_rows)
            records = await self._records(frame)
        except RequestError as e:
            return error_response(e.status, e.message, e.error_code)
        except MlflowException as e:  # PyfuncInputError, RequestTooLarge, ServerBusy
            return _pyfunc_error(e)
        return JSONResponse({"predictions": records})

    # --- the page ---------------------------------------------------------------------------

    @api.get("/")
    def page(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @api.get("/static/{name}")
    def static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return error_response(404, f"no static file {name!r}", "NOT_FOUND")
        return FileResponse(WEB_DIR / name, media_type=STATIC_FILES[name])

    @api.get("/samples")
    def sample_list(self) -> dict[str, Any]:
        return {"model": self.model, "samples": self.samples}

    @api.get("/samples/{name}")
    def sample(self, name: str) -> Response:
        if name not in {s["file"] for s in self.samples}:
            return error_response(404, f"no sample {name!r}", "NOT_FOUND")
        return FileResponse(WEB_DIR / "samples" / name, media_type="image/jpeg")

    @api.post("/explain")
    async def explain(self, request: Request) -> Response:
        """``{"image": base64, "text": str}`` → the record, the overlay PNG (base64) and the
        instance colours the overlay used, for the page (:func:`explain_record`)."""
        try:
            body = await self._body(request)
            loop = asyncio.get_running_loop()
            run = functools.partial(explain_record, _QueuedModel(self, loop), body, limits=self.limits, gate=self.gate)
            record, png = await loop.run_in_executor(self._requests, run)
        except RequestError as e:
            return error_response(e.status, e.message, e.error_code)
        except MlflowException as e:
            return _pyfunc_error(e)
        return JSONResponse({"prediction": record, "overlay_png": base64.b64encode(png).decode(),
                             "colours": overlay_colours(len(record["instances"]))})


# --- building and running the application ----------------------------------------------------

def resolve_gpus_per_replica(requested: Optional[float], cluster: dict[str, float]) -> float:
    """GPUs per replica: ``requested`` when given (0: CPU replicas), else one when the cluster
    advertises GPUs (``cluster``: ``pipelines.core.resources.cluster_totals``), the same rule as
    Train workers (``resolve_gpus_per_worker``): a GPU cluster serving from CPU would do so
    silently and many times slower. A cluster whose GPU nodes are still to come advertises
    none yet: pass ``--gpus-per-replica 1`` there.
    """
    return resolve_gpus_per_worker(requested, float(cluster.get("GPU", 0.0)), flag="--gpus-per-replica")

def build_app(model: str, *, tracking_uri: Optional[str] = None, replicas: int = 1, gpus_per_replica: float = 0.0,
              cpus_per_replica: float = 1.0, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
              batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
              top_words: int = 3, allowed_hosts: Optional[list[str]] = None) -> serve.Application:
    """The Serve application for ``model`` (a checkpoint directory or ``models:/`` URI).

    ``allowed_hosts``: the ``Host`` names the replicas answer to (``guard.host_allowed``);
    ``None``: ``$INSTALIGN_SERVE_ALLOWED_HOSTS``, else loopback on any port.
    """
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if gpus_per_replica < 0 or cpus_per_replica < 0:
        raise ValueError("--gpus-per-replica and --cpus-per-replica must be >= 0")
    options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "INSTALIGN_CACHE", ALLOWED_HOSTS_ENV,
                                      *ENV.values())
           if k in os.environ}
    if allowed_hosts is not None:
        env[ALLOWED_HOSTS_ENV] = ",".join(allowed_hosts)
    if env:
        options["runtime_env"] = {"env_vars": env}
    deployment = InstAlignService.options(num_replicas=replicas, ray_actor_options=options,
                                          max_ongoing_requests=max(8, 4 * max_batch_size))
    return deployment.bind(model, tracking_uri, max_batch_size, batch_wait_timeout_s, top_words)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for a Serve config (``import_path: pipelines.serving.serve:app_builder``; KubeRay).

    ``args``: ``model`` (required), ``tracking_uri``, ``max_batch_size``, ``batch_wait_timeout_s``,
    ``top_words``. Replicas, resources and autoscaling come from the config's ``deployments``.
    """
    if "model" not in args:
        raise ValueError("app_builder: args need 'model' (a models:/NAME@ALIAS URI or a checkpoint directory)")
    return InstAlignService.bind(str(args["model"]), args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
                                 int(args.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
                                 float(args.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S)),
                                 int(args.get("top_words", 3)))


def start(model: str, *, host: str = "127.0.0.1", port: int = 8000, address: Optional[str] = None,
          tracking_uri: Optional[str] = None, allowed_hosts: tuple[str, ...] = (),
          gpus_per_replica: Optional[float] = None, **options: Any) -> str:
    """Connect to Ray (``ray_cluster.init_ray``), start Serve's HTTP proxy on ``host:port`` and
    deploy the application, answering to :func:`bound_hosts`, on GPUs when the cluster has them
    (:func:`resolve_gpus_per_replica`); returns its URL once every replica is ready."""
    init_ray(address)
    cluster = cluster_totals()
    gpus = resolve_gpus_per_replica(gpus_per_replica, cluster)
    log.info("serving on %s (the cluster has %g GPUs, %g CPUs)",
             f"GPU: {gpus:g} per replica" if gpus else "CPU", cluster["GPU"], cluster["CPU"])
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model, tracking_uri=tracking_uri, allowed_hosts=bound_hosts(host, port, allowed_hosts),
                        gpus_per_replica=gpus, **options), name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR|models:/NAME@ALIAS|models:/NAME/VERSION",
                        help="checkpoint directory or registered model")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to deploy on (auto, HOST:PORT); default: a private local cluster")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (default: 1)")
    parser.add_argument("--gpus-per-replica", type=float, default=None,
                        help="GPUs per replica (0: CPU; default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="rows run through the model together across concurrent requests (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_S * 1000.0,
                        help="how long a batch waits to fill, in milliseconds (default: %(default)g; a lone request "
                             "waits this long)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 exposes "
                             "an unauthenticated server)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                        help="a Host name the server also answers to, e.g. the name of a proxy in front (repeat for "
                             "more; without a port, any port; '*' turns the check off). Default: 127.0.0.1, "
                             "localhost, [::1] and --host, with --port; other names get 403 (DNS rebinding)")
    parser.add_argument("--top-words", type=int, default=3, help="words reported per instance")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for models:/ URIs "
                             "(default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)")


def run(args: argparse.Namespace) -> int:
    flags.setup_logging(getattr(args, "log_level", None))  # the cluster and device lines, as train and tune show
    tracking_uri = configure_tracking(args.tracking_uri) if is_model_uri(args.model) else None
    # A wrong name, alias or directory fails here, in one line (pipelines.cli), before Ray starts.
    checkpoint_files(resolve_checkpoint(args.model))
    url = start(args.model, host=args.host, port=args.port, address=args.address, tracking_uri=tracking_uri,
                replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                cpus_per_replica=args.cpus_per_replica, max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_ms / 1000.0, top_words=args.top_words,
                allowed_hosts=tuple(args.allowed_host))
    print(f"serving {args.model} at {url}/ (page), {url}/invocations (JSON), {url}/ping; Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)  # Serve drains requests in flight first; Ray's own exit hook shuts it down
    return 0

