"""Optimiser and learning-rate schedule (paper §4.1; DESIGN §2).

The paper trains with AdamW at lr 1e-4, decayed linearly to 1e-6 over 20 epochs. Where it
is silent, what comes from where (Mask2Former's ``train_net.py::Trainer.build_optimizer``,
ReLA's ``train_net.py::Trainer.build_optimizer``, which copies it with changes):

* **Backbone at ``lr × backbone_lr_mult`` (0.1) — Mask2Former** (``SOLVER.BACKBONE_MULTIPLIER``
  for every module whose name contains ``backbone``). ReLA's copy drops that branch (its
  config still sets the multiplier, which no code reads): its Swin trains at its base rate,
  1e-5 (``SOLVER.BASE_LR`` in ``configs/referring_R50.yaml``, inherited by its Swin
  configs), like every other part.
* **Pretrained text encoder at ``lr × text_encoder_lr_mult`` (0.1) — ours.** Mask2Former has
  no text encoder. ReLA leaves every ``text_encoder`` parameter out of its loop and adds back
  only BERT's encoder layers 0–9, in one group at the *base* rate with the default weight
  decay (biases and LayerNorms included); BERT's embeddings and layers 10–11 are never
  given to the optimiser, so they stay at their pretrained values. We train the whole
  pretrained language model, slowed like the backbone (both are pretrained encoders); at
  the paper's lr 1e-4 that is 1e-5, the rate ReLA's BERT layers train at. Only
  the Hugging Face model itself counts as "text encoder": the linear projection to the
  model width C is new and trains at the full rate (ours).
* **A multiplier of 0 freezes the part — ours** (:func:`freeze_zero_rate_parts`): no gradient,
  no optimiser group, e.g. a frozen pretrained text encoder (``train.text_encoder_lr_mult=0``).
* **No weight decay on normalisation layers and embeddings — Mask2Former**
  (``SOLVER.WEIGHT_DECAY_NORM = 0`` for the norm module types, ``WEIGHT_DECAY_EMBED = 0``
  for ``nn.Embedding``: the learned queries and their positional embeddings, level
  embeddings, word/position embeddings), and on Swin's ``relative_position_bias_table`` and
  ``absolute_pos_embed`` (Mask2Former and ReLA match those names; timm's Swin lists the
  former in its ``no_weight_decay``). ``weight_decay`` 0.05 is Mask2Former's value.
* **No weight decay on biases and other 1-D parameters (PReLU slopes) — ours.** Mask2Former
  and ReLA decay every bias outside a norm layer at 0.05. We follow the BERT/timm habit of
  exempting them: a bias or a slope sets an offset or a scale, not a direction the model
  can overfit with, and decaying it only pulls it toward zero.

The schedule is torch's own ``LinearLR`` (factor 1 → ``min_lr / lr``), stepped once per
optimizer step, so ``total_steps`` is ``epochs × steps_per_epoch`` and the decay is exact
whatever the batch size or worker count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR

from instalign.checkpoint import unwrap_model

__all__ = ["build_optimizer", "build_scheduler", "freeze_zero_rate_parts", "param_groups"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)

#: Parameter-name fragments that are embeddings even when stored as a plain ``nn.Parameter``.
_NO_DECAY_NAMES = ("pos_embed", "relative_position_bias_table", "query_embed", "query_feat",
                   "query_pos", "level_embed", "absolute_pos_embed", "embeddings.")


def _text_encoder_modules(model: nn.Module) -> list[nn.Module]:
    """The pretrained Hugging Face model(s) inside the text encoder.

    Why by type rather than by attribute name: the wrapper around RoBERTa also owns the new
    projection to C, which must train at the full rate. Falls back to ``model.text_encoder``
    when no ``transformers.PreTrainedModel`` is found.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        PreTrainedModel = ()  # type: ignore[assignment]
    found = [m for m in model.modules() if PreTrainedModel and isinstance(m, PreTrainedModel)]
    # Keep the outermost ones only (a PreTrainedModel may nest another).
    outer = [m for m in found if not any(m is not o and any(c is m for c in o.modules()) for o in found)]
    if outer:
        return outer
    te = getattr(model, "text_encoder", None)
    return [te] if isinstance(te, nn.Module) else []


def _backbone_modules(model: nn.Module) -> list[nn.Module]:
    bb = getattr(model, "backbone", None)
    return [bb] if isinstance(bb, nn.Module) else []


def _is_no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    if isinstance(module, _NORM_TYPES) or isinstance(module, nn.Embedding):
        return True
    if param.ndim <= 1:  # biases, norm affines of custom norms, PReLU slopes, 1-D embeddings
        return True
    return any(fragment in name for fragment in _NO_DECAY_NAMES)


