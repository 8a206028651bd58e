"""InstAlign as an MLflow pyfunc model: log, register, serve (DESIGN §5, §6.10).

The pyfunc is a thin shell over ``instalign.predictor.Predictor``, so serving uses the very
transform (resize, normalise, tokenise) that training used. It is logged as
*models-from-code*: MLflow stores a three-line model file that imports
``InstAlignPyfunc`` from the bundled sources (``code_paths``: the ``instalign`` and
``pipelines`` packages) instead of a cloudpickle of live objects, so a model loads in any
process with the same dependencies (``mlflow.pyfunc.load_model``, ``mlflow models serve
--env-manager local``) and never depends on pickle compatibility of the project's classes.
The checkpoint directory is the model's artifact ``checkpoint``.

Input: a DataFrame with ``text`` and either ``image`` (encoded bytes: JPEG, PNG, ...) or
``image_path``. Output: one row per input row with

* ``mask`` — the merged mask at the original image size as COCO RLE ``{size: [h, w], counts}``
  (all zero when no-target is predicted, paper eqs. 8 and 12);
* ``no_target`` / ``no_target_prob`` — p̂_nt > 0.5 and p̂_nt (eq. 12);
* ``instances`` — the instance queries the predictor kept: ``query`` (i), ``score`` (p̂_i), ``bbox``
  (COCO ``[x, y, w, h]`` of the instance mask), ``mask`` (RLE) and ``words`` (the phrase the
  query aligned to, eq. 1, heaviest first) with ``word_weights`` (their shares of R's row).

Bad input raises ``PyfuncInputError`` naming the row and what is wrong, before any model
work: a missing column, bytes that are not an image, a missing file, an empty text, a
text longer than the model's token limit, an image above ``MAX_PIXELS``.
"""

from __future__ import annotations

import io
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

#: Refuse images above this many pixels (≈ 6000×6000): decoding one would take gigabytes
#: before the model even resizes it to its input side. PIL's own bomb guard is at 89 M.
MAX_PIXELS = 36_000_000

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


class PyfuncInputError(MlflowException, ValueError):
    """A request row is invalid; the message names the row and the problem.

    An ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server then answers
    400 with this message, instead of a generic message plus the server's stack trace.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


# --- input validation ------------------------------------------------------------------------

def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, (str, bytes, bytearray)) and len(value) == 0)


def load_image(row: int, *, image: Any = None, image_path: Any = None):
    """Row ``row``'s image (bytes or a path) as an RGB PIL image, with errors naming the row.

    The size is read from the header first, so an oversized image is refused before it is
    decoded; decoding itself is ``instalign.predictor.load_image`` (EXIF orientation applied),
    exactly what ``Predictor.predict`` does with the same bytes or path.
    """
    from PIL import Image, UnidentifiedImageError

    from instalign.predictor import load_image as decode

    if _present(image):
        if isinstance(image, str):
            raise PyfuncInputError(f"row {row}: column 'image' must hold encoded image bytes, got a string "
                                   f"(for a file, use the 'image_path' column)")
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise PyfuncInputError(f"row {row}: column 'image' must hold bytes, got {type(image).__name__}")
        source, header, what = bytes(image), io.BytesIO(bytes(image)), f"row {row}: 'image' bytes"
    elif _present(image_path):
        path = Path(str(image_path))
        if not path.is_file():
            raise PyfuncInputError(f"row {row}: image_path {str(image_path)!r} does not exist")
        source, header, what = path, path, f"row {row}: image_path {str(image_path)!r}"
    else:
        raise PyfuncInputError(f"row {row}: needs an 'image' (bytes) or an 'image_path'")
    try:
        with Image.open(header) as img:
            width, height = img.size  # from the header: nothing decoded yet
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise PyfuncInputError(f"{what} is not a readable image: {e}") from None
    if width * height > MAX_PIXELS:
        raise PyfuncInputError(f"{what} is {width}x{height} = {width * height} pixels, above the limit of "
                               f"{MAX_PIXELS}; downscale it first")
    try:
        return decode(source)
    except (ValueError, OSError) as e:  # truncated or corrupt past the header
        raise PyfuncInputError(f"{what} is not a readable image: {e}") from None


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
        import torch

        from instalign.predictor import Predictor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return pd.DataFrame(predict_records(self.predictor, model_input), columns=OUTPUT_COLUMNS)


OUTPUT_COLUMNS = ["mask", "no_target", "no_target_prob", "instances"]


def predict_records(predictor, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Validate every row first (so a bad row fails the request before any compute), then predict."""
    if not isinstance(frame, pd.DataFrame):
        raise PyfuncInputError(f"input must be a pandas DataFrame, got {type(frame).__name__}")
    if "text" not in frame.columns:
        raise PyfuncInputError(f"input is missing the column 'text' (columns: {list(frame.columns)})")
    if "image" not in frame.columns and "image_path" not in frame.columns:
        raise PyfuncInputError(f"input needs a column 'image' (bytes) or 'image_path' (columns: {list(frame.columns)})")
    tokenizer, max_tokens = predictor.transform.tokenizer, predictor.transform.max_tokens
    images, texts = [], []
    for row, rec in enumerate(frame.to_dict(orient="records")):
        texts.append(check_text(row, rec.get("text"), tokenizer=tokenizer, max_tokens=max_tokens))
        images.append(load_image(row, image=rec.get("image"), image_path=rec.get("image_path")))
    return [prediction_to_record(p) for p in predictor.predict_batch(images, texts)]


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


def log_model(checkpoint_dir: str | os.PathLike, *, name: str = "model", registered_model_name: str | None = None):
    """Log ``checkpoint_dir`` as an InstAlign pyfunc in the active run; returns MLflow's ``ModelInfo``."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {str(checkpoint_dir)!r}: not a directory")
    from instalign.checkpoint import checkpoint_files

    checkpoint_files(checkpoint_dir)  # refuse an incomplete checkpoint before logging anything
    # MLflow validates the input example by loading the just-saved model, which puts the
    # model's temporary code/ directory first on sys.path. Importing the predictor's modules
    # now binds ``instalign`` to this installation, so the process never half-imports a copy
    # from a directory that is deleted once logging returns.
    import instalign.predictor  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="instalign-pyfunc-") as tmp:
        model_file = Path(tmp) / "instalign_model.py"
        model_file.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_file),
            artifacts={"checkpoint": str(checkpoint_dir)},
            code_paths=[str(_REPO / "instalign"), str(_REPO / "pipelines")],
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
        )


def log_and_register(checkpoint_dir: str | os.PathLike, *, registered_model_name: str, alias: str | None = "candidate",
                     run_id: str | None = None):
    """Log the checkpoint as a pyfunc in run ``run_id`` (or a new run), register it, set ``alias``.

    Returns:
        The new ``mlflow.entities.model_registry.ModelVersion`` (``.name``, ``.version``, ``.run_id``).
    """
    from mlflow import MlflowClient

    active = mlflow.active_run()
    if active is not None and (run_id is None or active.info.run_id == run_id):
        info = log_model(checkpoint_dir, registered_model_name=registered_model_name)
    else:
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register-checkpoint",
                              nested=active is not None):
            info = log_model(checkpoint_dir, registered_model_name=registered_model_name)
    client = MlflowClient()
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    return client.get_model_version(registered_model_name, version)
