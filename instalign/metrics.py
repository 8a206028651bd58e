"""GRES and Ref-ZOM metrics with the official semantics (DESIGN §4; paper §4.1).

Results must be comparable with published numbers, so these follow ReLA's gRefCOCO
evaluator (``refer_evaluation.py``) sample by sample. No-target is the *positive* class:

============================  =========  =====================================  ==============
GT / prediction               outcome    IoU of the sample (into gIoU)          into ΣI, ΣU
============================  =========  =====================================  ==============
no-target / no-target         TP         1                                      nothing
no-target / mask              FN         0                                      U += |pred|
targets / no-target           FP         0 (the mask counts as empty)           U += |gt|
targets / mask                TN         |pred ∩ gt| / |pred ∪ gt|              I, U as usual
============================  =========  =====================================  ==============

* **gIoU** = mean per-sample IoU over all samples; **cIoU** = ΣI / ΣU;
  **N_acc** = TP / (TP + FN); **T_acc** = TN / (TN + FP);
  **Pr@0.7/0.8/0.9** = share of *targeted* samples with IoU ≥ the threshold.
* A predicted no-target flag means an empty predicted mask (the model's inference rule,
  DESIGN §1), so in the FP row ``|pred ∪ gt| = |gt|``. ReLA unions the raw mask there;
  the two agree whenever a flagged prediction's mask is empty, as InstAlign's is.
* A targeted sample whose GT and prediction are both empty (an object lost to resizing)
  has IoU 0, as in ReLA (``0 if U == 0``).

Ref-ZOM (``RefZOMMetrics``): **mIoU** and **oIoU** (= ΣI / ΣU) over samples *with*
targets only; **Acc** = share of no-target samples whose predicted mask is empty (a
predicted no-target flag empties the mask).

All values are percentages. A metric whose denominator is zero (no samples of that
kind yet, e.g. N_acc on a split without no-target expressions) is reported as NaN —
never 0, which would read as a real score — and nothing raises.

Accumulators are plain Python sums (``state_dict``), so evaluation can run in many
workers or batches and be ``merge``-d, or shipped across process boundaries.

Inputs to ``update``: boolean (or integer, non-zero = True) torch tensors or numpy
arrays: masks (B, H, W), flags (B,). Letters: B batch, H×W the evaluation resolution.

**Slices** (``GRESMetrics``): gRefCOCO's point is the mix of single-, multi- and no-target
expressions, so gIoU and cIoU are also reported per kind of sample, with its count:
``single`` (one target), ``multi`` (two or more), ``multi_2`` and ``multi_3plus`` (exactly
two; three or more) and ``no_target`` — keys ``<slice>.gIoU``, ``<slice>.cIoU``,
``<slice>.samples``. Each slice runs the same per-sample rules as the whole split (the table
above), over its own samples: a slice's gIoU is the mean IoU of its samples, its cIoU its
ΣI / ΣU. The overall numbers do not depend on the slices. The no-target slice's gIoU is
its N_acc (IoU 1 or 0); its cIoU is 0 when any no-target sample got a mask (ΣI = 0), NaN
when none did (ΣU = 0). Counting targets needs the number of GT instances per sample
(``num_targets``); without it, only the no-target slice is known and the others stay
empty (NaN, count 0).

**The no-target head as a classifier** (``NoTargetScores``): N_acc and T_acc above are the
head's accuracies at the paper's threshold, p̂_nt > 0.5. How well p̂_nt *ranks* no-target
above targeted expressions — whatever the threshold — is its **AUROC**. To stay a
mergeable plain sum, the accumulator keeps a histogram of p̂_nt per class over
``NT_BINS`` = 1000 equal bins of [0, 1] instead of the scores themselves. The AUROC from
it is the Mann–Whitney statistic with two scores in the same bin counted as a tie (½):
exact up to the bin width, 0.001 (pairs closer than that are the only ones it can
misorder). It also finds the threshold (a bin edge) that maximises N_acc + T_acc on the
data it saw — e.g. on val — and the accuracies of any threshold on another split.
"""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]

