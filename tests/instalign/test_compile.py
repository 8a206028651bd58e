"""``torch.compile`` by device (issue 28): compiled on CUDA unless switched off, eager on CPU.

One pure rule (``engine.resolve_compile``) decides for training, validation and the Predictor;
it is tested on device *strings*, so the CUDA branch is checked on a machine without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from instalign.config import ConfigError, load_config, paper, tiny
from instalign.engine import resolve_compile


@pytest.mark.parametrize("setting, device, want", [
    ("auto", "cuda", True), ("auto", "cuda:1", True), ("auto", "cpu", False),
    (True, "cpu", True), (True, "cuda", True), (False, "cuda", False), (False, "cpu", False),
])
def test_compile_resolves_by_device(setting, device, want):
    assert resolve_compile(setting, device) is want
    assert resolve_compile(setting, torch.device(device)) is want


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_compile_setting_is_refused(bad):
    with pytest.raises(ValueError, match="expected True, False or 'auto'"):
        resolve_compile(bad, "cuda")


def test_train_compile_is_auto_by_default_and_takes_booleans():
    """Both presets default to ``auto``: compiled on CUDA, the same eager CPU run as before."""
    assert paper().train.compile == "auto" and tiny().train.compile == "auto"
    assert resolve_compile(tiny().train.compile, "cpu") is False  # the quickstart stays eager
    assert load_config("tiny", ["train.compile=false"]).train.compile is False
    assert load_config("tiny", ["train.compile=true"]).train.compile is True
    assert load_config("tiny", ["train.compile=auto"]).train.compile == "auto"
    for bad in ("sometimes", "1"):
        with pytest.raises(ConfigError, match="train.compile"):
            load_config("tiny", [f"train.compile={bad}"])


def test_a_saved_config_with_the_old_boolean_still_loads(tmp_path):
    """Checkpoints written before the tri-state hold ``compile: false``: it stays False (forced eager)."""
    path = tmp_path / "old.yaml"
    path.write_text(tiny().to_yaml().replace("compile: auto", "compile: false"))
    assert "compile: false" in path.read_text()
    assert load_config(path).train.compile is False
