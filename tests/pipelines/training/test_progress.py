"""Rank 0's progress lines (``pipelines.training.progress``): what a person reads in ``ray job logs``."""

from __future__ import annotations

import io
import re

import pytest

from pipelines.training.progress import ProgressPrinter, format_bytes, format_duration, peak_memory_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def printer(every: int = 50, max_steps: int = 600):
    out, clock = io.StringIO(), Clock()
    return ProgressPrinter(epochs=4, steps_per_epoch=150, max_steps=max_steps, every=every, stream=out,
                           clock=clock), out, clock


WINDOW = {"loss": 3.4567, "loss_mask": 0.8, "loss_dice": 0.7, "loss_score": 0.5, "loss_nt": 0.61, "loss_pa": 0.77,
          "lr": 9.6e-4, "grad_norm": 4.21, "grad_clipped": 1.0, "samples_per_s": 41.3, "peak_mem_bytes": 1.5 * 2**30}


def test_a_training_line_has_every_field_a_user_needs():
    p, out, clock = printer()
    p.start(step=0, world=2, global_batch=8, device="cpu", precision="fp32")
    clock.now += 100.0  # 50 steps in 100 s → 550 left at 0.5 steps/s = 1100 s
    line = p.train(WINDOW, 50, epoch=0)
    assert line == ("epoch 1/4 step 50/600 (8%) | loss 3.457 mask 0.800 dice 0.700 score 0.500 nt 0.610 pa 0.770 | "
                    "lr 9.6e-04 | grad 4.21 (clipped 100%) | 41.3 samples/s | ETA 18m20s | peak mem 1.5 GiB")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[train] start (from scratch): 4 epochs x 150 steps = 600 steps, global batch 8 on 2 workers " \
                       "(cpu, fp32)"
    assert lines[1] == "[train] " + line
    assert not re.search(r"\x1b\[|\r", out.getvalue())  # plain lines: log files and terminals alike


def test_lines_only_when_a_multiple_of_every_is_crossed_and_never_twice_for_a_step():
    p, out, _ = printer(every=50)
    p.start(step=0, world=1, global_batch=8, device="cpu", precision="fp32")
    printed = [s for s in range(10, 160, 10) if p.train(WINDOW, s, epoch=0)]
    assert printed == [50, 100, 150]
    assert p.train(WINDOW, 150, epoch=0, force=True) is None  # the epoch end already had its line
    assert p.train(WINDOW, 155, epoch=1, force=True) is not None  # a forced epoch-end line otherwise
    assert len(out.getvalue().splitlines()) == 1 + 4


def test_every_zero_prints_validation_and_forced_lines_only():
    p, out, _ = printer(every=0)
    p.start(step=0, world=1, global_batch=8, device="cpu", precision="fp32")
    assert p.train(WINDOW, 50, epoch=0) is None
    line = p.validation({"val_gIoU": 61.23, "val_cIoU": 58.0, "val_N_acc": 66.7, "val_T_acc": 94.1,
                         "val_samples": 197}, 150, epoch=0)
    assert line == "epoch 1/4 val at step 150: gIoU 61.2 cIoU 58.0 N-acc 66.7 T-acc 94.1 (197 samples)"
    with pytest.raises(ValueError, match="print_every_steps"):
        ProgressPrinter(epochs=1, steps_per_epoch=1, max_steps=1, every=-1)


def test_eta_counts_from_the_resume_point():
    p, out, clock = printer()
    p.start(step=300, world=1, global_batch=8, device="cuda:0", precision="bf16", resumed_from="step_00000300")
    assert "start (resumed from step_00000300 at step 300)" in out.getvalue()
    assert p.train(WINDOW, 310, epoch=2) is None  # not a multiple of 50 yet
    clock.now += 30.0  # 50 steps since the resume in 30 s: 250 left → 150 s
    assert "ETA 2m30s" in p.train(WINDOW, 350, epoch=2)
    clock.now += 1.0
    assert p.finish(600).startswith("done: step 600/600 in 0m31s")


def test_formatting_helpers():
    assert format_bytes(512) == "512 B" and format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_duration(3725) == "1h02m" and format_duration(float("nan")) == "?"
    assert peak_memory_bytes("cpu") > 10 * 2**20  # this process's peak RSS, in bytes