#: ReLA's precision thresholds.
PR_THRESHOLDS = (0.7, 0.8, 0.9)


def _as_bool_tensor(x: ArrayLike, name: str, device: torch.device | None) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{name}: expected boolean values, got {x.dtype}; threshold probabilities first")
    x = x if x.dtype == torch.bool else x != 0
    return x.to(device) if device is not None else x


def _per_sample(pred_masks: ArrayLike, pred_no_target: ArrayLike, gt_masks: ArrayLike,
                gt_no_target: ArrayLike) -> list[tuple[int, int, int, bool, bool]]:
    """Per-sample ``(I, U, |pred|, pred_nt, gt_nt)`` with one device→host copy.

    The predicted mask is emptied where the no-target flag is set. I and U are of that
    effective mask against the GT; ``|pred|`` is the effective predicted area.
    """
    pred = _as_bool_tensor(pred_masks, "pred_masks", None)
    device = pred.device
    gt = _as_bool_tensor(gt_masks, "gt_masks", device)
    pred_nt = _as_bool_tensor(pred_no_target, "pred_no_target", device)
    gt_nt = _as_bool_tensor(gt_no_target, "gt_no_target", device)
    if pred.dim() != 3 or gt.shape != pred.shape:
        raise ValueError(f"masks must both be (B, H, W) of one shape: pred_masks {tuple(pred.shape)}, "
                         f"gt_masks {tuple(gt.shape)}")
    b = pred.shape[0]
    if pred_nt.shape != (b,) or gt_nt.shape != (b,):
        raise ValueError(f"no-target flags must be ({b},): pred_no_target {tuple(pred_nt.shape)}, "
                         f"gt_no_target {tuple(gt_nt.shape)}")
    pred = pred & ~pred_nt[:, None, None]  # a predicted no-target means an empty mask
    inter = (pred & gt).flatten(1).sum(1)  # (B,)
    union = (pred | gt).flatten(1).sum(1)
    area = pred.flatten(1).sum(1)
    gt_area = gt.flatten(1).sum(1)
    rows = torch.stack([inter, union, area, gt_area, pred_nt.long(), gt_nt.long()], 1).cpu().tolist()
    out = []
    for i, (i_, u, a, g, p_nt, g_nt) in enumerate(rows):
        if g_nt and g:
            raise ValueError(f"sample {i} of the batch is labelled no-target but its GT mask has {g} pixels")
        out.append((int(i_), int(u), int(a), bool(p_nt), bool(g_nt)))
    return out


def _ratio(num: float, den: float) -> float:
    """100·num/den, NaN when the denominator is 0 (the metric is undefined)."""
    return 100.0 * num / den if den else math.nan


class _Accumulator:
    """Shared plain-sum state handling; subclasses define ``_KEYS``, ``update`` and ``compute``."""

    _KEYS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._state: dict[str, Union[int, float]] = {k: (0.0 if k.endswith("iou_sum") else 0) for k in self._KEYS}

    def state_dict(self) -> dict[str, Union[int, float]]:
        """Plain Python numbers: picklable, JSON-able, summable across workers."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unknown = set(self._KEYS) - set(state), set(state) - set(self._KEYS)
        if missing or unknown:
            raise ValueError(f"{type(self).__name__}.load_state_dict: missing keys {sorted(missing)}, "
                             f"unknown keys {sorted(unknown)}")
        self._state = {k: (float(state[k]) if k.endswith("iou_sum") else int(state[k])) for k in self._KEYS}

    @classmethod
    def from_state(cls, state: dict[str, Any]):
        metrics = cls()
        metrics.load_state_dict(state)
        return metrics

    def merge(self, other: "_Accumulator"):
        """Add another accumulator's sums into this one (other workers, other batches)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for k in self._KEYS:
            self._state[k] += other._state[k]
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._state})"


