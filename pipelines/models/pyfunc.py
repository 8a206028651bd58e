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
metrics are linked to the logged model and ``MODEL_CARD.md`` beside ``MLmodel`` says what the
model is, its data, metrics and limits, and how to call it (``pipelines.models.card``).

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
an empty text, a text over ``ServingLimits.max_text_chars`` characters (checked before it is
tokenized), a text longer than the model's token limit, an image above ``MAX_PIXELS``. A
request over a limit of ``pipelines.models.limits.ServingLimits`` (rows, payload bytes, decoded
pixels, all checked before decoding) raises ``RequestTooLarge`` (413); a request that finds
no free prediction slot in time, ``ServerBusy`` (503). ``pipelines.models.limits`` says why the
limits live here and what only the HTTP front can bound.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Array, ColSpec, Object, Property, Schema
from PIL import Image

# MLflow validates a logged model's input example by loading the just-saved model, which puts
# the model's temporary code/ directory first on sys.path: ``instalign`` (the predictor's
# modules included) is bound to this installation before, so a process never half-imports a
# copy from a directory that is deleted once logging returns.
from instalign.checkpoint import CONFIG_FILE, export_inference_checkpoint
from instalign.config import load_config
from instalign.data.images import CorruptImageError, ImageTooLargeError, UnsupportedImageFormatError, read_image_size
from instalign.predictor import Predictor, load_image
from pipelines.core.tracking import redacted_context_tags
from pipelines.models.card import MODEL_CARD, link_run_metrics, model_card

