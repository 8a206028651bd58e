"""Checkpoint directories: bitwise round trip, training state without pickles, clear errors."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from instalign.checkpoint import (
    CONFIG_FILE,
    STATE_JSON_FILE,
    STATE_TENSORS_FILE,
    TEXT_ENCODER_DIR,
    WEIGHTS_FILE,
    CheckpointError,
    export_inference_checkpoint,
    load_model,
    load_training_state,
    save_checkpoint,
)
from instalign.config import TINY_TEXT_ENCODER, tiny
from instalign.integrity import SEAL_FILE, seal
from instalign.modeling.builders import build_model
from instalign.modeling.text_encoder import load_tokenizer
from instalign.optim import build_optimizer, build_scheduler


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model after three optimizer steps, saved with its training state."""
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model.text_encoder)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1, text_encoder_lr_mult=0.1)
    scheduler = build_scheduler(optimizer, total_steps=10, lr=1e-3, min_lr=1e-5)
    s = cfg.model.image_size
    images = torch.randn(2, 3, s, s)
    ids, attn = tokenizer(["the red square", "two blue circles"], padding="max_length", max_length=20,
                          return_tensors="pt").values()
    for _ in range(3):
        out = model(images, ids, attn)
        loss = out.merged_logits.sigmoid().mean() + out.no_target_logits.mean() + out.final.score_logits.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    directory = tmp_path_factory.mktemp("ckpt") / "step_3"
    rng_at_save = torch.get_rng_state()
    save_checkpoint(directory, model, cfg, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                    step=3, epoch=1, best_metric={"gIoU": 12.5}, history=[0.5, 0.25])
    return SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, inputs=(images, ids, attn),
                           directory=directory, rng=rng_at_save)


def test_layout_is_self_contained(trained):
    directory = trained.directory
    for name in (CONFIG_FILE, WEIGHTS_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE):
        assert (directory / name).is_file(), name
    assert (directory / TEXT_ENCODER_DIR / "config.json").is_file()
    assert (directory / TEXT_ENCODER_DIR / "tokenizer_config.json").is_file()
    assert not list(directory.glob("*.pt")) and not list(directory.glob("*.pkl")) and not list(directory.glob(".*"))
    json.loads((directory / STATE_JSON_FILE).read_text())  # plain JSON


def test_load_gives_bitwise_identical_outputs(trained):
    cfg, model, directory = trained.cfg, trained.model, trained.directory
    images, ids, attn = trained.inputs
    loaded, loaded_cfg = load_model(directory)
    assert not loaded.training
    model.eval()
    with torch.no_grad():
        a, b = model(images, ids, attn), loaded(images, ids, attn)
    assert torch.equal(a.merged_logits, b.merged_logits)
    assert torch.equal(a.no_target_logits, b.no_target_logits)
    assert torch.equal(a.final.mask_logits, b.final.mask_logits)
    assert torch.equal(a.final.phrase_weights, b.final.phrase_weights)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    # The returned config is the saved one, pointed at the checkpoint's own text encoder.
    assert loaded_cfg.model.num_queries == cfg.model.num_queries
    assert loaded_cfg.model.text_encoder.name == str((directory / TEXT_ENCODER_DIR).resolve())
    assert loaded_cfg.model.text_encoder.pretrained is False and loaded_cfg.model.backbone.pretrained is False
    assert load_tokenizer(loaded_cfg.model.text_encoder)("the red square")["input_ids"] == \
        load_tokenizer(TINY_TEXT_ENCODER)("the red square")["input_ids"]
    # config.yaml keeps what the run used.
    assert f"name: {TINY_TEXT_ENCODER}" in (directory / CONFIG_FILE).read_text()


