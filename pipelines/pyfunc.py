"""InstAlign as an MLflow pyfunc model: log, register, serve (DESIGN §5, §6.10).

The pyfunc is a thin shell over ``instalign.predictor.Predictor``, so serving uses the very
transform (resize, normalise, tokenise) that training used. It is logged as
*models-from-code*: MLflow stores a three-line model file that imports
``InstAlignPyfunc`` from the bundled sources (``code_paths``: the ``instalign`` and
``pipelines`` packages) instead of a cloudpickle of live objects, so a model loads in any
process with the same dependencies (``mlflow.pyfunc.load_model``, ``mlflow models serve
--env-manager local``) and never depends on pickle compatibility of the project's classes.
The checkpoint directory is the model's artifact ``checkpoint``.

Logged inside a training run, the model also carries that run's story: its validation
metrics are linked to the logged model (MLflow 3 ``LoggedModel`` metrics, with the dataset
they were measured on), and ``MODEL_CARD.md`` beside ``MLmodel`` says what the model is, the
data it was trained on, its metrics, its limits and how to call it (:func:`model_card`).

Input: a DataFrame with ``text`` and either ``image`` (encoded bytes: JPEG, PNG, ...) or
``image_path`` — a file under the directory the server's operator allowed
(``INSTALIGN_SERVING_IMAGE_ROOT``); without one, paths are refused. Output: one row per input
row with

* ``mask`` — the merged mask at the original image size as COCO RLE ``{size: [h, w], counts}``
  (all zero when no-target is predicted, paper eqs. 8 and 12);
* ``no_target`` / ``no_target_prob`` — p̂_nt > 0.5 and p̂_nt (eq. 12);
* ``instances`` — the instance queries the predictor kept: ``query`` (i), ``score`` (p̂_i), ``bbox``
  (COCO ``[x, y, w, h]`` of the instance mask), ``mask`` (RLE) and ``words`` (the phrase the
  query aligned to, eq. 1, heaviest first) with ``word_weights`` (their shares of R's row).

Bad input raises ``PyfuncInputError`` (HTTP 400) naming the row and what is wrong, before any
model work: a missing column, bytes that are not an image, a path the server may not read,
an empty text, a text longer than the model's token limit, an image above ``MAX_PIXELS``. A
request over a limit of ``pipelines.serving.ServingLimits`` (rows, payload bytes, decoded
pixels, all checked before decoding) raises ``RequestTooLarge`` (413); a request that finds
no free prediction slot in time, ``ServerBusy`` (503). ``pipelines.serving`` says why the
limits live here and what only the HTTP front can bound.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import nullcontext
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

# The error classes are re-exported: callers catch them from here.
from pipelines.serving import (  # noqa: F401
    ENV,
    MAX_PIXELS,
    FileTooLarge,
    PredictionGate,
    PyfuncInputError,
    RequestTooLarge,
    ServerBusy,
    ServingLimits,
    read_regular_file,
    read_served_image_path,
)

#: ``instalign predict`` reads a local image file of at most this many bytes.
MAX_FILE_BYTES = 256 * 2**20
#: Rows decoded and predicted together inside a request (their full-size masks are converted
#: to RLE before the next rows are decoded).
_CHUNK = 8

#: The model file MLflow stores and executes at load time (models-from-code).
MODEL_CODE = '''"""InstAlign pyfunc entry point (models-from-code; written by pipelines.pyfunc)."""
import mlflow
from pipelines.pyfunc import InstAlignPyfunc

mlflow.models.set_model(InstAlignPyfunc())
'''

_REPO = Path(__file__).resolve().parent.parent
#: Runtime dependencies of the predictor (not Ray: serving needs none of it).
_RUNTIME_PACKAGES = ("torch", "timm", "transformers", "safetensors", "tokenizers", "scipy", "numpy",
                     "pycocotools", "pillow", "pyyaml", "pandas")


# --- input validation ------------------------------------------------------------------------

def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, (str, bytes, bytearray)) and len(value) == 0)


def image_size(what: str, data: bytes) -> tuple[int, int]:
    """``(width, height)`` of encoded image ``data`` from its header alone (nothing decoded);
    refuses what is not an image and images above ``MAX_PIXELS``. ``what`` names it in errors."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise PyfuncInputError(f"{what} is not a readable image: {e}") from None
    if width * height > MAX_PIXELS:
        raise PyfuncInputError(f"{what} is {width}x{height} = {width * height} pixels, above the limit of "
                               f"{MAX_PIXELS}; downscale it first")
    return width, height