# The error classes are re-exported: callers catch them from here.
from pipelines.models.limits import (  # noqa: F401
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
from pipelines.models.records import prediction_to_record

#: ``instalign predict`` reads a local image file of at most this many bytes.
MAX_FILE_BYTES = 256 * 2**20
#: Rows decoded and predicted together inside a request (their full-size masks are converted
#: to RLE before the next rows are decoded).
_CHUNK = 8

#: The model file MLflow stores and executes at load time (models-from-code).
MODEL_CODE = '''"""InstAlign pyfunc entry point (models-from-code; written by pipelines.models.pyfunc)."""
import mlflow
from pipelines.models.pyfunc import InstAlignPyfunc

mlflow.models.set_model(InstAlignPyfunc())
'''

_REPO = Path(__file__).resolve().parents[2]
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


def _unreadable(what: str, error) -> PyfuncInputError:
    """A ``CorruptImageError`` as the row's 400, in one line; ``reason`` is the code batch
    prediction files the row under (``unsupported_image_format``, ``image_too_large``,
    ``unreadable_image``)."""
    refusal = PyfuncInputError(f"{what} is not a readable image: {getattr(error, 'detail', error)}")
    refusal.reason = ("unsupported_image_format" if isinstance(error, UnsupportedImageFormatError)
                      else "image_too_large" if isinstance(error, ImageTooLargeError) else "unreadable_image")
    return refusal


def image_size(what: str, data: bytes) -> tuple[int, int]:
    """``(width, height)`` of encoded image ``data`` from its header alone (nothing decoded);
    refuses what is not an image in an allowed format (``instalign.data.images.read_image_size``:
    every decoder failure) and images above ``MAX_PIXELS``. ``what`` names it in errors."""
    try:
        width, height = read_image_size(data, source=what, max_pixels=0)  # MAX_PIXELS below, in our words
    except CorruptImageError as e:
        raise _unreadable(what, e) from None
    if width * height > MAX_PIXELS:
        refusal = PyfuncInputError(f"{what} is {width}x{height} = {width * height} pixels, above the limit of "
                                   f"{MAX_PIXELS}; downscale it first")
        refusal.reason = "image_too_large"
        raise refusal
    return width, height


def decode_image(what: str, data: bytes):
    """Encoded ``data`` as an RGB PIL image, exactly as ``Predictor.predict`` decodes bytes
    (``instalign.predictor.load_image``: EXIF orientation applied). Check :func:`image_size` first."""
    try:
        return load_image(data)
    except ValueError as e:  # CorruptImageError (every decoder failure), or empty bytes
        raise _unreadable(what, e) from None


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


def _preview(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters: errors name what came, never echo all of it."""
    text = repr(value[:limit + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_text_size(row: int, text: Any, *, max_chars: int = ServingLimits.max_text_chars) -> str:
    """Refuse what is not a non-empty string, texts over ``max_chars`` characters and texts that
    are not valid Unicode (a lone surrogate: no UTF-8 exists for it). O(1) before the length
    check, so a huge text costs nothing; what passes is at most ``4 × max_chars`` UTF-8 bytes."""
    if not isinstance(text, str) or not text.strip():
        raise PyfuncInputError(f"row {row}: 'text' must be a non-empty string, got {_preview(text)}")
    if len(text) > max_chars:
        raise PyfuncInputError(f"row {row}: 'text' {_preview(text)} is {len(text)} characters, above the limit of "
                               f"{max_chars} characters ({ENV['max_text_chars']}); shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PyfuncInputError(f"row {row}: 'text' is not valid Unicode ({e.reason} at character {e.start})") from None
    return text


def check_text_tokens(row: int, text: str, *, tokenizer, max_tokens: int) -> str:
    """Refuse texts the model would truncate (it reads ``max_tokens`` tokens). Tokenizing costs
    time and memory in the text's length: call :func:`check_text_size` first."""
    n = len(tokenizer(text)["input_ids"])  # with the special tokens, as the transform counts
    if n > max_tokens:
        raise PyfuncInputError(f"row {row}: text {text!r} is {n} tokens, longer than the model's limit of "
                               f"{max_tokens} (including special tokens); shorten it")
    return text


def check_text(row: int, text: Any, *, tokenizer, max_tokens: int,
               max_chars: int = ServingLimits.max_text_chars) -> str:
    """Refuse empty texts, texts over ``max_chars`` characters (before tokenizing) and texts the
    model would truncate (it reads ``max_tokens`` tokens)."""
    text = check_text_size(row, text, max_chars=max_chars)
    return check_text_tokens(row, text, tokenizer=tokenizer, max_tokens=max_tokens)


# --- the pyfunc ------------------------------------------------------------------------------

class InstAlignPyfunc(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame[image | image_path, text]) -> DataFrame[mask, no_target, no_target_prob, instances]``."""

    def load_context(self, context) -> None:
        """Load the checkpoint and the serving limits (``model_config`` keys, else the
        ``INSTALIGN_SERVING_*`` environment, else defaults: ``pipelines.models.limits.ServingLimits``)."""
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


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed :func:`check_request`: its texts and its encoded images, with a
    name for each image in errors."""

    texts: list[str]
    images: list[tuple[str, bytes]]


def check_request(frame: pd.DataFrame, limits: ServingLimits) -> CheckedRequest:
    """Every refusal that costs no model work, on the request as sent and image headers only.

    Columns, rows (``limits.max_rows``), each text's characters (``limits.max_text_chars``),
    payload bytes (``limits.max_request_bytes``: image bytes sent or read from ``image_path``,
    plus texts), image headers and decoded pixels summed over rows (``limits.max_pixels``).
    Nothing is tokenized or decoded here: that waits for a slot (:func:`predict_checked`).
    """
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
    texts = [check_text_size(row, rec.get("text"), max_chars=limits.max_text_chars) for row, rec in enumerate(records)]
    payload = sum(_nbytes(rec.get("image")) + _nbytes(rec.get("text")) for rec in records)
    if payload > limits.max_request_bytes:
        raise RequestTooLarge(f"the request's images and texts are {payload} bytes, above the limit of "
                              f"{limits.max_request_bytes} bytes per request ({ENV['max_request_bytes']}); "
                              f"send fewer or smaller images")
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
    return CheckedRequest(texts, images)


def predict_checked(predictor, request: CheckedRequest) -> list[dict[str, Any]]:
    """The work that grows with the input, for a caller holding a prediction slot: token counts
    (a text the model would truncate is still a 400, before any image is decoded), then images
    decoded and run ``_CHUNK`` rows at a time, each chunk's full-size masks turned into RLE
    before the next."""
    tokenizer, max_tokens = predictor.transform.tokenizer, predictor.transform.max_tokens
    for row, text in enumerate(request.texts):
        check_text_tokens(row, text, tokenizer=tokenizer, max_tokens=max_tokens)
    out: list[dict[str, Any]] = []
    for start in range(0, len(request.images), _CHUNK):
        pictures = [decode_image(what, data) for what, data in request.images[start:start + _CHUNK]]
        predictions = predictor.predict_batch(pictures, request.texts[start:start + _CHUNK])
        out.extend(prediction_to_record(p) for p in predictions)
        del pictures, predictions
    return out


def predict_records(predictor, frame: pd.DataFrame, *, limits: ServingLimits | None = None,
                    gate: PredictionGate | None = None) -> list[dict[str, Any]]:
    """Check the whole request (:func:`check_request`), then tokenize, decode and predict it
    inside one of ``gate``'s slots (:func:`predict_checked`)."""
    request = check_request(frame, limits or ServingLimits())
    with gate.slot() if gate is not None else nullcontext():
        return predict_checked(predictor, request)


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
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 90, 60)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "text": ["the object on the left"]})


