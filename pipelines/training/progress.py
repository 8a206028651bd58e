"""Progress lines a person can follow: what rank 0 prints while a training job runs.

On a cluster ``ray job logs`` is the user's only window into a run, and MLflow may not be
reachable from where they sit, so rank 0 prints one plain line (no ANSI, no carriage
returns: it lands in a log file as often as in a terminal) every ``train.print_every_steps``
optimizer steps and one per validation::

    [train] start: 6 epochs x 189 steps = 1134 steps, global batch 8 on 2 workers (cpu, fp32)
    [train] epoch 1/6 step 50/1134 (4%) | loss 3.412 mask 0.812 dice 0.704 score 0.520 nt 0.611 pa 0.766 | lr 9.6e-04 | grad 4.21 (clipped 100%) | 41.3 samples/s | ETA 7m05s | peak mem 1.2 GiB
    [train] epoch 1/6 val at step 189: gIoU 41.2 cIoU 38.0 N-acc 12.5 T-acc 97.0 (197 samples)

The numbers are the same window means that go to MLflow (``engine.train_one_epoch``'s
``report``, averaged over ranks, throughput summed). The ETA is the remaining steps at the
rate measured since this process started training (validation and checkpoint time
included), so it is honest after a resume too. Peak memory is the largest over the ranks:
``torch.cuda.max_memory_allocated`` on GPU, the process's peak resident set on CPU.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional, TextIO

import torch

#: Loss terms in print order, with their short names (``losses.criterion``'s keys).
LOSS_TERMS = (("loss", "loss"), ("loss_mask", "mask"), ("loss_dice", "dice"), ("loss_score", "score"),
              ("loss_nt", "nt"), ("loss_pa", "pa"))
#: Validation metrics in print order (``metrics.GRESMetrics``' keys, prefixed ``val_``).
VAL_TERMS = (("val_gIoU", "gIoU"), ("val_cIoU", "cIoU"), ("val_N_acc", "N-acc"), ("val_T_acc", "T-acc"))


def peak_memory_bytes(device: Any = None) -> int:
    """This process's peak memory: CUDA's max allocated on a GPU device, else peak RSS."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux reports ru_maxrss in KiB (macOS in bytes; Ray's workers here run on Linux).
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressPrinter:
    """Rank 0's progress lines for one training process (module docstring).

    Args:
        epochs: ``train.epochs``.
        steps_per_epoch: optimizer steps in one epoch (global batches).
        max_steps: the step the run stops at (``min(train.max_steps, epochs x steps)``).
        every: print a training line when a report crosses a multiple of ``every`` steps
            (0: only the validation lines).
        stream: where lines go (stdout: Ray forwards it to the driver and to ``ray job logs``).
        clock: ``time.monotonic`` (injectable for tests).
    """

    def __init__(self, *, epochs: int, steps_per_epoch: int, max_steps: int, every: int,
                 stream: Optional[TextIO] = None, clock=time.monotonic) -> None:
        if every < 0:
            raise ValueError(f"print_every_steps must be >= 0, got {every}")
        self.epochs, self.steps_per_epoch, self.max_steps, self.every = epochs, steps_per_epoch, max_steps, every
        self.stream, self.clock = stream, clock
        self._t0: Optional[float] = None
        self._step0 = 0
        self._last_printed = -1  # the last multiple of ``every`` a line was printed for
        self._last_step = -1  # the step of the last training line (never two for one step)

    def _print(self, line: str) -> None:
        print(f"[train] {line}", file=self.stream or sys.stdout, flush=True)

    def start(self, *, step: int, world: int, global_batch: int, device: str, precision: str,
              resumed_from: Optional[str] = None) -> None:
        """The run's shape, once per (re)start; the ETA clock starts here."""
        self._t0, self._step0 = self.clock(), step
        self._last_printed = step // self.every if self.every else -1
        where = f"resumed from {resumed_from} at step {step}" if resumed_from else "from scratch"
        self._print(f"start ({where}): {self.epochs} epoch{'s' if self.epochs != 1 else ''} x {self.steps_per_epoch} "
                    f"steps = {self.max_steps} steps"
                    f"{'' if self.max_steps == self.epochs * self.steps_per_epoch else ' (train.max_steps)'}, "
                    f"global batch {global_batch} on {world} worker{'s' if world > 1 else ''} ({device}, {precision})")

    def eta_seconds(self, step: int) -> float:
        if self._t0 is None or step <= self._step0:
            return math.nan
        rate = (step - self._step0) / max(self.clock() - self._t0, 1e-9)
        return (self.max_steps - step) / rate

    def train(self, metrics: Mapping[str, float], step: int, *, epoch: int, force: bool = False) -> Optional[str]:
        """Print a training line if ``step`` crossed a multiple of ``every`` (or ``force``)."""
        if step == self._last_step or not (force or (self.every and step // self.every != self._last_printed)):
            return None
        if self.every:
            self._last_printed = step // self.every
        self._last_step = step
        parts = [f"epoch {epoch + 1}/{self.epochs} step {step}/{self.max_steps} "
                 f"({100.0 * step / max(self.max_steps, 1):.0f}%)"]
        parts.append(" ".join(f"{short} {metrics[key]:.3f}" for key, short in LOSS_TERMS if key in metrics))
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.1e}")
        if "grad_norm" in metrics:
            clipped = metrics.get("grad_clipped")
            parts.append(f"grad {metrics['grad_norm']:.2f}"
                         + (f" (clipped {100 * clipped:.0f}%)" if clipped else ""))
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
        parts.append(f"ETA {format_duration(self.eta_seconds(step))}")
        if "peak_mem_bytes" in metrics:
            parts.append(f"peak mem {format_bytes(metrics['peak_mem_bytes'])}")
        line = " | ".join(p for p in parts if p)
        self._print(line)
        return line

    def validation(self, val: Mapping[str, float], step: int, *, epoch: int) -> str:
        """One line per validation: the paper's gRefCOCO metrics on the val split."""
        scores = " ".join(f"{short} {val[key]:.1f}" for key, short in VAL_TERMS if key in val)
        samples = f" ({int(val['val_samples'])} samples)" if "val_samples" in val else ""
        line = f"epoch {epoch + 1}/{self.epochs} val at step {step}: {scores}{samples}"
        self._print(line)
        return line

    def finish(self, step: int) -> str:
        took = self.clock() - self._t0 if self._t0 is not None else math.nan
        line = f"done: step {step}/{self.max_steps} in {format_duration(took)}"
        self._print(line)
        return line
