"""Checkpoints as self-contained directories, without pickles.

A checkpoint is a directory that loads offline anywhere::

    config.yaml                    the resolved Config (Config.to_yaml)
    model.safetensors              the weights (the bare model under DDP / torch.compile)
    text_encoder/                  the text encoder's Hugging Face config + tokenizer files
                                   (save_pretrained), so no hub access is ever needed
    training_state.safetensors     optional: optimizer tensors, RNG states
    training_state.json            optional: everything else (param groups, scheduler,
                                   step, epoch, best metric, ...) with tensor placeholders
    _SEALED.json                   written last: every file above with its size and SHA-256
                                   (``instalign.integrity``)

Completeness is proven by the seal, not by which file was written last: Ray's storage
upload, MLflow artifacts and rsync copy files in any order, so a reader anywhere checks
each listed file's size and digest (:func:`checkpoint_files`) and a missing, truncated or
altered file is named in a :class:`CheckpointError` — never loaded (a checkpoint without its
``tokenizer.json`` used to load a 5-token tokenizer and answer every expression alike).

Only resuming needs the training state, and it is twice the weights (AdamW's two moments per
parameter). Copies made for inference — the MLflow run's ``checkpoints/best``, the registered
model's ``checkpoint`` artifact, fetched by every serving replica and batch actor — are made
with :func:`export_inference_checkpoint`: the weights, config and tokenizer under a seal of
their own. Dropping files from a copy but keeping the original seal would make a directory
that no reader accepts (the seal lists the files it lacks).

``load_model`` rebuilds the architecture with pretrained weights OFF (backbone
``pretrained=False``; text encoder from ``<dir>/text_encoder`` with ``pretrained=False``)
and loads the safetensors strictly, so the result is exactly what was saved. Nothing is
ever unpickled: the optimizer and scheduler state go through a small JSON encoder whose
tensors live in safetensors (``torch.load`` is not used at all).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model as _st_load_model, save_file, save_model as _st_save_model
from torch import nn

from instalign.config import Config, ConfigError, load_config
from instalign.errors import InstAlignError
from instalign.integrity import IntegrityError, seal, unseal, verify

__all__ = ["CheckpointError", "save_checkpoint", "load_model", "load_training_state", "checkpoint_files",
           "export_inference_checkpoint", "TRAINING_STATE_FILES",
           "unwrap_model", "REQUIRED_FILES", "CONFIG_FILE", "WEIGHTS_FILE", "TEXT_ENCODER_DIR", "STATE_TENSORS_FILE", "STATE_JSON_FILE"]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
#: What only resuming reads; an inference copy (:func:`export_inference_checkpoint`) leaves it out.
TRAINING_STATE_FILES = (STATE_TENSORS_FILE, STATE_JSON_FILE)
FORMAT_VERSION = 2
SEAL_KIND = "checkpoint"
#: Files every checkpoint lists in its seal (the tokenizer's own files are listed as saved).
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, f"{TEXT_ENCODER_DIR}/config.json",
                  f"{TEXT_ENCODER_DIR}/tokenizer_config.json")


class CheckpointError(InstAlignError, FileNotFoundError):
    """A checkpoint directory is missing, incomplete or does not match the model."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under ``DistributedDataParallel`` (``.module``) or ``torch.compile``."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _hf_text_model(model: nn.Module):
    """The Hugging Face ``PreTrainedModel`` inside the model (its config is what we save)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise CheckpointError("save_checkpoint: the model contains no transformers.PreTrainedModel text encoder")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --- a tiny pickle-free encoder: JSON structure + named tensors ------------------------------

def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        # int keys (optimizer state is keyed by parameter index) must survive JSON.
        items = [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state at {where}: cannot store a {type(obj).__name__} without pickling; "
                    "pass tensors, numbers, strings, lists or dicts")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save ------------------------------------------------------------------------------------

def save_checkpoint(directory: Union[str, Path], model: nn.Module, cfg: Config, *, tokenizer: Any = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
                    **state: Any) -> Path:
    """Write a checkpoint directory (see the module docstring) and return its path.

    Args:
        model: the model, possibly DDP-wrapped or compiled; the bare weights are saved.
        cfg: the run's resolved config, stored as ``config.yaml``.
        tokenizer: saved under ``text_encoder/``; when ``None`` it is loaded from
            ``cfg.model.text_encoder`` (which must then be available offline).
        optimizer, scheduler: when given, the training state is saved with their state.
        **state: extra training state (``step``, ``epoch``, ``best_metric``, ...): numbers,
            strings, lists, dicts or tensors — nothing that needs pickling.

    The seal is removed first and written last: a directory re-saved in place is visibly
    incomplete until every file is back.
    """
    directory = Path(directory)
    model = unwrap_model(model)
    # Encode the training state first: an unstorable value fails before anything is written.
    tensors: dict[str, torch.Tensor] = {}
    payload = None
    if optimizer is not None or scheduler is not None or state:
        payload = {
            "format_version": FORMAT_VERSION,
            "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer") if optimizer is not None else None,
            "scheduler": _encode(scheduler.state_dict(), tensors, "scheduler") if scheduler is not None else None,
            "rng": _encode(_rng_state(), tensors, "rng"),
            "state": _encode(state, tensors, "state"),
        }
    text_model = _hf_text_model(model)
    if tokenizer is None:  # loaded before anything is replaced: it may live in this very directory
        from instalign.modeling.text_encoder import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.text_encoder)
    directory.mkdir(parents=True, exist_ok=True)
    unseal(directory)  # incomplete until sealed again, last

    weights_tmp = directory / f".{WEIGHTS_FILE}.tmp"
    _st_save_model(model, str(weights_tmp), metadata={"format": "instalign", "version": str(FORMAT_VERSION)})
    os.replace(weights_tmp, directory / WEIGHTS_FILE)

    text_dir = directory / TEXT_ENCODER_DIR
    shutil.rmtree(text_dir, ignore_errors=True)  # no stale tokenizer files from an older save
    text_dir.mkdir()
    text_model.config.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)

    if payload is None:  # a weights-only save over an older checkpoint must not leave stale state
        for name in (STATE_TENSORS_FILE, STATE_JSON_FILE):
            (directory / name).unlink(missing_ok=True)
    else:
        tmp = directory / f".{STATE_TENSORS_FILE}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / STATE_TENSORS_FILE)
        _atomic_write_bytes(directory / STATE_JSON_FILE, json.dumps(payload).encode())

    _atomic_write_bytes(directory / CONFIG_FILE, cfg.to_yaml().encode())
    written = [CONFIG_FILE, WEIGHTS_FILE] + sorted(p.relative_to(directory).as_posix()
                                                   for p in text_dir.rglob("*") if p.is_file())
    if payload is not None:
        written += [STATE_TENSORS_FILE, STATE_JSON_FILE]
    seal(directory, kind=SEAL_KIND, files=written, meta={"format_version": FORMAT_VERSION})
    return directory


# --- load ------------------------------------------------------------------------------------

def _verified_seal(directory: Path, required, *, digests: bool = True) -> dict[str, Any]:
    """The checkpoint's seal after checking every listed file; a :class:`CheckpointError` naming
    the bad file otherwise."""
    try:
        return verify(directory, kind=SEAL_KIND, required=required, digests=digests)
    except IntegrityError as e:
        raise CheckpointError(f"checkpoint {directory} is incomplete or damaged: {e.file}: {e.problem}") from None


def checkpoint_files(directory: Union[str, Path], *, digests: bool = True) -> dict[str, Path]:
    """The required files of a checkpoint, after checking every file against the seal.

    Raises:
        CheckpointError: naming the checkpoint and the missing, truncated or altered file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory}: not a directory")
    _verified_seal(directory, REQUIRED_FILES, digests=digests)
    return {
        "config": directory / CONFIG_FILE,
        "weights": directory / WEIGHTS_FILE,
        "text_encoder_config": directory / TEXT_ENCODER_DIR / "config.json",
        "tokenizer_config": directory / TEXT_ENCODER_DIR / "tokenizer_config.json",
    }