def decode_image(what: str, data: bytes):
    """Encoded ``data`` as an RGB PIL image, exactly as ``Predictor.predict`` decodes bytes
    (``instalign.predictor.load_image``: EXIF orientation applied). Check :func:`image_size` first."""
    from instalign.predictor import load_image as decode

    try:
        return decode(data)
    except (ValueError, OSError) as e:  # truncated or corrupt past the header
        raise PyfuncInputError(f"{what} is not a readable image: {e}") from None


def load_local_image(path: str | os.PathLike):
    """An image file the local user names (``instalign predict``): regular files only, at most
    ``MAX_FILE_BYTES``, size checked from the header before decoding."""
    what = f"image {str(path)!r}"
    try:
        data = read_regular_file(os.fspath(path), MAX_FILE_BYTES)
    except FileNotFoundError:
        raise PyfuncInputError(f"{what} does not exist") from None
    except FileTooLarge as e:
        raise PyfuncInputError(f"{what} is {e.size} bytes, above the limit of {e.limit} for an image file") from None
    except OSError as e:
        raise PyfuncInputError(f"{what} cannot be read: {e.strerror or e}") from None
    image_size(what, data)
    return decode_image(what, data)


def check_text(row: int, text: Any, *, tokenizer, max_tokens: int) -> str:
    """Refuse empty texts and texts the model would truncate (it reads ``max_tokens`` tokens)."""
    if not isinstance(text, str) or not text.strip():
        raise PyfuncInputError(f"row {row}: 'text' must be a non-empty string, got {text!r}")
    n = len(tokenizer(text)["input_ids"])  # with the special tokens, as the transform counts
    if n > max_tokens:
        raise PyfuncInputError(f"row {row}: text {text!r} is {n} tokens, longer than the model's limit of "
                               f"{max_tokens} (including special tokens); shorten it")
    return text


# --- output ----------------------------------------------------------------------------------

def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """(h, w) bool → COCO compressed RLE ``{"size": [h, w], "counts": str}``."""
    from instalign.data.masks import rle_encode

    mask = np.asarray(mask, dtype=bool)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_encode(mask)}


def mask_bbox(mask: np.ndarray) -> list[float]:
    """COCO ``[x, y, w, h]`` of a (h, w) bool mask; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def prediction_to_record(prediction) -> dict[str, Any]:
    """One ``instalign.predictor.Prediction`` → the JSON-ready output row."""
    instances = []
    for inst in prediction.instances:
        instances.append({
            "query": int(inst.index),
            "score": float(inst.score),
            "bbox": mask_bbox(inst.mask),
            "mask": mask_to_rle(inst.mask),
            "words": [str(w) for w, _ in inst.words],
            "word_weights": [float(weight) for _, weight in inst.words],
        })
    return {
        "mask": mask_to_rle(prediction.mask),
        "no_target": bool(prediction.no_target),
        "no_target_prob": float(prediction.no_target_prob),
        "instances": instances,
    }


def record_to_prediction(record: dict[str, Any]):
    """The inverse of :func:`prediction_to_record` (masks decoded), e.g. to draw a served answer."""
    from instalign.data.masks import rle_decode
    from instalign.predictor import InstancePrediction, Prediction

    def decode(rle: dict[str, Any]) -> np.ndarray:
        h, w = rle["size"]
        return rle_decode(rle["counts"], int(h), int(w))

    instances = [InstancePrediction(index=int(inst["query"]), score=float(inst["score"]), mask=decode(inst["mask"]),
                                    words=list(zip(inst["words"], inst["word_weights"])))
                 for inst in record["instances"]]
    return Prediction(mask=decode(record["mask"]), no_target=bool(record["no_target"]),
                      no_target_prob=float(record["no_target_prob"]), instances=instances)


# --- the pyfunc ------------------------------------------------------------------------------

class InstAlignPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame[image | image_path, text]) -> DataFrame[mask, no_target, no_target_prob, instances]``."""

    def load_context(self, context) -> None:
        """Load the checkpoint and the serving limits (``model_config`` keys, else the
        ``INSTALIGN_SERVING_*`` environment, else defaults: ``pipelines.serving.ServingLimits``)."""
        import torch

        from instalign.predictor import Predictor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], device=device)
        self.limits = ServingLimits.load(getattr(context, "model_config", None))
        self.gate = PredictionGate(self.limits.max_concurrent, self.limits.queue_timeout_s)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        records = predict_records(self.predictor, model_input, limits=self.limits, gate=self.gate)
        return pd.DataFrame(records, columns=OUTPUT_COLUMNS)


