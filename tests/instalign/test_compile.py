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


@pytest.fixture(scope="module")
def tiny_parts():
    from instalign.modeling.builders import build_model
    from instalign.modeling.text_encoder import load_tokenizer

    cfg = tiny()
    torch.manual_seed(0)
    return cfg, build_model(cfg.model), load_tokenizer(cfg.model.text_encoder)


def test_the_predictor_is_eager_on_cpu_by_default_and_compiles_when_asked(tiny_parts):
    from instalign.predictor import Predictor

    cfg, model, tokenizer = tiny_parts
    eager = Predictor(model, cfg, tokenizer, "cpu")
    assert eager.compiled is False and eager._compiled_model is None
    forced = Predictor(model, cfg, tokenizer, "cpu", compile=True)  # compiling is lazy: nothing runs here
    assert forced.compiled is True and forced._compiled_model._orig_mod is forced.model is model
    assert Predictor(model, cfg, tokenizer, "cpu", compile=False).compiled is False
    with pytest.raises(ValueError, match="compile="):
        Predictor(model, cfg, tokenizer, "cpu", compile="sometimes")


def test_a_compiler_failure_falls_back_to_the_eager_answer(tiny_parts, caplog):
    """A real ``torch.compile`` whose backend fails: the request is answered, eagerly, and equal."""
    import numpy as np

    from instalign.predictor import Predictor

    cfg, model, tokenizer = tiny_parts
    calls = []

    def broken_backend(graph_module, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("no kernels today")

    image = np.full((40, 50, 3), 120, np.uint8)
    want = Predictor(model, cfg, tokenizer, "cpu").predict(image, "the thing on the left")
    predictor = Predictor(model, cfg, tokenizer, "cpu", compile=True)
    predictor._compiled_model = torch.compile(model, backend=broken_backend)
    with caplog.at_level("WARNING", logger="instalign.predictor"):
        got = predictor.predict(image, "the thing on the left")
    assert calls, "the compiled forward was not the one called"
    assert predictor.compiled is False and "runs eagerly from now on" in caplog.text
    assert np.array_equal(got.mask, want.mask) and got.no_target_prob == want.no_target_prob
    predictor.predict(image, "the thing on the left")  # eager now: the broken backend is not tried again
    assert len(calls) == 1
