"""Image + expression → mask, no-target decision and the instances behind it (paper §3.5–3.6).

A plain class, not an ``nn.Module`` (sam2's ``SAM2ImagePredictor``): it owns a model in
eval mode, the tokenizer and the one ``GRESTransform`` that training and data preparation
use, so serving cannot drift from training (DESIGN §6.10). Inference follows the paper:

* no-target (eq. 12): ``p̂_nt > 0.5`` → the mask is empty and no instance is reported;
* otherwise the merged mask (eq. 8) ``σ(M_merged) > 0.5``, its logits upsampled from the
  stride-4 grid straight to the ORIGINAL image size (``engine.postprocess_sizes``);
* the per-instance explanation: the instances Adaptive Instance Aggregation relies on
  (relevance ``p̂_i > 0.5``, or ``p̂_i > τ`` with ``aggregation=fixed_threshold``), each with
  its own mask ``σ(ŝ_i) > 0.5`` at the original size and the words its Phrase-Object
  Alignment row ``R_K^i`` (eq. 1) attends to: sub-word tokens merged into words, special
  tokens dropped, the top-k words by summed weight. Weights are R's raw shares (not
  renormalised after dropping special tokens), so they say how much of the query's
  attention went to each word.

Letters: B batch, N queries, L tokens, H×W the stride-4 grid, h×w the original image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from instalign.config import Config
from instalign.data.images import decode_image, open_image, to_rgb
from instalign.data.transforms import GRESTransform
from instalign.engine import autocast, masks_at_sizes, postprocess_sizes, resolve_compile, resolve_precision

__all__ = ["Predictor", "Prediction", "InstancePrediction", "load_image", "ImageInput"]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray, memoryview]

log = logging.getLogger(__name__)


@dataclass
class InstancePrediction:
    """One instance the aggregation kept: the per-instance explanation."""

    index: int  # query index i in 0..N-1
    score: float  # relevance p̂_i
    mask: np.ndarray  # (h, w) bool at the original image size
    words: list[tuple[str, float]]  # top-k (word, weight) of R_K^i, heaviest first


@dataclass
class Prediction:
    """The answer for one (image, expression) pair, at the original image size."""

    mask: np.ndarray  # (h, w) bool; all False when no_target
    no_target: bool
    no_target_prob: float  # p̂_nt
    instances: list[InstancePrediction] = field(default_factory=list)  # by score, highest first
    mask_prob: Optional[np.ndarray] = None  # (h, w) float32 σ(M_merged), before the no-target rule;
    # only with Predictor(mask_prob=True)
    words: list[str] = field(default_factory=list)  # the expression's words as the model saw them


def load_image(image: ImageInput) -> Image.Image:
    """Any supported image input as an RGB ``PIL.Image``.

    Paths and bytes are user photos, so their EXIF orientation is applied (the upright view
    is what the user describes). Arrays are (h, w), (h, w, 3) or (h, w, 4), uint8 (or
    float in [0, 1]).

    Raises:
        ValueError: unreadable file or bytes, empty bytes, or an array of the wrong shape/dtype.
        TypeError: an unsupported input type.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image {str(path)!r}: no such file")
        return open_image(path, exif_transpose=True)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        return decode_image(data, source=f"image bytes ({len(data)} bytes)", exif_transpose=True)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or min(arr.shape[:2]) < 1:
            raise ValueError(f"image array: expected (h, w), (h, w, 3) or (h, w, 4), got shape {arr.shape}")
        if arr.dtype.kind == "f":
            if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0):
                raise ValueError("image array: float images must lie in [0, 1]; pass uint8 for 0..255")
            arr = np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise ValueError(f"image array: expected uint8 or float in [0, 1], got {arr.dtype}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    raise TypeError(f"image: expected a path, PIL image, numpy array or bytes, got {type(image).__name__}")


def _check_expression(expression: Any) -> str:
    if not isinstance(expression, str):
        raise ValueError(f"expression: expected a string, got {type(expression).__name__}")
    if not expression.strip():
        raise ValueError("expression is empty: describe what to segment, e.g. 'the dog on the left'")
    return expression.strip()


def _token_words(tokenizer: Any, text: str, ids: list[int]) -> tuple[list[Optional[int]], list[str]]:
    """Map each token position of ``ids`` to a word index (None: special token), and the words.

    Fast tokenizers give exact word boundaries (``word_ids`` + character offsets) when they
    reproduce ``ids``; otherwise sub-word markers decide (``Ġ``/``▁`` start a word in BPE /
    SentencePiece, ``##`` continues one in WordPiece).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, truncation=True, max_length=len(ids), return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            spans: dict[int, list[int]] = {}
            word_of: list[Optional[int]] = []
            for pos, (wid, (start, end)) in enumerate(zip(enc.word_ids(), enc["offset_mapping"])):
                if wid is None or ids[pos] in special:
                    word_of.append(None)
                    continue
                span = spans.setdefault(wid, [start, end])
                span[0], span[1] = min(span[0], start), max(span[1], end)
                word_of.append(wid)
            order = {wid: k for k, wid in enumerate(spans)}  # renumber 0..W-1 in text order
            words = [text[s:e].strip() or text[s:e] for s, e in spans.values()]
            return [None if w is None else order[w] for w in word_of], words
    tokens = tokenizer.convert_ids_to_tokens(ids)
    vocab = tokenizer.get_vocab()
    wordpiece = any(t.startswith("##") for t in vocab) and not any(t.startswith(("Ġ", "▁")) for t in vocab)
    word_of: list[Optional[int]] = []
    groups: list[list[str]] = []
    for tok_id, tok in zip(ids, tokens):
        if tok_id in special:
            word_of.append(None)
            continue
        after_special = not word_of or word_of[-1] is None
        starts = not tok.startswith("##") if wordpiece else (after_special or tok.startswith(("Ġ", "▁")))
        if starts or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
        word_of.append(len(groups) - 1)
    words = [tokenizer.convert_tokens_to_string(g).strip() for g in groups]
    return word_of, words


def _top_words(weights: Tensor, word_of: list[Optional[int]], words: list[str], k: int) -> list[tuple[str, float]]:
    """Sum R's weights (L,) over each word's tokens; the k heaviest words."""
    totals = [0.0] * len(words)
    for pos, wid in enumerate(word_of):
        if wid is not None:
            totals[wid] += float(weights[pos])
    ranked = sorted(range(len(words)), key=lambda j: -totals[j])[:k]
    return [(words[j], totals[j]) for j in ranked]


class Predictor:
    """Segment what an expression refers to; explain it by instances and words.

    Args:
        model: an InstAlign model (moved to ``device``, put in eval mode).
        cfg: the config the model was built from (image size, token budget, aggregation).
        tokenizer: the text encoder's tokenizer.
        device: where to run.
        precision: ``auto`` (bf16 autocast on a CUDA device that has it, else fp32), ``bf16``
            or ``fp32``; the weights stay as given (fp32) and autocast runs the matmuls and
            convolutions in bf16 (``engine.resolve_precision``). CPU default: fp32.
        top_words: how many words to report per instance.
        mask_prob: also return ``Prediction.mask_prob``, σ(M_merged) as float32 at the original
            size (4 bytes a pixel copied back from the device; no output of this project reads
            it, so it is off unless asked for).
        compile: ``auto`` (default: ``torch.compile`` the forward on CUDA, eager on CPU), ``True``
            or ``False`` (the off switch); ``engine.resolve_compile``. ``self.model`` stays the
            plain module. Should the compiler fail on some input, the predictor warns once and
            answers eagerly from then on: a compiler problem never fails a request.
    """

    def __init__(self, model: nn.Module, cfg: Config, tokenizer: Any, device: Union[str, torch.device, None] = None,
                 *, precision: str = "auto", top_words: int = 3, mask_prob: bool = False,
                 compile: Union[bool, str] = "auto") -> None:
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.transform = GRESTransform(image_size=cfg.model.image_size, max_tokens=cfg.model.text_encoder.max_tokens,
                                       tokenizer=tokenizer)
        self.precision = resolve_precision(precision, self.device)
        self.top_words = top_words
        self.mask_prob = bool(mask_prob)
        self.compiled = resolve_compile(compile, self.device)
        self._compiled_model = torch.compile(self.model) if self.compiled else None  # lazy: compiles on first use
        # The aggregation's own selection rule (eq. 8 weights by p̂; fixed_threshold unions p̂ > τ).
        self.instance_threshold = cfg.model.score_threshold if cfg.model.aggregation == "fixed_threshold" else 0.5

    @classmethod
    def from_checkpoint(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device, None] = None,
                        **kwargs: Any) -> "Predictor":
        """Load a checkpoint directory (``instalign.checkpoint``) fully offline."""
        from instalign.checkpoint import load_model
        from instalign.modeling.text_encoder import load_tokenizer

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        model, cfg = load_model(directory, device=device)
        return cls(model, cfg, load_tokenizer(cfg.model.text_encoder), device, **kwargs)

    def predict(self, image: ImageInput, expression: str) -> Prediction:
        """Segment ``expression`` in ``image`` (path, PIL image, numpy array or encoded bytes)."""
        return self.predict_batch([image], [expression], batch_size=1)[0]

    def predict_batch(self, images: Sequence[ImageInput], expressions: Sequence[str],
                      batch_size: int = 16) -> list[Prediction]:
        """``predict`` for many pairs, ``batch_size`` at a time through the model."""
        if isinstance(expressions, str):
            raise ValueError("expressions: expected a sequence of strings, got one string")
        if len(images) != len(expressions):
            raise ValueError(f"predict_batch: {len(images)} images but {len(expressions)} expressions")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = [_check_expression(e) for e in expressions]
        out: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            pictures = [load_image(im) for im in images[start:start + batch_size]]
            out.extend(self._run(pictures, texts[start:start + batch_size]))
        return out

    def _forward(self, *inputs: Tensor) -> Any:
        """The model's forward, compiled when ``self.compiled``; eager for good if compiling fails."""
        if self._compiled_model is not None:
            try:
                return self._compiled_model(*inputs)
            except torch._dynamo.exc.TorchDynamoException as e:  # the compiler's failure, not the input's
                log.warning("torch.compile failed (%s: %s); this predictor runs eagerly from now on",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self._compiled_model, self.compiled = None, False
        return self.model(*inputs)

    def _upload(self, host: Tensor) -> Tensor:
        """Host → device without blocking the host: pinned and asynchronous on CUDA."""
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def _run(self, pictures: list[Image.Image], texts: list[str]) -> list[Prediction]:
        """One batch: uint8 pixels up, everything after the forward on the device, and host
        copies per batch, not per sample: one for the decisions, merged masks and word weights,
        one more for the kept instances' masks when any is kept (which instances, and so how
        many maps to upsample, is only known from the first copy)."""
        sizes = [(p.height, p.width) for p in pictures]
        pixels = torch.from_numpy(np.stack([self.transform.image_uint8(p) for p in pictures]))  # (B, S, S, 3) uint8
        images = self.transform.normalize(self._upload(pixels))  # (B, 3, S, S) float32, on the device
        input_ids, attention_mask = self.transform.tokenize(texts)  # (B, L) each, host
        with autocast(self.device, self.precision):
            outputs = self._forward(images, self._upload(input_ids), self._upload(attention_mask))
        masks, no_target, merged_prob, nt_prob = postprocess_sizes(outputs, sizes)
        scores = outputs.final.score_logits.float().sigmoid()  # (B, N)
        keep = (scores > self.instance_threshold) & ~no_target[:, None]  # (B, N): the instances reported
        probs = merged_prob if self.mask_prob else []  # full-size fp32 maps: copied only when asked for
        # Floats first: every array then starts at a multiple of its item size in the one buffer.
        host = to_host([nt_prob, scores, outputs.final.phrase_weights.float(), *probs, no_target, keep, *masks])
        nt_prob_h, scores_h, weights_h = host[:3]
        probs_h = host[3:3 + len(probs)]
        no_target_h, keep_h, *masks_h = host[3 + len(probs):]
        # Kept queries of each sample, highest score first (ties by query index, as a stable sort).
        kept = [sorted(np.flatnonzero(keep_h[b]).tolist(), key=lambda i, b=b: -float(scores_h[b, i]))
                for b in range(len(sizes))]
        pairs = [(b, i) for b in range(len(sizes)) for i in kept[b]]
        logits = outputs.final.mask_logits
        instance_masks = to_host(masks_at_sizes([logits[b, i] for b, i in pairs], [sizes[b] for b, _ in pairs]))
        mask_of = dict(zip(pairs, instance_masks))
        results = []
        for b, text in enumerate(texts):
            real = attention_mask[b].bool()  # (L,): padding is never a word
            word_of, words = _token_words(self.tokenizer, text, input_ids[b][real].tolist())
            real_weights = weights_h[b][:, real.numpy()]  # (N, L_real)
            instances = [InstancePrediction(index=i, score=float(scores_h[b, i]), mask=mask_of[b, i],
                                            words=_top_words(real_weights[i], word_of, words, self.top_words))
                         for i in kept[b]]
            results.append(Prediction(mask=masks_h[b], no_target=bool(no_target_h[b]),
                                      no_target_prob=float(nt_prob_h[b]), instances=instances,
                                      mask_prob=probs_h[b] if probs_h else None, words=words))
        return results


def to_host(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    """Device tensors → NumPy arrays (same shapes and dtypes) in ONE device→host copy.

    Why: on a GPU each copy back blocks the host until the device has caught up; copying a
    batch's many small results one by one made the host wait once per value. The tensors'
    bytes are laid end to end on the device (``view(torch.uint8)``: no conversion), copied
    once, and cut apart on the host. The arrays are views of that one buffer. No copy at all
    for an empty list.
    """
    if not tensors:
        return []
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    buffer = torch.cat(flat).cpu().numpy()
    out, offset = [], 0
    for t, f in zip(tensors, flat):
        n = f.numel()
        out.append(buffer[offset:offset + n].view(_NUMPY_DTYPES[t.dtype]).reshape(tuple(t.shape)))
        offset += n
    return out


_NUMPY_DTYPES = {torch.float32: np.float32, torch.bool: np.bool_, torch.uint8: np.uint8, torch.int64: np.int64}