def _named_params_with_owner(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied parameters belong to one group only
                continue
            seen.add(id(param))
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), module, param


def freeze_zero_rate_parts(model: nn.Module, *, backbone_lr_mult: float, text_encoder_lr_mult: float) -> list[str]:
    """Freeze each pretrained part whose lr multiplier is 0 (``requires_grad=False``); return their names.

    Why not leave it in the optimiser at rate 0: its weights would not move, but its backward
    pass would still run (all-MiniLM-L6-v2 is most of the ``tiny`` model's parameters), its
    gradient would count in the clipped norm and DDP would all-reduce it for nothing. Frozen
    parameters are left out by :func:`param_groups`. Call it before DDP wraps the model: DDP
    fixes the parameters it waits for when it is built. Only the pretrained model itself is
    frozen; the text encoder's new projection to C still trains (:func:`_text_encoder_modules`).
    """
    model = unwrap_model(model)
    parts = {"backbone": (backbone_lr_mult, _backbone_modules(model)),
             "text_encoder": (text_encoder_lr_mult, _text_encoder_modules(model))}
    frozen = []
    for name, (mult, modules) in parts.items():
        if mult == 0 and modules:
            for module in modules:
                module.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_mult: float,
                 text_encoder_lr_mult: float) -> list[dict]:
    """AdamW parameter groups: {backbone, text_encoder, decoder} × {decay, no_decay}.

    Each group carries ``name`` and ``lr_mult`` (read by the scheduler and by logging);
    empty groups are dropped; frozen parameters (``requires_grad=False``) are left out.
    """
    model = unwrap_model(model)  # DDP's .module, torch.compile's ._orig_mod
    backbone_ids = {id(p) for m in _backbone_modules(model) for p in m.parameters()}
    text_ids = {id(p) for m in _text_encoder_modules(model) for p in m.parameters()} - backbone_ids
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, module, param in _named_params_with_owner(model):
        if not param.requires_grad:
            continue
        part = "backbone" if id(param) in backbone_ids else "text_encoder" if id(param) in text_ids else "decoder"
        buckets.setdefault((part, _is_no_decay(module, name, param)), []).append(param)
    mults = {"backbone": backbone_lr_mult, "text_encoder": text_encoder_lr_mult, "decoder": 1.0}
    groups = []
    for part in ("backbone", "text_encoder", "decoder"):
        for no_decay in (False, True):
            params = buckets.get((part, no_decay))
            if params:
                groups.append({
                    "params": params,
                    "name": f"{part}{'_no_decay' if no_decay else ''}",
                    "lr": lr * mults[part],
                    "lr_mult": mults[part],
                    "weight_decay": 0.0 if no_decay else weight_decay,
                })
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_mult: float,
                    text_encoder_lr_mult: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (paper §4.1 optimiser; the groups' sources in the module docstring)."""
    if lr <= 0:
        raise ValueError(f"build_optimizer: lr must be > 0, got {lr}")
    if weight_decay < 0 or backbone_lr_mult < 0 or text_encoder_lr_mult < 0:
        raise ValueError("build_optimizer: weight_decay and lr multipliers must be >= 0")
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, backbone_lr_mult=backbone_lr_mult,
                          text_encoder_lr_mult=text_encoder_lr_mult)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, lr: float,
                    min_lr: float) -> LinearLR:
    """Linear decay from ``lr`` to ``min_lr`` over ``total_steps`` optimizer steps, then flat (paper §4.1).

    At step t every group's rate is ``base × (1 − t/T + t/T · min_lr/lr)`` with T = ``total_steps``:
    the same factor scales every group, so the backbone and text encoder decay from
    ``lr × mult`` to ``min_lr × mult`` (Mask2Former scales its multiplied groups alike).
    ``min_lr = 0`` decays to exactly zero (``LinearLR`` accepts an end factor of 0);
    ``min_lr = lr`` is a constant rate.

    Resuming: the optimizer's state carries each group's current rate and the scheduler's
    carries ``last_epoch`` (the step) and the schedule, so a run restored through
    ``instalign.checkpoint.load_training_state`` continues the curve where it stopped.
    Checkpoints written before this used ``LinearLR`` hold a ``LambdaLR`` state (an extra
    ``lr_lambdas`` entry, the same ``last_epoch`` and rates); they load the same way and continue
    the same curve, the schedule's length and floor coming from the run's config.
    """
    if total_steps < 1:
        raise ValueError(f"build_scheduler: total_steps must be >= 1, got {total_steps}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"build_scheduler: need 0 <= min_lr <= lr, got lr={lr}, min_lr={min_lr}")
    return LinearLR(optimizer, start_factor=1.0, end_factor=min_lr / lr, total_iters=total_steps)
