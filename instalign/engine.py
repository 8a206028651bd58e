"""The plain training and evaluation loops (DESIGN §6.7) and inference post-processing (§1).

One explicit loop in pure PyTorch, no Trainer class and no callback framework (torchtune's
recipes, nanoGPT's ``train.py``): batches in, a ``report(metrics, step)`` callable out.
Ray Train wraps these functions in ``pipelines/training/train.py``; the tests and the laptop
quickstart call them with a list of batches.

Post-processing follows the paper's inference rule (§3.6, eqs. 8 and 12): if the no-target
probability p̂_nt > 0.5 the output mask is empty; otherwise the merged mask M_merged > 0.5,
upsampled to the evaluation size. Letters: B batch, N queries, L tokens, H×W the stride-4
mask grid, S the square input side.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from instalign.data.batch import Batch
from instalign.data.transforms import GRESTransform
from instalign.metrics import GRESMetrics, NoTargetScores
from instalign.modeling.outputs import BlockPrediction, InstAlignOutput

__all__ = ["resolve_precision", "resolve_compile", "autocast", "train_one_epoch", "postprocess", "postprocess_sizes",
           "masks_at_sizes", "size_chunks", "upsample_budget", "evaluate", "forward_batch"]

Report = Callable[[dict, int], None]


def resolve_precision(cfg_precision: str, device: Union[torch.device, str]) -> str:
    """``auto`` → ``bf16`` on a CUDA device that supports it, else ``fp32``.

    An explicit ``bf16`` is honoured on any device (CPU autocast exists, just slow); on a
    CUDA device without bf16 support it is an error rather than a silent fp32 run.
    """
    device = torch.device(device)
    if cfg_precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision={cfg_precision!r}: expected one of ['auto', 'bf16', 'fp32']")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cfg_precision == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if cfg_precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"precision='bf16' requested but {device} does not support bfloat16")
    return cfg_precision


def resolve_compile(setting: Union[bool, str], device: Union[torch.device, str]) -> bool:
    """Whether to ``torch.compile`` the model on ``device``: ``auto`` → on CUDA only; a bool forces it.

    Why CUDA only by default: there compiling fuses the elementwise glue around the matmuls into
    few kernels, and a run is long enough to repay the compile time; on CPU compiling costs a
    large share of a short run, and the quickstart's figures are those of the eager model.
    Used by training and validation (``train.compile``) and by the ``Predictor`` (``compile=``).
    """
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return torch.device(device).type == "cuda"
    raise ValueError(f"compile={setting!r}: expected True, False or 'auto'")


def autocast(device: Union[torch.device, str], precision: str):
    """The forward-pass context: bf16 autocast (DESIGN §2) or nothing for fp32."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision={precision!r}: call resolve_precision first ('bf16' or 'fp32')")
    return nullcontext()