def _loading_config(cfg: Config, directory: Path) -> Config:
    """``cfg`` with every pretrained-weight source turned off and the text encoder local."""
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.pretrained = False
    cfg.model.text_encoder.name = str((directory / TEXT_ENCODER_DIR).resolve())
    cfg.model.text_encoder.pretrained = False
    return cfg


def _check_compatible(model: nn.Module, weights: Path, directory: Path) -> None:
    """Compare tensor shapes in the file header with the freshly built model (no data read)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # corrupt header / not a safetensors file
        raise CheckpointError(f"checkpoint {directory}: cannot read {WEIGHTS_FILE}: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k}: file {shapes[k]} vs model {expected[k]}" for k in sorted(shapes.keys() & expected.keys())
             if shapes[k] != expected[k]]
    if wrong:
        raise CheckpointError(f"checkpoint {directory}: {WEIGHTS_FILE} does not match the architecture in "
                              f"{CONFIG_FILE} ({len(wrong)} shape mismatches, e.g. {wrong[:3]})")


def load_model(directory: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild the model from a checkpoint directory and load its weights strictly.

    Returns:
        ``(model, cfg)``: the model in eval mode on ``device``; ``cfg`` is the saved config
        with pretrained sources off and ``model.text_encoder.name`` pointing at
        ``<dir>/text_encoder``, so ``load_tokenizer(cfg.model.text_encoder)`` and
        ``build_model(cfg.model)`` work offline.
    """
    from instalign.modeling.builders import build_model

    directory = Path(directory)
    files = checkpoint_files(directory)
    try:
        if not files["config"].read_text().strip():
            raise ConfigError("the file is empty")
        saved = load_config(files["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE} is not a valid config: {e}") from None
    cfg = _loading_config(saved, directory)
    model = build_model(cfg.model)
    _check_compatible(model, files["weights"], directory)
    try:
        missing, unexpected = _st_load_model(model, str(files["weights"]), strict=False, device="cpu")
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"checkpoint {directory}: cannot load {WEIGHTS_FILE}: {e}") from e
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory}: {WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE}: "
            f"missing keys {sorted(missing)[:8]}, unexpected keys {sorted(unexpected)[:8]}")
    return model.to(device).eval(), cfg