#: Slices of ``GRESMetrics`` kept as sums; ``multi`` is ``multi_2`` + ``multi_3plus``.
_SLICE_SUMS = ("single", "multi_2", "multi_3plus", "no_target")
#: Reported slices, in order, and the summed slices each is made of.
SLICES = {"single": ("single",), "multi": ("multi_2", "multi_3plus"), "multi_2": ("multi_2",),
          "multi_3plus": ("multi_3plus",), "no_target": ("no_target",)}
_SLICE_TERMS = ("samples", "inter", "union", "iou_sum")


def _slice_of(gt_nt: bool, num_targets: int | None) -> str | None:
    if gt_nt:
        return "no_target"
    if num_targets is None or num_targets < 1:  # unknown (or a GT mask without instances)
        return None
    return "single" if num_targets == 1 else "multi_2" if num_targets == 2 else "multi_3plus"


class GRESMetrics(_Accumulator):
    """gRefCOCO metrics (ReLA): cIoU, gIoU, N_acc, T_acc, Pr@0.7/0.8/0.9, and gIoU / cIoU per
    slice (single-, multi-, no-target; module docstring)."""

    _KEYS = ("samples", "targeted", "no_target", "tp", "fn", "fp", "tn", "inter", "union", "iou_sum",
             *(f"pr@{t}" for t in PR_THRESHOLDS),
             *(f"{name}:{term}" for name in _SLICE_SUMS for term in _SLICE_TERMS))

    def update(self, pred_masks: ArrayLike, pred_no_target: ArrayLike, gt_masks: ArrayLike,
               gt_no_target: ArrayLike, num_targets: ArrayLike | list[int] | None = None) -> None:
        """Add a batch: masks (B, H, W) and flags (B,), boolean; ``num_targets`` (B,) the GT
        instances of each sample (0 for no-target), for the slices."""
        s = self._state
        rows = _per_sample(pred_masks, pred_no_target, gt_masks, gt_no_target)
        counts: list[int | None] = [None] * len(rows)
        if num_targets is not None:
            counts = [int(n) for n in torch.as_tensor(np.asarray(num_targets)).flatten().tolist()]
            if len(counts) != len(rows):
                raise ValueError(f"num_targets has {len(counts)} values for a batch of {len(rows)}")
        for (inter, union, area, pred_nt, gt_nt), n in zip(rows, counts):
            s["samples"] += 1
            if gt_nt:
                s["no_target"] += 1
                if pred_nt:  # TP: IoU 1, nothing into ΣI/ΣU
                    s["tp"] += 1
                    iou, inter, union = 1.0, 0, 0
                else:  # FN: IoU 0, the predicted area is all union
                    s["fn"] += 1
                    iou, inter, union = 0.0, 0, area
            else:
                s["targeted"] += 1
                if pred_nt:  # FP: the mask is empty, so I = 0 and U = |gt|
                    s["fp"] += 1
                else:
                    s["tn"] += 1
                iou = inter / union if union else 0.0
                for t in PR_THRESHOLDS:
                    s[f"pr@{t}"] += int(iou >= t)
            s["inter"] += inter
            s["union"] += union
            s["iou_sum"] += iou
            where = _slice_of(gt_nt, n)
            if where is not None:
                s[f"{where}:samples"] += 1
                s[f"{where}:inter"] += inter
                s[f"{where}:union"] += union
                s[f"{where}:iou_sum"] += iou

    def compute(self) -> dict[str, float]:
        """Percentages (and each slice's ``samples``); NaN where the denominator is 0."""
        s = self._state
        out = {
            "cIoU": _ratio(s["inter"], s["union"]),
            "gIoU": _ratio(s["iou_sum"], s["samples"]),
            "N_acc": _ratio(s["tp"], s["tp"] + s["fn"]),
            "T_acc": _ratio(s["tn"], s["tn"] + s["fp"]),
        }
        for t in PR_THRESHOLDS:
            out[f"Pr@{t}"] = _ratio(s[f"pr@{t}"], s["targeted"])
        for name, parts in SLICES.items():
            n, inter, union, iou = (sum(s[f"{p}:{term}"] for p in parts) for term in _SLICE_TERMS)
            out[f"{name}.gIoU"] = _ratio(iou, n)
            out[f"{name}.cIoU"] = _ratio(inter, union)
            out[f"{name}.samples"] = n
        return out