OUTPUT_COLUMNS = ["mask", "no_target", "no_target_prob", "instances"]


def _nbytes(value: Any) -> int:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _row_image(row: int, rec: dict[str, Any], limits: ServingLimits, budget: int) -> tuple[bytes, str, bool]:
    """Row ``row``'s encoded image, a name for it in errors, and whether it was read from a file."""
    image, image_path = rec.get("image"), rec.get("image_path")
    if _present(image):
        if isinstance(image, str):
            raise PyfuncInputError(f"row {row}: column 'image' must hold encoded image bytes, got a string "
                                   f"(for a file, use the 'image_path' column)")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise PyfuncInputError(f"row {row}: column 'image' must hold bytes, got {type(image).__name__}")
        return bytes(image), f"row {row}: 'image' bytes", False
    if _present(image_path):
        data = read_served_image_path(row, image_path, root=limits.image_root, max_bytes=budget)
        return data, f"row {row}: image_path {str(image_path)!r}", True
    raise PyfuncInputError(f"row {row}: needs an 'image' (bytes) or an 'image_path'")


def predict_records(predictor, frame: pd.DataFrame, *, limits: ServingLimits | None = None,
                    gate: PredictionGate | None = None) -> list[dict[str, Any]]:
    """Check the whole request, then predict it inside one of ``gate``'s slots.

    Everything that can refuse a request runs first, on encoded bytes and image headers only:
    columns, rows (``limits.max_rows``), payload bytes (``limits.max_request_bytes``: image
    bytes sent or read from ``image_path``, plus texts), texts, image headers and decoded
    pixels summed over rows (``limits.max_pixels``). Only then are images decoded and run,
    ``_CHUNK`` rows at a time, each chunk's full-size masks turned into RLE before the next.
    """
    limits = limits or ServingLimits()
    if not isinstance(frame, pd.DataFrame):
        raise PyfuncInputError(f"input must be a pandas DataFrame, got {type(frame).__name__}")
    if "text" not in frame.columns:
        raise PyfuncInputError(f"input is missing the column 'text' (columns: {list(frame.columns)})")
    if "image" not in frame.columns and "image_path" not in frame.columns:
        raise PyfuncInputError(f"input needs a column 'image' (bytes) or 'image_path' (columns: {list(frame.columns)})")
    if len(frame) > limits.max_rows:
        raise RequestTooLarge(f"the request has {len(frame)} rows, above the limit of {limits.max_rows} rows per "
                              f"request ({ENV['max_rows']}); split it")
    records = frame.to_dict(orient="records")
    payload = sum(_nbytes(rec.get("image")) + _nbytes(rec.get("text")) for rec in records)
    if payload > limits.max_request_bytes:
        raise RequestTooLarge(f"the request's images and texts are {payload} bytes, above the limit of "
                              f"{limits.max_request_bytes} bytes per request ({ENV['max_request_bytes']}); "
                              f"send fewer or smaller images")
    tokenizer, max_tokens = predictor.transform.tokenizer, predictor.transform.max_tokens
    texts = [check_text(row, rec.get("text"), tokenizer=tokenizer, max_tokens=max_tokens)
             for row, rec in enumerate(records)]
    images, pixels = [], 0
    for row, rec in enumerate(records):
        data, what, from_file = _row_image(row, rec, limits, limits.max_request_bytes - payload)
        payload += len(data) if from_file else 0
        width, height = image_size(what, data)
        pixels += width * height
        if pixels > limits.max_pixels:
            raise RequestTooLarge(f"the request's images decode to more than {limits.max_pixels} pixels "
                                  f"({pixels} up to row {row}; limit {ENV['max_pixels']}); send fewer or "
                                  f"smaller images")
        images.append((what, data))
    out: list[dict[str, Any]] = []
    with gate.slot() if gate is not None else nullcontext():
        for start in range(0, len(images), _CHUNK):
            pictures = [decode_image(what, data) for what, data in images[start:start + _CHUNK]]
            predictions = predictor.predict_batch(pictures, texts[start:start + _CHUNK])
            out.extend(prediction_to_record(p) for p in predictions)
            del pictures, predictions
    return out