def signature():
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


class _PyfuncDeclaringServingLimits:
    """``mlflow.pyfunc`` as the flavor of ``mlflow.models.Model.log``, with every serving limit
    declared in ``MLmodel`` as a load-time ``model_config`` key, unset.

    MLflow accepts a load-time ``model_config`` only for keys the logged model declares; unset
    keys fall back to the environment (``ServingLimits.load``). They are declared here, in
    ``save_model``, rather than through ``mlflow.pyfunc.log_model(model_config=…)``, because
    ``Model.log`` (MLflow 3.17) also logs a ``model_config`` it is given as params of the
    active run: the training run's params — its settings — would gain ``max_rows=None``,
    ``image_root=None``, ….
    """

    @staticmethod
    def save_model(path, mlflow_model=None, **kwargs):
        config = {f.name: None for f in fields(ServingLimits)}
        return mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, model_config=config, **kwargs)


def log_model(checkpoint_dir: str | os.PathLike, *, name: str = "model", registered_model_name: str | None = None):
    """Log ``checkpoint_dir`` as an InstAlign pyfunc in the active run; returns MLflow's ``ModelInfo``.

    The model's artifact ``checkpoint`` is an inference copy of ``checkpoint_dir``
    (``instalign.checkpoint.export_inference_checkpoint``: no optimizer state, which every
    serving replica and batch actor would otherwise download). The logged model gets
    ``MODEL_CARD.md`` and the run's validation metrics (``pipelines.models.card``); the run's
    params are left as they are.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {str(checkpoint_dir)!r}: not a directory")
    client = mlflow.MlflowClient()
    active = mlflow.active_run()
    run = client.get_run(active.info.run_id) if active is not None else None
    with tempfile.TemporaryDirectory(prefix="instalign-pyfunc-") as tmp:
        # Verified against its seal first: an incomplete checkpoint is refused before logging.
        checkpoint = export_inference_checkpoint(checkpoint_dir, Path(tmp) / "checkpoint")
        model_file = Path(tmp) / "instalign_model.py"
        model_file.write_text(MODEL_CODE)
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=_PyfuncDeclaringServingLimits,
            python_model=str(model_file),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(_REPO / "instalign"), str(_REPO / "pipelines")],
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            tags=redacted_context_tags(),
        )
        card = Path(tmp) / MODEL_CARD
        card.write_text(model_card(load_config(checkpoint_dir / CONFIG_FILE), run=run,
                                   registered_model_name=registered_model_name))
        client.log_model_artifact(info.model_id, str(card))
    if run is not None:
        link_run_metrics(client, run, info.model_id)
    return info