class RefZOMMetrics(_Accumulator):
    """Ref-ZOM metrics: mIoU and oIoU over targeted samples, Acc over no-target samples."""

    _KEYS = ("samples", "targeted", "no_target", "inter", "union", "iou_sum", "nt_correct")

    def update(self, pred_masks: ArrayLike, pred_no_target: ArrayLike, gt_masks: ArrayLike,
               gt_no_target: ArrayLike, num_targets: ArrayLike | list[int] | None = None) -> None:
        """Add a batch: masks (B, H, W) and flags (B,), boolean. ``num_targets`` is accepted for
        the same call as ``GRESMetrics`` and unused: Ref-ZOM's protocol has no slices."""
        s = self._state
        for inter, union, area, _, gt_nt in _per_sample(pred_masks, pred_no_target, gt_masks, gt_no_target):
            s["samples"] += 1
            if gt_nt:
                s["no_target"] += 1
                s["nt_correct"] += int(area == 0)  # the (flag-emptied) predicted mask is empty
                continue
            s["targeted"] += 1
            s["inter"] += inter
            s["union"] += union
            s["iou_sum"] += inter / union if union else 0.0

    def compute(self) -> dict[str, float]:
        """Percentages; NaN where the denominator is 0."""
        s = self._state
        return {
            "mIoU": _ratio(s["iou_sum"], s["targeted"]),
            "oIoU": _ratio(s["inter"], s["union"]),
            "Acc": _ratio(s["nt_correct"], s["no_target"]),
        }


#: Histogram bins of p̂_nt in ``NoTargetScores`` (width 0.001: the AUROC's resolution).
NT_BINS = 1000