# --- logging and registration ----------------------------------------------------------------

def pip_requirements() -> list[str]:
    """The predictor's runtime dependencies pinned to this environment's versions.

    The project itself travels as ``code_paths`` (the ``instalign`` and ``pipelines``
    sources), so the requirements name only third-party packages.
    """
    reqs = []
    for name in _RUNTIME_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version.split('+')[0]}")  # drop local tags (+cpu): not on any index
    return reqs + [f"mlflow=={mlflow.__version__}"]


def input_example() -> pd.DataFrame:
    """A one-row request: a small PNG and an expression."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 90, 60)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "text": ["the object on the left"]})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, Property, Schema

    rle = Object([Property("size", Array("long")), Property("counts", "string")])
    instance = Object([
        Property("query", "long"),
        Property("score", "double"),
        Property("bbox", Array("double")),
        Property("mask", rle),
        Property("words", Array("string")),
        Property("word_weights", Array("double")),
    ])
    inputs = Schema([
        ColSpec("binary", "image", required=False),
        ColSpec("string", "image_path", required=False),
        ColSpec("string", "text"),
    ])
    outputs = Schema([
        ColSpec(rle, "mask"),
        ColSpec("boolean", "no_target"),
        ColSpec("double", "no_target_prob"),
        ColSpec(Array(instance), "instances"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


#: The model card's file name inside the logged model (beside ``MLmodel``).
MODEL_CARD = "MODEL_CARD.md"
#: Metric keys of a training run linked to its logged model and shown on the card.
_CARD_METRICS = ("val_gIoU", "val_cIoU", "val_N_acc", "val_T_acc", "val_Pr@0.7", "val_Pr@0.8", "val_Pr@0.9",
                 "val_nt_AUROC", "val_samples")


def _fmt_metric(value: float) -> str:
    return "n/a" if value != value else (f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}")


def model_card(cfg, *, run=None, registered_model_name: str | None = None) -> str:
    """``MODEL_CARD.md``: what the model is, its data, metrics, limits and how to call it.

    Args:
        cfg: the checkpoint's ``instalign.config.Config``.
        run: the MLflow run the model is logged in (``mlflow.entities.Run``), if any: the
            dataset comes from its inputs (name, digest, counts) and tags, the metrics from its
            ``val_*`` metrics. Without one, the card says the data and metrics are unknown.
        registered_model_name: for the "how to call it" lines.
    """
    import json

    from pipelines.tracking_mlflow import COMMAND_TAG, GIT_COMMIT_TAG, MANIFEST_HASH_TAG, metric_key
    from pipelines.redaction import redact

    m = cfg.model
    uri = f"models:/{registered_model_name}@champion" if registered_model_name else "models:/<NAME>@<ALIAS>"
    lines = [
        "# InstAlign model card",
        "",
        "## What it is",
        "InstAlign (instance-aware generalized referring expression segmentation): given an image and a "
        "referring expression, it segments every object the expression refers to — one, several, or none "
        "(then it predicts *no target*, p̂_nt > 0.5, and an empty mask). Queries are aligned to the "
        "expression's phrases (paper eq. 1) and the kept instances are merged into one mask (eq. 8).",
        "",
        f"- backbone: `{m.backbone.name}`, text encoder: `{m.text_encoder.name}` (max {m.text_encoder.max_tokens} "
        f"tokens including special tokens)",
        f"- input resolution {m.image_size}, {m.num_queries} instance queries, {m.num_blocks} decoder blocks "
        f"(`{m.decoder}`), hidden size {m.hidden_dim}, aggregation `{m.aggregation}`, no-target input "
        f"`{m.no_target_input}`",
        f"- trained for {cfg.train.epochs} epoch(s), batch size {cfg.train.batch_size}, lr {cfg.train.lr:g}, "
        f"seed {cfg.train.seed}",
        "",
        "## Data",
    ]
    metrics: dict[str, float] = {}
    if run is not None:
        tags = run.data.tags
        datasets = [d for d in run.inputs.dataset_inputs
                    if any(t.key == "mlflow.data.context" and t.value == "train" for t in d.tags)]
        for d in datasets:
            profile = json.loads(d.dataset.profile or "{}")
            source = json.loads(d.dataset.source or "{}").get("uri", d.dataset.source)
            lines.append(f"- `{d.dataset.name}` (digest `{d.dataset.digest}`) from `{source}`")
            for split, counts in sorted((profile.get("counts") or {}).items()):
                lines.append(f"  - {split}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
            if profile.get("quarantined"):
                lines.append(f"  - quarantined while preparing: {profile['quarantined']}")
        if not datasets:
            lines.append(f"- `{tags.get('instalign.dataset', 'unknown')}` (manifest sha256 "
                         f"`{tags.get(MANIFEST_HASH_TAG, 'unknown')}`)")
        lines += ["", f"Training run `{run.info.run_id}` (git `{tags.get(GIT_COMMIT_TAG, 'unknown')}`), made by "
                      f"`{redact(tags.get(COMMAND_TAG, 'unknown command'))}`."]
        metrics = {k: run.data.metrics[metric_key(k)] for k in _CARD_METRICS if metric_key(k) in run.data.metrics}
    else:
        lines.append("- unknown: logged outside a training run (`instalign register --checkpoint`).")
    lines += ["", "## Metrics"]
    if metrics:
        lines += ["Validation at the training run's last evaluation (gRefCOCO semantics, percentages; the paper's "
                  "no-target threshold 0.5):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.removeprefix('val_')} | {_fmt_metric(v)} |" for k, v in metrics.items()]
    else:
        lines.append("None recorded with this model; `instalign evaluate --model models:/NAME/VERSION` logs an "
                     "evaluation run linked to it.")
    lines += [
        "",
        "## Limits",
        f"- Texts longer than {m.text_encoder.max_tokens} tokens are refused, not truncated; images above the "
        "serving limits (pixels, bytes; `pipelines.serving.ServingLimits`) are refused.",
        "- Masks are predicted at the input resolution and resized to the image: thin structures lose detail.",
        "- The no-target decision is a fixed threshold (0.5) on p̂_nt; its accuracy (N-acc) depends on how "
        "often the training data had no-target expressions.",
        "- Quality is only what the metrics above say, on the data above: a model trained on a small or "
        "synthetic dataset (the quickstart) is a demonstration, not a usable segmenter.",
        "",
        "## How to call it",
        "```python",
        "import mlflow, pandas as pd",
        f"model = mlflow.pyfunc.load_model({uri!r})",
        'out = model.predict(pd.DataFrame({"image": [open("photo.jpg", "rb").read()], "text": ["the two dogs"]}))',
        'out.loc[0, "mask"]  # COCO RLE; also no_target, no_target_prob, instances',
        "```",
        f"Command line: `instalign predict --model {uri} --image photo.jpg --text \"the two dogs\"`; a server: "
        f"`instalign serve --model {uri}` or `mlflow models serve -m {uri} --env-manager local`.",
    ]
    return "\n".join(lines) + "\n"


def _link_run_metrics(client, run, model_id: str) -> None:
    """Re-log the run's latest ``val_*`` metrics with ``model_id`` (and the training dataset),
    so they show on the logged model (MLflow 3). Each is the same point (key, value, step,
    timestamp) as in the run's history, which therefore gains no new points."""
    from mlflow.entities import Metric

    from pipelines.tracking_mlflow import metric_key

    keys = {metric_key(k) for k in _CARD_METRICS}
    train = [d.dataset for d in run.inputs.dataset_inputs
             if any(t.key == "mlflow.data.context" and t.value == "train" for t in d.tags)]
    name, digest = (train[0].name, train[0].digest) if train else (None, None)
    latest = [max(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
              for key in sorted(keys & set(run.data.metrics))]
    linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=name, dataset_digest=digest)
              for m in latest]
    if linked:
        client.log_batch(run.info.run_id, metrics=linked)


