"""Saved-activation bytes of multi-scale deformable attention (``instalign bench model --deform-memory``).

Training memory of the pixel decoder is dominated by what autograd keeps for backward, and
that is device-independent: it can be counted on CPU with ``saved_tensors_hooks``, summing
the bytes of the unique storages the graph saves (views of one storage count once). The
naive reference keeps the (B·M, D, Q, L·P) sample stack; the lean path with recomputation
keeps only the op's inputs. Non-reentrant ``torch.utils.checkpoint`` saves its inputs through
the same hooks, so what it holds for the recompute is counted too.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from instalign.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_pytorch, ms_deform_attn_reference


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return (its result, bytes of the unique storages autograd saved meanwhile)."""
    storages: dict[int, int] = {}
    keep: list[Tensor] = []  # hold every packed tensor so a freed storage's address is not reused

    def pack(t: Tensor) -> Tensor:
        keep.append(t)
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


class _LargestOutput(TorchDispatchMode):
    """Records the bytes of the largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def largest_intermediate_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the largest tensor created while running ``fn()`` and backpropagating its squared sum.

    The transient peak's main term: the reference's (B·M, D, Q, L·P) sample stack shows up
    here even where recomputation keeps it out of the saved bytes.
    """
    with _LargestOutput() as mode:
        fn().square().sum().backward()
    return mode.largest


def level_shapes(image_size: int) -> list[tuple[int, int]]:
    """The pixel decoder's levels, coarse to fine (strides 32, 16, 8)."""
    return [(image_size // s, image_size // s) for s in (32, 16, 8)]


def op_inputs(batch: int, shapes: list[tuple[int, int]], heads: int, head_dim: int, points: int,
              seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random leaf (value, sampling_locations, attention_weights) needing grad, one query per token."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, heads, head_dim, generator=g).requires_grad_()
    # a tenth of the points fall outside [0, 1] (zero padding), as offsets do near borders
    locations = (torch.rand(batch, s, heads, len(shapes), points, 2, generator=g) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(batch, s, heads, len(shapes) * points, generator=g).softmax(-1)
    weights = weights.view(batch, s, heads, len(shapes), points).requires_grad_()
    return value, locations, weights


#: op variants measured: label -> implementation with the PyTorch signature.
OP_VARIANTS: dict[str, Callable[..., Tensor]] = {
    "reference (naive stack)": ms_deform_attn_reference,
    "pytorch, no recompute": lambda *a: ms_deform_attn_pytorch(*a, checkpoint=False),
    "pytorch (default: recompute)": ms_deform_attn_pytorch,
    "pytorch, recompute, query_chunk=1024": lambda *a: ms_deform_attn_pytorch(*a, query_chunk=1024),
}


def _fwd_bwd_cpu_ms(fn: Callable[[], Tensor], repeats: int) -> float:
    """Median process-CPU milliseconds of forward + backward (robust to shared cores)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn().square().sum().backward()
        times.append(1e3 * (time.process_time() - t0))
    return sorted(times)[len(times) // 2]


def measure(*, batch: int = 1, image_size: int = 480, dim: int = 256, heads: int = 8, points: int = 4,
            repeats: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Per variant: saved bytes, largest transient tensor and CPU time of one attention op / ``MSDeformAttn`` call.

    Defaults are the paper preset at batch 1 (Q = S = 60² + 30² + 15² = 4725 tokens).
    """
    shapes = level_shapes(image_size)
    rows: list[dict[str, Any]] = []
    common = {"batch": batch, "image_size": image_size, "tokens": sum(h * w for h, w in shapes),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__}

    inputs = op_inputs(batch, shapes, heads, dim // heads, points, seed)
    for label, impl in OP_VARIANTS.items():
        run = lambda impl=impl: impl(inputs[0], shapes, inputs[1], inputs[2])  # noqa: E731
        _, saved = saved_tensor_bytes(run)
        rows.append({"scope": "attention op", "variant": label, "saved_bytes": saved,
                     "largest_tensor_MiB": round(largest_intermediate_bytes(run) / 2**20, 2),
                     "fwd_bwd_cpu_ms": round(_fwd_bwd_cpu_ms(run, repeats), 1), **common})

    torch.manual_seed(seed)
    for impl in ("reference", "pytorch"):
        attn = MSDeformAttn(dim=dim, num_levels=len(shapes), num_heads=heads, num_points=points, impl=impl)
        x = torch.randn(batch, common["tokens"], dim, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        ref = reference_points(shapes)
        run = lambda attn=attn: attn(x, ref, x, shapes)  # noqa: E731
        _, saved = saved_tensor_bytes(run)
        rows.append({"scope": "MSDeformAttn module", "variant": impl, "saved_bytes": saved,
                     "largest_tensor_MiB": round(largest_intermediate_bytes(run) / 2**20, 2),
                     "fwd_bwd_cpu_ms": round(_fwd_bwd_cpu_ms(run, repeats), 1), **common})
    for row in rows:
        base = next(r for r in rows if r["scope"] == row["scope"])  # the reference comes first
        row["saved_MiB"] = round(row["saved_bytes"] / 2**20, 2)
        row["less_than_reference"] = round(base["saved_bytes"] / row["saved_bytes"], 2)
    return rows


def reference_points(shapes: list[tuple[int, int]]) -> Tensor:
    # local import: the pixel decoder imports this package's attention module, not the reverse
    from instalign.modeling.pixel_decoder import MSDeformAttnPixelDecoder

    return MSDeformAttnPixelDecoder.reference_points(shapes, torch.device("cpu"))


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["scope", "variant", "saved_MiB", "less_than_reference", "largest_tensor_MiB", "fwd_bwd_cpu_ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["saved_tensor_bytes", "largest_intermediate_bytes", "measure", "markdown", "op_inputs", "level_shapes"]