class NoTargetScores:
    """p̂_nt histograms per class: the no-target head's AUROC and threshold sweeps (module docstring).

    Plain integer sums, ``merge``-able across workers and batches like the other accumulators.
    Bin ``i`` holds scores in ``[i/NT_BINS, (i+1)/NT_BINS)`` (1.0 goes to the last bin).
    """

    def __init__(self, bins: int = NT_BINS) -> None:
        if bins < 2:
            raise ValueError(f"NoTargetScores: bins must be >= 2, got {bins}")
        self.bins = int(bins)
        self.reset()

    def reset(self) -> None:
        self.pos = [0] * self.bins  # GT no-target
        self.neg = [0] * self.bins  # GT with targets

    def update(self, no_target_prob: ArrayLike, gt_no_target: ArrayLike) -> None:
        """Add a batch: p̂_nt (B,) in [0, 1] and the GT no-target flags (B,)."""
        prob = torch.as_tensor(no_target_prob).detach().float().cpu().flatten()
        gt = _as_bool_tensor(gt_no_target, "gt_no_target", torch.device("cpu")).flatten()
        if prob.shape != gt.shape:
            raise ValueError(f"no_target_prob {tuple(prob.shape)} and gt_no_target {tuple(gt.shape)} differ")
        if prob.numel() and (not torch.isfinite(prob).all() or prob.min() < 0 or prob.max() > 1):
            raise ValueError("no_target_prob must be probabilities in [0, 1]")
        idx = (prob * self.bins).long().clamp(0, self.bins - 1)
        for hist, sel in ((self.pos, gt), (self.neg, ~gt)):
            counts = torch.bincount(idx[sel], minlength=self.bins).tolist()
            for i, c in enumerate(counts):
                if c:
                    hist[i] += c

    def state_dict(self) -> dict[str, list[int]]:
        return {"nt_hist_pos": list(self.pos), "nt_hist_neg": list(self.neg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pos, neg = (list(map(int, np.asarray(state[k]).ravel())) for k in ("nt_hist_pos", "nt_hist_neg"))
        if len(pos) != len(neg) or len(pos) < 2:
            raise ValueError(f"NoTargetScores.load_state_dict: histograms of {len(pos)} and {len(neg)} bins")
        self.bins, self.pos, self.neg = len(pos), pos, neg

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "NoTargetScores":
        scores = cls(bins=len(np.asarray(state["nt_hist_pos"]).ravel()))
        scores.load_state_dict(state)
        return scores

    def merge(self, other: "NoTargetScores") -> "NoTargetScores":
        if not isinstance(other, NoTargetScores) or other.bins != self.bins:
            raise TypeError("can only merge a NoTargetScores with the same number of bins")
        self.pos = [a + b for a, b in zip(self.pos, other.pos)]
        self.neg = [a + b for a, b in zip(self.neg, other.neg)]
        return self

    def auroc(self) -> float:
        """P(p̂_nt of a no-target sample > that of a targeted one), ties ½; percent, NaN if a class is empty."""
        n_pos, n_neg = sum(self.pos), sum(self.neg)
        if not n_pos or not n_neg:
            return math.nan
        below = 0  # targeted samples in lower bins
        wins = 0.0
        for p, n in zip(self.pos, self.neg):
            wins += p * (below + 0.5 * n)
            below += n
        return 100.0 * wins / (n_pos * n_neg)

    def accuracies(self, threshold: float) -> tuple[float, float]:
        """(N_acc, T_acc) in percent when p̂_nt ≥ ``threshold`` (rounded to a bin edge) means no target."""
        edge = min(max(int(round(threshold * self.bins)), 0), self.bins)
        n_acc = _ratio(sum(self.pos[edge:]), sum(self.pos))
        t_acc = _ratio(sum(self.neg[:edge]), sum(self.neg))
        return n_acc, t_acc

    def best_threshold(self) -> float:
        """The bin edge maximising N_acc + T_acc on the data seen (the lowest such edge); NaN if a class is empty."""
        n_pos, n_neg = sum(self.pos), sum(self.neg)
        if not n_pos or not n_neg:
            return math.nan
        best, best_edge = -1.0, 0
        tp, tn = n_pos, 0  # at edge 0 every sample is called no-target
        for edge in range(self.bins + 1):
            score = tp / n_pos + tn / n_neg
            if score > best + 1e-12:
                best, best_edge = score, edge
            if edge < self.bins:
                tp -= self.pos[edge]
                tn += self.neg[edge]
        return best_edge / self.bins

    def quantile(self, q: float, *, no_target: bool) -> float:
        """The ``q``-quantile of p̂_nt over one class (the upper edge of the bin that reaches it,
        so within 1/``bins`` of the exact value); NaN if the class is empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"NoTargetScores.quantile: q={q} is not in [0, 1]")
        hist = self.pos if no_target else self.neg
        n = sum(hist)
        if not n:
            return math.nan
        need, seen = max(q * n, 1e-12), 0
        for i, c in enumerate(hist):
            seen += c
            if seen >= need:
                return (i + 1) / self.bins
        return 1.0

    def compute(self) -> dict[str, float]:
        """``nt_AUROC`` (percent) and where each class's p̂_nt lies: quartiles of the no-target
        (``nt_score_no_target_p25/p50/p75``) and targeted samples (``nt_score_targeted_p*``).

        Why the head lags shows here: a ranking that is right (high AUROC) with both classes'
        scores below 0.5 is a threshold problem (class balance), overlapping quartiles a
        ranking one. N/T accuracies at 0.5 are ``GRESMetrics``' N_acc / T_acc (exact).
        """
        out = {"nt_AUROC": self.auroc()}
        for cls, no_target in (("no_target", True), ("targeted", False)):
            for q in (25, 50, 75):
                out[f"nt_score_{cls}_p{q}"] = self.quantile(q / 100, no_target=no_target)
        return out


__all__ = ["GRESMetrics", "NT_BINS", "NoTargetScores", "PR_THRESHOLDS", "RefZOMMetrics", "SLICES"]