def _to_fp32(outputs: InstAlignOutput) -> InstAlignOutput:
    """Cast the floating tensors of the outputs to fp32 (autograd flows through the cast),
    except the blocks' (B, N, H, W) mask logits.

    Why: the criterion's BCE/dice run in fp32 whatever the forward used (Mask2Former
    computes its losses in fp32); under autocast the heads may return bf16. The blocks'
    mask logits are the exception: all K of them in fp32 would be ~1.6 GiB at the paper
    preset, and the matcher and criterion only read them at sampled points, which they do
    in the logits' own dtype, upcasting the (small) samples (``losses.point_sampling``).
    """

    def cast(x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float32:
            return x.float()
        if isinstance(x, BlockPrediction):
            return dataclasses.replace(x, **{f.name: getattr(x, f.name) if f.name == "mask_logits"
                                             else cast(getattr(x, f.name)) for f in dataclasses.fields(x)})
        if isinstance(x, list):
            return [cast(v) for v in x]
        return x

    return dataclasses.replace(outputs, **{f.name: cast(getattr(outputs, f.name)) for f in dataclasses.fields(outputs)})


def forward_batch(model: nn.Module, batch: Batch, *, device: Union[torch.device, str],
                  precision: str) -> InstAlignOutput:
    """Run the model on an (already moved) ``batch`` under ``precision``; return fp32 outputs."""
    with autocast(device, precision):
        outputs = model(batch.images, batch.input_ids, batch.attention_mask)
    return _to_fp32(outputs) if precision != "fp32" else outputs


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The decoder's learning rate (``lr_mult == 1``), i.e. the configured ``train.lr`` schedule."""
    groups = optimizer.param_groups
    base = [g for g in groups if g.get("lr_mult", 1.0) == 1.0] or groups
    return float(base[0]["lr"])


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[..., dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterable[Batch],
    *,
    device: Union[torch.device, str],
    precision: str,
    grad_clip: float,
    report: Report,
    step: int = 0,
    max_steps: int = 0,
    log_every: int = 10,
    grad_accum_steps: int = 1,
) -> int:
    """Run one pass over ``batches``: forward, eq. 13 loss, backward, clip, step, schedule.

    Args:
        criterion: returns a flat dict with ``loss`` (the weighted total of eq. 13) and
            named terms; every tensor term is averaged over the log window and reported
            under its own name. With ``grad_accum_steps > 1`` it is called as
            ``criterion(outputs, batch, num_masks=..., micro_batches=...)`` (``Criterion``).
        scheduler: stepped once per optimizer step (``None`` for a constant lr).
        precision: ``bf16`` (autocast) or ``fp32``; see :func:`resolve_precision`.
        grad_clip: max global gradient norm (0 = no clipping; the norm is still reported).
        report: called as ``report(metrics, step)`` every ``log_every`` steps and once at the
            end of the epoch for a partial window; metrics are the window means of the
            loss terms plus ``lr``, ``grad_norm`` (the global norm *before* clipping),
            ``grad_clipped`` (the share of the window's steps whose norm exceeded
            ``grad_clip``: 1.0 means every step was clipped; 0 without clipping) and
            ``samples_per_s``.
        step: the global optimizer step before this epoch.
        max_steps: stop once the global step reaches it (0 = no cap).
        grad_accum_steps: micro-batches per optimizer step (``train.grad_accum_steps``):
            their gradients are summed (under DDP synchronised on the last one only,
            ``model.no_sync()``) and stepped once; ``step``, ``max_steps``, ``log_every``
            and the scheduler count optimizer steps. The eq. 7 normaliser is the whole
            accumulated batch's (:func:`_accumulated_num_masks`) and the per-sample means
            are divided by the number of micro-batches, so the step's gradient and logged
            losses equal one batch of all the micro-batches (docs/objective.md).

    Returns:
        The global step after this epoch.

    Host-device syncs happen at log points only (one per report: every window mean read
    back at once): per-step terms are summed as detached device tensors.
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    device = torch.device(device)
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    window: dict[str, Tensor] = {}
    window_steps = window_samples = 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal window, window_steps, window_samples, t0
        sums = torch.stack(list(window.values())).tolist() if window else []  # one device→host copy
        metrics = {k: float(v) / window_steps for k, v in zip(window, sums)}
        bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])]
        if bad:
            raise FloatingPointError(f"non-finite {bad} in the {window_steps} steps before step {step}: {metrics}")
        metrics["lr"] = _current_lr(optimizer)
        metrics["samples_per_s"] = window_samples / max(time.perf_counter() - t0, 1e-9)
        report(metrics, step)
        window, window_steps, window_samples = {}, 0, 0
        t0 = time.perf_counter()

    def add(name: str, value: Tensor) -> None:
        window[name] = window[name] + value if name in window else value

    batches = iter(batches)
    while True:
        first = next(batches, None)
        if first is None or (max_steps and step >= max_steps):
            break
        group = [first, *itertools.islice(batches, grad_accum_steps - 1)]
        extra = {} if grad_accum_steps == 1 else {"num_masks": _accumulated_num_masks(group, device),
                                                  "micro_batches": len(group)}
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(group):
            batch = batch.to(device, non_blocking=True)
            last = i == len(group) - 1
            with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                outputs = forward_batch(model, batch, device=device, precision=precision)
                losses = criterion(outputs, batch, **extra)
                if "loss" not in losses:
                    raise KeyError(f"criterion returned {sorted(losses)}: the weighted total 'loss' is missing")
                losses["loss"].backward()
            for name, value in losses.items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    add(name, value.detach().float().reshape(()))
            window_samples += len(batch)
        # Both return the global norm before clipping as a device tensor: no sync here.
        if grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        clipped = (grad_norm.detach() > grad_clip).float() if grad_clip > 0 else torch.zeros((), device=device)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        add("grad_norm", grad_norm.detach().float())
        add("grad_clipped", clipped)
        window_steps += 1
        if step % log_every == 0:
            flush()
    if window_steps:
        flush()
    return step


def _accumulated_num_masks(group: list[Batch], device: torch.device) -> Union[Tensor, float]:
    """The eq. 7 normaliser of an accumulated step: instances of ALL its micro-batches,
    averaged across workers (one ``all_reduce`` under DDP) and clamped to ≥ 1.

    Counted from the masks' shapes (host metadata: no sync) before the first micro-batch's
    loss, which needs it.
    """
    from instalign.losses.criterion import average_num_masks

    return average_num_masks(sum(int(m.shape[0]) for b in group for m in b.instance_masks), device)


def postprocess(outputs: InstAlignOutput, size: Union[int, tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Paper inference (§3.6): empty mask when p̂_nt > 0.5, else σ(M_merged) > 0.5 at ``size``.

    The merged *logits* are upsampled bilinearly (``GRESTransform.resize_mask_to``, the one
    transform shared with training and serving) before the sigmoid, as Mask2Former's
    inference does (thresholding the logit at 0 ≡ the probability at 0.5).

    Args:
        outputs: the model's output; ``merged_logits`` (B, H, W), ``no_target_logits`` (B,).
        size: S for a square (S, S) output, or an explicit (height, width).

    Returns:
        masks (B, h, w) bool, no_target (B,) bool, merged_prob (B, h, w) float32 (σ of the
        upsampled logits, before the no-target rule), no_target_prob (B,) float32.
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    logits = outputs.merged_logits.float()  # (B, H, W)
    if tuple(logits.shape[-2:]) != hw:
        logits = GRESTransform.resize_mask_to(logits, hw)  # (B, h, w), bilinear: the transform's own post-step
    merged_prob = logits.sigmoid()
    no_target_prob = outputs.no_target_logits.float().sigmoid()  # (B,)
    no_target = no_target_prob > 0.5
    masks = (merged_prob > 0.5) & ~no_target[:, None, None]
    return masks, no_target, merged_prob, no_target_prob


#: Output pixels one upsampling step (and the sigmoid/threshold passes after it) may hold, by
#: device type. Batches of large photos are cut into steps below it, so batching keeps the old
#: one-map-at-a-time peak memory within a constant instead of multiplying it by the batch size.
#: CPU: 2**19 (2 MiB fp32, one 640×480 map): its passes are memory-bound, and whole-batch steps
#: fell out of cache (8 maps at 640×480 post-processed at once: 19 ms against 11 ms one by one;
#: 64 instance maps in 2**25 steps: 80 ms against 42 ms). GPU: 2**24 (64 MiB), a 640×480 batch
#: of 16 in one step: a few kernel launches, not a few per sample.
UPSAMPLE_BUDGET = {"cpu": 1 << 19, "cuda": 1 << 24}


def upsample_budget(device: Union[torch.device, str]) -> int:
    """:data:`UPSAMPLE_BUDGET` for ``device`` (a GPU's for any device type not listed)."""
    return UPSAMPLE_BUDGET.get(torch.device(device).type, UPSAMPLE_BUDGET["cuda"])


def size_chunks(sizes: Sequence[tuple[int, int]], budget: int) -> list[tuple[tuple[int, int], list[int]]]:
    """Positions of ``sizes`` grouped by equal ``(h, w)`` (first-seen order), each group cut into
    chunks of at most ``budget`` output pixels (at least one position per chunk).

    Why groups and not pad+crop: bilinear upsampling samples the source grid at steps set by
    the *output* size, so upsampling to a padded size and cropping would change the answer.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for pos, (h, w) in enumerate(sizes):
        groups.setdefault((int(h), int(w)), []).append(pos)
    chunks = []
    for (h, w), positions in groups.items():
        step = max(1, budget // max(1, h * w))
        chunks.extend(((h, w), positions[i:i + step]) for i in range(0, len(positions), step))
    return chunks


def postprocess_sizes(outputs: InstAlignOutput, sizes: Sequence[tuple[int, int]], *,
                      budget: Optional[int] = None) -> tuple[list[Tensor], Tensor, list[Tensor], Tensor]:
    """:func:`postprocess` for a batch whose samples have different sizes (the predictor's
    original image sizes), all on the device and without a host sync.

    Samples of one size go through ``postprocess`` together (:func:`size_chunks`; ``budget``:
    :func:`upsample_budget` of the logits' device), so every answer is the one ``postprocess``
    gives that sample alone. Samples are picked by Python
    integer indexing (views, then a stack): a host index tensor would be a blocking copy.

    Returns:
        masks (one (h, w) bool per sample), no_target (B,) bool, merged_prob (one (h, w)
        float32 per sample), no_target_prob (B,) float32.
    """
    if len(sizes) != outputs.merged_logits.shape[0]:
        raise ValueError(f"postprocess_sizes: {len(sizes)} sizes for a batch of {outputs.merged_logits.shape[0]}")
    budget = budget or upsample_budget(outputs.merged_logits.device)
    masks: list[Any] = [None] * len(sizes)
    probs: list[Any] = [None] * len(sizes)
    no_target: list[Any] = [None] * len(sizes)
    no_target_prob: list[Any] = [None] * len(sizes)
    for size, positions in size_chunks(sizes, budget):
        part = dataclasses.replace(outputs, merged_logits=torch.stack([outputs.merged_logits[b] for b in positions]),
                                   no_target_logits=torch.stack([outputs.no_target_logits[b] for b in positions]))
        m, nt, p, ntp = postprocess(part, size)
        for j, b in enumerate(positions):
            masks[b], no_target[b], probs[b], no_target_prob[b] = m[j], nt[j], p[j], ntp[j]
    return masks, torch.stack(no_target), probs, torch.stack(no_target_prob)


def masks_at_sizes(logits: Sequence[Tensor], sizes: Sequence[tuple[int, int]], *, budget: Optional[int] = None
                   ) -> list[Tensor]:
    """``σ(logits) > 0.5`` of each (H, W) logit map at its own ``(h, w)``: upsampled bilinearly
    (``GRESTransform.resize_mask_to``) in per-size chunks, on the logits' device, no host sync.
    """
    out: list[Any] = [None] * len(logits)
    if not logits:
        return out
    budget = budget or upsample_budget(logits[0].device)
    for size, positions in size_chunks(sizes, budget):
        stacked = torch.stack([logits[k] for k in positions]).float()  # (k, H, W)
        masks = GRESTransform.resize_mask_to(stacked, size) > 0  # (k, h, w): σ > 0.5
        for j, k in enumerate(positions):
            out[k] = masks[j]
    return out


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Batch], *, device: Union[torch.device, str], precision: str,
             metrics: Any = None, scores: Optional[NoTargetScores] = None) -> Any:
    """gRefCOCO metrics (DESIGN §4, ReLA semantics) of ``model`` over ``batches``.

    Predictions are post-processed at each batch's resolution S (480 for the paper) and
    compared with the batch's union masks and no-target flags.

    Args:
        metrics: an accumulator to update (e.g. a ``RefZOMMetrics``); a fresh
            ``GRESMetrics`` when ``None``.
        scores: also add every sample's p̂_nt to this ``NoTargetScores`` (the head's AUROC).

    Returns:
        The accumulator (plain sums: ``merge`` it across workers, then ``compute()``).
    """
    if metrics is None:
        metrics = GRESMetrics()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            outputs = forward_batch(model, batch, device=device, precision=precision)
            masks, no_target, _, no_target_prob = postprocess(outputs, tuple(batch.union_masks.shape[-2:]))
            metrics.update(masks, no_target, batch.union_masks, batch.no_target,
                           [m.shape[0] for m in batch.instance_masks])  # the slices' target counts
            if scores is not None:
                scores.update(no_target_prob, batch.no_target)
    finally:
        model.train(was_training)
    return metrics