def log_model(checkpoint_dir: str | os.PathLike, *, name: str = "model", registered_model_name: str | None = None):
    """Log ``checkpoint_dir`` as an InstAlign pyfunc in the active run; returns MLflow's ``ModelInfo``.

    The logged model gets ``MODEL_CARD.md`` (:func:`model_card`) and the run's validation
    metrics (module docstring).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {str(checkpoint_dir)!r}: not a directory")
    from instalign.checkpoint import CONFIG_FILE, checkpoint_files
    from instalign.config import load_config

    checkpoint_files(checkpoint_dir)  # refuse an incomplete checkpoint before logging anything
    # MLflow validates the input example by loading the just-saved model, which puts the
    # model's temporary code/ directory first on sys.path. Importing the predictor's modules
    # now binds ``instalign`` to this installation, so the process never half-imports a copy
    # from a directory that is deleted once logging returns.
    import instalign.predictor  # noqa: F401
    from pipelines.tracking_mlflow import redacted_context_tags

    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    run = client.get_run(active.info.run_id) if active is not None else None
    with tempfile.TemporaryDirectory(prefix="instalign-pyfunc-") as tmp:
        model_file = Path(tmp) / "instalign_model.py"
        model_file.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_file),
            artifacts={"checkpoint": str(checkpoint_dir)},
            code_paths=[str(_REPO / "instalign"), str(_REPO / "pipelines")],
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            tags=redacted_context_tags(),
            # Every serving limit as a key, unset: MLflow accepts a load-time ``model_config``
            # only for keys the logged model declares; unset keys fall back to the environment.
            model_config={f.name: None for f in fields(ServingLimits)},
        )
        card = Path(tmp) / MODEL_CARD
        card.write_text(model_card(load_config(checkpoint_dir / CONFIG_FILE), run=run,
                                   registered_model_name=registered_model_name))
        client.log_model_artifact(info.model_id, str(card))
    if run is not None:
        _link_run_metrics(client, run, info.model_id)
    return info


def log_and_register(checkpoint_dir: str | os.PathLike, *, registered_model_name: str, alias: str | None = "candidate",
                     run_id: str | None = None):
    """Log the checkpoint as a pyfunc in run ``run_id`` (or a new run), register it, set ``alias``,
    and describe and tag the version from the run (``pipelines.registry.annotate_version``).

    Returns:
        The new ``mlflow.entities.model_registry.ModelVersion`` (``.name``, ``.version``, ``.run_id``).
    """
    from mlflow import MlflowClient

    from pipelines.tracking_mlflow import redacted_context_tags

    active = mlflow.active_run()
    if active is not None and (run_id is None or active.info.run_id == run_id):
        info = log_model(checkpoint_dir, registered_model_name=registered_model_name)
    else:
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register-checkpoint",
                              nested=active is not None, tags=None if run_id else redacted_context_tags()):
            info = log_model(checkpoint_dir, registered_model_name=registered_model_name)
    client = MlflowClient()
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    from pipelines.registry import annotate_version

    # Described and tagged from its run from the start; a promotion gate (the quickstart)
    # rewrites the description with its baselines and decision.
    return annotate_version(registered_model_name, version)
