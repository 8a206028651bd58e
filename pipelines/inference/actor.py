"""The Ray Data actor of batch prediction (``pipelines.inference.batch``): rows in, answers out.

:class:`BatchPredictor` is a callable class: ``map_batches`` runs it as an actor pool whose
actors (GPU or CPU) each build the ``Predictor`` once. An actor checks every row with the
serving boundary's own functions (``pipelines.models.pyfunc``: ``check_text``, ``image_size``,
``decode_image``; files capped at ``pyfunc.MAX_FILE_BYTES`` like ``instalign predict --image``),
predicts the good rows of the batch together (paper §3.6: eqs. 1, 8, 12) and marks the others
rejected with a reason code. A bad row never fails the job.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from instalign.data.masks import rle_decode
from instalign.metrics import GRESMetrics
from instalign.predictor import Predictor
from pipelines.inference.tables import ACTOR_SCHEMA, BatchPredictError
from pipelines.models.limits import FileTooLarge, read_regular_file
from pipelines.models.pyfunc import MAX_FILE_BYTES, PyfuncInputError, check_text, decode_image, image_size
from pipelines.models.records import prediction_to_record
from pipelines.models.source import materialise

def _read_image_file(what: str, path: str) -> bytes:
    """A local file or a ``pyarrow.fs`` URI, at most ``pyfunc.MAX_FILE_BYTES`` (regular files only)."""
    try:
        if "://" not in path or path.startswith("file://"):
            return read_regular_file(path.removeprefix("file://"), MAX_FILE_BYTES)
        fs, inner = pafs.FileSystem.from_uri(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        if info.type != pafs.FileType.File:
            raise OSError("not a regular file")
        if info.size is not None and info.size > MAX_FILE_BYTES:
            raise FileTooLarge(path, info.size, MAX_FILE_BYTES)
        with fs.open_input_stream(inner) as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise FileTooLarge(path, len(data), MAX_FILE_BYTES)
        return data
    except FileNotFoundError:
        raise _Rejected("missing_image", f"{what} does not exist") from None
    except FileTooLarge as e:
        raise _Rejected("image_too_large", f"{what} is {e.size} bytes, above the limit of {e.limit}") from None
    except (OSError, pa.ArrowException, ValueError) as e:
        raise _Rejected("unreadable_image", f"{what} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    except PyfuncInputError as e:  # pragma: no cover - read_regular_file raises none today
        raise _Rejected("unreadable_image", str(e)) from None


class _Rejected(Exception):
    """A row that cannot be predicted: ``reason`` (a short code) and ``detail`` (the message)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class BatchPredictor:
    """Ray Data callable class: :data:`INPUT_SCHEMA` rows in, ``ACTOR_SCHEMA`` rows out.

    Args:
        checkpoint: ``[ObjectRef]`` of the checkpoint payload (a list, so Ray hands over the
            reference) or a local checkpoint directory.
        device: ``"cuda"`` or ``"cpu"``.
        top_words: words reported per instance.
    """

    def __init__(self, *, checkpoint: Any, device: str, top_words: int = 3) -> None:
        if isinstance(checkpoint, list):
            self._local = materialise(ray.get(checkpoint[0]))  # removed with the actor
            directory = self._local.name
        else:
            directory = checkpoint
        self.predictor = Predictor.from_checkpoint(directory, device=device, top_words=top_words)

    def _check(self, row: dict[str, Any]):
        """Row → (decoded image, text); raises :class:`_Rejected` with the first problem found."""
        what = f"row {row['row_id']}"
        try:
            text = check_text(row["row_id"], row["text"], tokenizer=self.predictor.tokenizer,
                              max_tokens=self.predictor.transform.max_tokens)
        except PyfuncInputError as e:
            empty = not isinstance(row["text"], str) or not row["text"].strip()
            raise _Rejected("empty_text" if empty else "text_too_long", str(e)) from None
        if row["image"]:
            data, what = row["image"], f"{what}: image bytes"
        elif row["image_path"]:
            what = f"{what}: image_path {row['image_path']!r}"
            data = _read_image_file(what, row["image_path"])
        else:
            raise _Rejected("missing_image", f"{what}: no image bytes and no image_path")
        try:
            image_size(what, data)
            return decode_image(what, data), text
        except PyfuncInputError as e:  # its reason: unsupported_image_format, image_too_large, unreadable_image
            raise _Rejected(getattr(e, "reason", "unreadable_image"), str(e)) from None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[Optional[dict[str, Any]]] = [None] * len(rows)
        good, pictures, texts = [], [], []
        for k, row in enumerate(rows):
            base = {"row_id": row["row_id"], "image_path": row["image_path"], "text": row["text"]}
            try:
                picture, text = self._check(row)
            except _Rejected as e:
                out[k] = {**base, "status": "rejected", "reason": e.reason, "detail": e.detail}
                continue
            good.append(k)
            pictures.append(picture)
            texts.append(text)
        predictions = self.predictor.predict_batch(pictures, texts, batch_size=max(1, len(pictures)))
        for k, picture, prediction in zip(good, pictures, predictions):
            row = rows[k]
            w, h = picture.size
            record = prediction_to_record(prediction)
            result = {"row_id": row["row_id"], "image_path": row["image_path"], "text": row["text"], "width": w,
                      "height": h, **record, "gt_no_target": row["gt_no_target"], "iou": None, "status": "ok"}
            if row["gt_mask"] is not None:
                try:  # a mask that does not fit its image: the prepared split is damaged, name the row
                    gt = rle_decode(row["gt_mask"], h, w)
                except ValueError as e:
                    raise BatchPredictError(f"row {row['row_id']}: ground truth mask: {e}") from None
                if gt.shape != prediction.mask.shape:
                    raise BatchPredictError(f"row {row['row_id']}: ground truth is {gt.shape}, the image "
                                            f"{prediction.mask.shape}")
                metrics = GRESMetrics()
                metrics.update(prediction.mask[None], np.asarray([prediction.no_target]), gt[None],
                               np.asarray([bool(row["gt_no_target"])]), [row.get("gt_num_targets")]
                               if row.get("gt_num_targets") is not None else None)
                state = metrics.state_dict()
                result["iou"] = float(state["iou_sum"])  # this sample's IoU, ReLA's no-target convention
                result["metric_state"] = json.dumps(state)
            out[k] = result
        return pa.Table.from_pylist(out, schema=ACTOR_SCHEMA)
