"""The one input transform: resize, normalise, tokenise (DESIGN §2 input, §6.10).

Ray Data prepare/loading, the plain PyTorch dataset, the predictor and the MLflow pyfunc all
call the same :class:`GRESTransform`, so what the model sees in training and in serving
cannot drift apart (sam2's predictor owns its transforms the same way).

Choices, following ReLA (the gRefCOCO authors' code, DESIGN §2):

* images: a *plain* resize to ``S × S`` (aspect ratio not kept), PIL bilinear (which
  antialiases when shrinking, as detectron2's ``ResizeTransform`` that ReLA uses);
  normalised with ImageNet mean/std on the [0, 1] scale;
* masks: nearest neighbour, pixel-centre aligned (as PIL ``NEAREST`` and torch
  ``nearest-exact``), so image and mask resizes sample the same grid;
* text: the encoder's tokenizer, special tokens added, truncated and padded to
  ``max_tokens`` tokens, special tokens included. 20 is ReLA's budget, adopted where the
  paper is silent (not a number taken from the paper): ReLA's ``REFERRING.MAX_TOKENS = 20``
  (``gres_model/config.py``), applied in ``RefCOCOMapper.__call__``
  (``gres_model/data/dataset_mappers/refcoco_mapper.py``). One difference: ReLA cuts
  ``encode(..., add_special_tokens=True)[:20]``, so an over-long expression loses its
  closing ``[SEP]``; the Hugging Face truncation used here drops words and keeps both
  ``<s>`` and ``</s>``. The attention mask marks real tokens, the two special tokens
  included (``docs/model.md``, "Where we differ from Mask2Former and ReLA");
* predictions back to an original ``(h, w)``: bilinear on probabilities (ReLA's
  ``sem_seg_postprocess``), nearest on boolean masks.

Letters: B batch, M instances, L tokens, S the square input side, H/W and h/w sizes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from instalign.data.images import to_rgb
from instalign.data.masks import resize_mask_nearest

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "GRESTransform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GRESTransform:
    """Image/mask/text preprocessing shared by every path into the model.

    Args:
        image_size: side ``S`` of the square model input (480 in the paper).
        max_tokens: ``L``, token budget including special tokens (20: ReLA's ``MAX_TOKENS``,
            not the paper's).
        tokenizer: any Hugging Face tokenizer with a pad token (``None``: images only).
        mean, std: per-channel normalisation on the [0, 1] scale.
    """

    def __init__(
        self,
        *,
        image_size: int,
        max_tokens: int,
        tokenizer: Any | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3 (special tokens + one word), got {max_tokens}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must have 3 entries and std > 0, got {mean}, {std}")
        if tokenizer is not None and tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; set one before use")
        self.image_size = int(image_size)
        self.max_tokens = int(max_tokens)
        self.tokenizer = tokenizer
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # x_norm = (x / 255 - mean) / std = x * scale + bias, folded once.
        std_arr = np.asarray(self.std, dtype=np.float32)
        self._scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self._bias = (-np.asarray(self.mean, dtype=np.float32) / std_arr).astype(np.float32)

    def __repr__(self) -> str:
        tok = type(self.tokenizer).__name__ if self.tokenizer is not None else None
        return f"GRESTransform(image_size={self.image_size}, max_tokens={self.max_tokens}, tokenizer={tok})"

    @property
    def draft_size(self) -> tuple[int, int]:
        """What :func:`instalign.data.images.decode_image` may draft-decode JPEGs down to."""
        return (self.image_size, self.image_size)

    # ----------------------------------------------------------------- images
    def image_uint8(self, img: Image.Image) -> np.ndarray:
        """``(S, S, 3)`` uint8: the resized RGB image, for loaders that normalise on the device."""
        img = to_rgb(img)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)

    def image(self, img: Image.Image) -> Tensor:
        """``(3, S, S)`` float32, normalised: what the model's ``images`` input holds."""
        hwc = self.image_uint8(img)
        # CHW uint8 first (a 1-byte copy), then one fused float pass: ~5x faster than torch
        # permute→float on a strided view for a 480² image on CPU.
        chw = np.ascontiguousarray(hwc.transpose(2, 0, 1)).astype(np.float32)
        chw *= self._scale[:, None, None]
        chw += self._bias[:, None, None]
        return torch.from_numpy(chw)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``(B, S, S, 3)`` or ``(B, 3, S, S)`` → float32 normalised ``(B, 3, S, S)``.

        Runs on the tensor's device, so a loader can ship uint8 (4x fewer bytes) and
        normalise on the GPU. Channels-last is recognised by a trailing dim of 3.
        """
        if images.ndim != 4:
            raise ValueError(f"normalize expects a 4-D batch, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)  # (B, S, S, 3) → (B, 3, S, S)
        elif images.shape[1] != 3:
            raise ValueError(f"normalize expects 3 channels first or last, got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"normalize expects uint8 pixels (0..255), got {images.dtype}")
        # The same float32 steps as ``image`` (x·scale, then +bias, each rounded once): equal to
        # it bit for bit on CPU. CHW uint8 first (a 1-byte copy), then the float pass in place.
        out = images.contiguous().float()
        out.mul_(self._per_channel(self._scale, images.device)).add_(self._per_channel(self._bias, images.device))
        return out

    @staticmethod
    def _per_channel(values: np.ndarray, device: torch.device) -> Tensor:
        """(1, 3, 1, 1) float32 made on ``device`` by fills: no host→device copy, which on a GPU
        would block the host twice per batch."""
        fills = [torch.full((), float(v), dtype=torch.float32, device=device) for v in values]
        return torch.stack(fills).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ masks
    def masks(self, masks: np.ndarray) -> Tensor:
        """bool ``(M, h, w)`` → bool ``(M, S, S)`` (nearest, pixel-centre aligned). M may be 0."""
        if masks.ndim != 3:
            raise ValueError(f"masks expects (M, h, w), got shape {masks.shape}")
        out = resize_mask_nearest(masks.astype(bool, copy=False), self.image_size, self.image_size)
        return torch.from_numpy(np.ascontiguousarray(out))

    @staticmethod
    def resize_mask_to(mask: Tensor, size: tuple[int, int]) -> Tensor:
        """Map a prediction ``(H, W)`` or ``(B, H, W)`` back to ``size=(h, w)``.

        Float input (probabilities or logits) is resized bilinearly and stays float — threshold
        afterwards, as ReLA does; bool input is resized nearest and stays bool.
        """
        if mask.ndim not in (2, 3):
            raise ValueError(f"resize_mask_to expects (H, W) or (B, H, W), got shape {tuple(mask.shape)}")
        x = mask[None, None] if mask.ndim == 2 else mask[:, None]  # → (B, 1, H, W)
        if mask.dtype == torch.bool:
            out = F.interpolate(x.to(torch.uint8), size=tuple(size), mode="nearest-exact").bool()
        else:
            out = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return out[0, 0] if mask.ndim == 2 else out[:, 0]

    # ------------------------------------------------------------------- text
    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``texts`` → ``(input_ids (B, L) long, attention_mask (B, L) long)``, L = max_tokens."""
        if self.tokenizer is None:
            raise ValueError("this GRESTransform was built without a tokenizer")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenize expects a list of strings")
        if not texts:
            empty = torch.zeros((0, self.max_tokens), dtype=torch.long)
            return empty, empty.clone()
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_tokens,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()
