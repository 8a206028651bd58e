"""Batch prediction's model stage (``pipelines.inference.batch``): decoded rows in, answers out.

:class:`ModelStage` is a callable class: ``map_batches`` runs it as an actor pool whose actors
(GPU or CPU) each build the ``Predictor`` once. It gets rows the decode stage
(``pipelines.inference.decode``) has already read, checked and decoded, checks each text's
token count with the serving boundary's own function (``pipelines.models.pyfunc.check_text_tokens``:
it needs the model's tokenizer), predicts the good rows of the batch together (paper §3.6:
eqs. 1, 8, 12) and hands on the masks bit-packed; the encode stage
(``pipelines.inference.encode``) turns them into RLE records off this process. A rejected row
passes through with its reason: a bad row never fails the job.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from instalign.predictor import Predictor
from pipelines.inference.decode import text_rejected
from pipelines.inference.encode import pack_mask
from pipelines.inference.tables import PREDICTED_SCHEMA
from pipelines.models.pyfunc import PyfuncInputError, check_text_tokens
from pipelines.models.source import materialise

#: Reasons the decode stage gives that a too-long text would have come before (text is checked first).
_IMAGE_REASONS = frozenset({"missing_image", "unreadable_image", "image_too_large", "unsupported_image_format"})


class ModelStage:
    """Ray Data callable class: ``DECODED_SCHEMA`` rows in, ``PREDICTED_SCHEMA`` rows out, in order.

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

    def _token_refusal(self, row: dict[str, Any]):
        """The row's text refused for its token count, as a reject; None when it fits."""
        try:
            check_text_tokens(row["row_id"], row["text"], tokenizer=self.predictor.tokenizer,
                              max_tokens=self.predictor.transform.max_tokens)
        except PyfuncInputError as e:
            return text_rejected(row["row_id"], row["text"], e)
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns(["pixels"]).to_pylist()
        pixels = batch.column("pixels").to_pylist()
        good, pictures = [], []
        for k, row in enumerate(rows):
            if row["status"] == "rejected" and row["reason"] not in _IMAGE_REASONS:
                continue
            refusal = self._token_refusal(row)  # the text's problem is named first, as before the split
            if refusal is not None:
                row.update(status="rejected", reason=refusal.reason, detail=refusal.detail)
            elif row["status"] == "ok":
                good.append(k)
                shape = (row["height"], row["width"], 3)
                pictures.append(Image.fromarray(np.frombuffer(pixels[k], np.uint8).reshape(shape)))
        predictions = self.predictor.predict_batch(pictures, [rows[k]["text"] for k in good],
                                                   batch_size=max(1, len(pictures)))
        for k, prediction in zip(good, predictions):
            instances = prediction.instances
            rows[k].update(
                mask_bits=pack_mask(prediction.mask), no_target=bool(prediction.no_target),
                no_target_prob=float(prediction.no_target_prob),
                inst_query=[int(i.index) for i in instances], inst_score=[float(i.score) for i in instances],
                inst_bits=[pack_mask(i.mask) for i in instances],
                inst_words=[[str(w) for w, _ in i.words] for i in instances],
                inst_weights=[[float(x) for _, x in i.words] for i in instances])
        return pa.Table.from_pylist(rows, schema=PREDICTED_SCHEMA)
