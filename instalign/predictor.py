"""Image + expression → mask, no-target decision and the instances behind it (paper §3.5–3.6).

A plain class, not an ``nn.Module`` (sam2's ``SAM2ImagePredictor``): it owns a model in
eval mode, the tokenizer and the one ``GRESTransform`` that training and data preparation
use, so serving cannot drift from training (DESIGN §6.10). Inference follows the paper:

* no-target (eq. 12): ``p̂_nt > 0.5`` → the mask is empty and no instance is reported;
* otherwise the merged mask (eq. 8) ``σ(M_merged) > 0.5``, its logits upsampled from the
  stride-4 grid straight to the ORIGINAL image size (``engine.postprocess``);
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

import dataclasses
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
from instalign.engine import autocast, postprocess, resolve_precision

__all__ = ["Predictor", "Prediction", "InstancePrediction", "load_image", "ImageInput"]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray, memoryview]


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
    mask_prob: Optional[np.ndarray] = None  # (h, w) float32 σ(M_merged), before the no-target rule
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
        device: where to run; bf16 autocast on CUDA (``precision="auto"``).
        top_words: how many words to report per instance.
    """

    def __init__(self, model: nn.Module, cfg: Config, tokenizer: Any, device: Union[str, torch.device, None] = None,
                 *, precision: str = "auto", top_words: int = 3) -> None:
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.transform = GRESTransform(image_size=cfg.model.image_size, max_tokens=cfg.model.text_encoder.max_tokens,
                                       tokenizer=tokenizer)
        self.precision = resolve_precision(precision, self.device)
        self.top_words = top_words
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

    @torch.inference_mode()
    def _run(self, pictures: list[Image.Image], texts: list[str]) -> list[Prediction]:
        images = torch.stack([self.transform.image(p) for p in pictures]).to(self.device)  # (B, 3, S, S)
        input_ids, attention_mask = self.transform.tokenize(texts)  # (B, L) each
        with autocast(self.device, self.precision):
            outputs = self.model(images, input_ids.to(self.device), attention_mask.to(self.device))
        scores = outputs.final.score_logits.float().sigmoid()  # (B, N)
        results = []
        for b, (picture, text) in enumerate(zip(pictures, texts)):
            w, h = picture.size
            one = dataclasses.replace(outputs, merged_logits=outputs.merged_logits[b:b + 1],
                                      no_target_logits=outputs.no_target_logits[b:b + 1])
            mask, no_target, merged_prob, nt_prob = postprocess(one, (h, w))
            real = attention_mask[b].bool()  # (L,): padding is never a word
            ids = input_ids[b][real].tolist()
            word_of, words = _token_words(self.tokenizer, text, ids)
            instances = []
            if not bool(no_target[0]):
                keep = (scores[b] > self.instance_threshold).nonzero().flatten().tolist()
                if keep:
                    weights = outputs.final.phrase_weights[b, keep].float().cpu()[:, real.cpu()]  # (k, L_real)
                    for j, i in enumerate(keep):
                        # One instance at a time: k float (h, w) maps at once would cost k·h·w·4 bytes
                        # (GBs for a photo with many kept queries); this keeps the peak at one map.
                        logits = outputs.final.mask_logits[b, i:i + 1].float()  # (1, H, W)
                        mask_i = self.transform.resize_mask_to(logits, (h, w))[0] > 0  # (h, w): σ(ŝ_i) > 0.5
                        instances.append(InstancePrediction(
                            index=i, score=float(scores[b, i]), mask=mask_i.cpu().numpy(),
                            words=_top_words(weights[j], word_of, words, self.top_words)))
                instances.sort(key=lambda inst: -inst.score)
            results.append(Prediction(
                mask=mask[0].cpu().numpy(), no_target=bool(no_target[0]), no_target_prob=float(nt_prob[0]),
                instances=instances, mask_prob=merged_prob[0].cpu().numpy().astype(np.float32), words=words))
        return results