def load_training_state(directory: Union[str, Path], optimizer: Optional[torch.optim.Optimizer] = None,
                        scheduler: Any = None, *, restore_rng: bool = True) -> dict[str, Any]:
    """Restore optimizer / scheduler / RNG state in place; return the extra ``**state`` saved.

    The optimizer must have been built the same way (same parameter groups) as when saved.
    """
    directory = Path(directory)
    paths = [directory / STATE_JSON_FILE, directory / STATE_TENSORS_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} has no training state: missing {', '.join(missing)}")
    _verified_seal(directory, [STATE_JSON_FILE, STATE_TENSORS_FILE])
    try:
        payload = json.loads(paths[0].read_text())
        tensors = load_file(str(paths[1]))
    except Exception as e:  # json / safetensors errors of a file altered after sealing
        raise CheckpointError(f"checkpoint {directory}: cannot read its training state: {e}") from None
    if optimizer is not None:
        if payload.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {directory}: {STATE_JSON_FILE} holds no optimizer state")
        optimizer.load_state_dict(_decode(payload["optimizer"], tensors))
    if scheduler is not None:
        if payload.get("scheduler") is None:
            raise CheckpointError(f"checkpoint {directory}: {STATE_JSON_FILE} holds no scheduler state")
        scheduler.load_state_dict(_decode(payload["scheduler"], tensors))
    if restore_rng and payload.get("rng") is not None:
        _set_rng_state(_decode(payload["rng"], tensors))
    return _decode(payload["state"], tensors)


# --- export ----------------------------------------------------------------------------------

def export_inference_checkpoint(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Copy what inference needs from checkpoint ``src`` into the new directory ``dst``, sealed anew.

    ``dst`` gets every file ``src``'s seal lists except :data:`TRAINING_STATE_FILES` (weights,
    config, the tokenizer files) and a seal listing exactly those: it loads with
    :func:`load_model` anywhere it is copied, and :func:`load_training_state` says it has no
    training state. ``src`` is verified against its seal first (digests included), and each copy
    must have its source's digest, so the new seal never vouches for a damaged file.

    Raises:
        CheckpointError: ``src`` is incomplete or damaged, ``dst`` is not empty, or a copy
            differs from its source (``src`` rewritten meanwhile).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"checkpoint {src}: not a directory")
    listing = _verified_seal(src, REQUIRED_FILES)["files"]
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"export of checkpoint {src}: {dst} exists and is not an empty directory")
    keep = sorted(rel for rel in listing if rel not in TRAINING_STATE_FILES)
    for rel in keep:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    sealed = seal(dst, kind=SEAL_KIND, files=keep, meta={"format_version": FORMAT_VERSION, "training_state": False})
    changed = [rel for rel in keep if sealed["files"][rel]["sha256"] != listing[rel]["sha256"]]
    if changed:
        unseal(dst)
        raise CheckpointError(f"export of checkpoint {src}: {changed[0]} changed while it was copied; "
                              "export it again once nothing writes to it")
    return dst