def test_training_state_round_trip(trained, tmp_path):
    optimizer, scheduler, directory = trained.optimizer, trained.scheduler, trained.directory
    fresh, _ = load_model(directory)
    opt2 = build_optimizer(fresh, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1, text_encoder_lr_mult=0.1)
    sched2 = build_scheduler(opt2, total_steps=10, lr=1e-3, min_lr=1e-5)
    torch.manual_seed(123)
    state = load_training_state(directory, opt2, sched2)
    assert state == {"step": 3, "epoch": 1, "best_metric": {"gIoU": 12.5}, "history": [0.5, 0.25]}
    # RNG restored to the moment of saving.
    assert torch.equal(torch.get_rng_state(), trained.rng)
    assert sched2.last_epoch == scheduler.last_epoch == 3
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups])
    a, b = optimizer.state_dict(), opt2.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, value in a["state"][k].items():
            assert torch.equal(value, b["state"][k][name]), (k, name)
    assert [{k: v for k, v in g.items() if k != "params"} for g in a["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "params"} for g in b["param_groups"]]
    # A step after resume equals a step of the original (same moments, same schedule).
    assert sched2.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_ddp_wrapped_model_saves_bare_weights(trained, tmp_path):
    cfg, model = trained.cfg, trained.model
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        directory = save_checkpoint(tmp_path / "ddp", ddp, cfg, tokenizer=load_tokenizer(cfg.model.text_encoder))
    finally:
        torch.distributed.destroy_process_group()
    loaded, _ = load_model(directory)
    assert set(loaded.state_dict()) == set(model.state_dict())  # no "module." prefix
    assert not (directory / STATE_JSON_FILE).exists()  # weights-only checkpoint


def test_resave_a_loaded_model_in_place(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained.directory, copy)
    model, cfg = load_model(copy)
    save_checkpoint(copy, model, cfg)  # tokenizer=None: read from copy/text_encoder before it is rewritten
    again, _ = load_model(copy)
    images, ids, attn = trained.inputs
    with torch.no_grad():
        assert torch.equal(model(images, ids, attn).merged_logits, again(images, ids, attn).merged_logits)
    assert not (copy / STATE_JSON_FILE).exists()  # weights-only save: the old training state is gone


SEALED = [CONFIG_FILE, WEIGHTS_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE, f"{TEXT_ENCODER_DIR}/config.json",
          f"{TEXT_ENCODER_DIR}/tokenizer_config.json", f"{TEXT_ENCODER_DIR}/tokenizer.json"]


def test_the_seal_lists_every_file(trained):
    listed = json.loads((trained.directory / SEAL_FILE).read_text())["files"]
    assert set(SEALED) <= set(listed)
    on_disk = {p.relative_to(trained.directory).as_posix() for p in trained.directory.rglob("*") if p.is_file()}
    assert on_disk - set(listed) == {SEAL_FILE}


@pytest.mark.parametrize("damage", ["remove", "truncate", "alter"])
@pytest.mark.parametrize("name", SEALED)
def test_a_missing_or_damaged_file_fails_loading_naming_it(trained, tmp_path, name, damage):
    copy = tmp_path / "copy"
    shutil.copytree(trained.directory, copy)
    path = copy / name
    if damage == "remove":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # same size, one byte flipped: only the digest sees it
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        model, _ = load_model(copy)
        load_training_state(copy, build_optimizer(model, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1,
                                                  text_encoder_lr_mult=0.1))


def test_an_unsealed_or_empty_config_checkpoint_is_refused(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained.directory, copy)
    (copy / SEAL_FILE).unlink()  # a partial copy, or written by an older version
    with pytest.raises(CheckpointError, match=f"{SEAL_FILE}: missing"):
        load_model(copy)
    (copy / CONFIG_FILE).write_text("")
    seal(copy, kind="checkpoint")  # sealed as empty: the config error, not "245 shape mismatches"
    with pytest.raises(CheckpointError, match="config.yaml is not a valid config: the file is empty"):
        load_model(copy)


def test_other_bad_directories(trained, tmp_path):
    cfg, directory = trained.cfg, trained.directory
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="training state"):
        load_training_state(tmp_path)
    # Weights from another architecture: a mismatch error, not a silent partial load.
    copy = tmp_path / "other"
    shutil.copytree(directory, copy)
    (copy / CONFIG_FILE).write_text(cfg.to_yaml().replace("num_blocks: 3", "num_blocks: 2"))
    seal(copy, kind="checkpoint")  # a consistent seal over inconsistent content
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(copy)
    # A weights file that is not safetensors at all, sealed as it is.
    (copy / CONFIG_FILE).write_text(cfg.to_yaml())
    (copy / WEIGHTS_FILE).write_bytes(b"not safetensors")
    seal(copy, kind="checkpoint")
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_model(copy)


def test_unpicklable_state_is_refused(trained, tmp_path):
    cfg, model = trained.cfg, trained.model
    with pytest.raises(TypeError, match="state.callback"):
        save_checkpoint(tmp_path / "bad", model, cfg, tokenizer=load_tokenizer(cfg.model.text_encoder),
                        callback=object())


# --- inference copies ----------------------------------------------------------------------------

def test_an_inference_export_loads_alike_without_training_state(trained, tmp_path):
    """What MLflow gets (``checkpoints/best``, the model's ``checkpoint``): the weights, config and
    tokenizer under a seal of their own — it loads, and says it cannot resume."""
    images, ids, attn = trained.inputs
    out = export_inference_checkpoint(trained.directory, tmp_path / "inference")
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    listed = json.loads((out / SEAL_FILE).read_text())["files"]
    assert set(listed) == on_disk - {SEAL_FILE}
    assert not {STATE_JSON_FILE, STATE_TENSORS_FILE} & on_disk
    source = json.loads((trained.directory / SEAL_FILE).read_text())["files"]
    assert {k: v for k, v in source.items() if k not in (STATE_JSON_FILE, STATE_TENSORS_FILE)} == listed
    a, _ = load_model(trained.directory)
    b, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(a(images, ids, attn).merged_logits, b(images, ids, attn).merged_logits)
    with pytest.raises(CheckpointError, match="has no training state"):
        load_training_state(out)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, STATE_TENSORS_FILE])
def test_an_inference_export_refuses_a_damaged_source(trained, tmp_path, name):
    """Even a damaged file the export would leave out: the source is not what its seal says."""
    copy = tmp_path / "copy"
    shutil.copytree(trained.directory, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{name}: content differs")):
        export_inference_checkpoint(copy, tmp_path / "out")
    assert not (tmp_path / "out" / SEAL_FILE).exists()


def test_an_inference_export_needs_an_empty_destination(trained, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        export_inference_checkpoint(trained.directory, tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a directory"):
        export_inference_checkpoint(tmp_path / "nowhere", tmp_path / "out2")
