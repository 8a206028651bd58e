"""Typed configuration for InstAlign: model, loss, data and training.

The config is a tree of dataclasses (DESIGN §6.3). YAML is only how it is stored:
``load_config`` reads a file or a preset name, applies dotted overrides
(``model.num_queries=50``) and validates every field in ``__post_init__``; unknown
keys are an error naming the key. The tree is read once at an entry point and turned
into keyword arguments there: no ``nn.Module`` ever receives a config object.

Two presets:

* ``paper`` — the paper's model (§3, §4.1): Swin-B ``swin_base_patch4_window12_384`` with
  its ImageNet-22k weights (timm tag ``ms_in22k``, as Mask2Former and ReLA) at 480×480, RoBERTa-base, C=256, N=100 queries, K=9 Phrase-Object Transformer blocks, a
  6-layer deformable pixel decoder and the loss weights of eq. 13 and eq. 5–7.
* ``tiny`` — the same architecture at toy width for tests and the quickstart: a
  one-block-per-stage Swin at 128×128 and a 2-layer RoBERTa, random init, CPU-fast.

How a mapping becomes this tree, and the error every bad value raises, are
``instalign.config_checks``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from instalign.config_checks import ConfigError, build_dataclass, check, check_literal, to_plain

InstanceSupervision = Literal["phrase_aligned", "vanilla", "none"]
Aggregation = Literal["aia", "aia_no_prelu", "fixed_threshold"]
NoTargetInput = Literal["concat", "q_global", "t_sen", "mean_queries"]
Decoder = Literal["pot", "mask2former", "rela"]
Precision = Literal["auto", "bf16", "fp32"]
#: How a Ray training job reads its samples (``pipelines.data.loader``): ``streaming`` (any size,
#: reshuffled per epoch) or ``ordered`` (reproducible for any worker count).
DataOrder = Literal["streaming", "ordered"]
#: A config value worked out from the prepared dataset when a job is planned (``pipelines.training.job``).
Auto = Literal["auto"]

#: Reserved text-encoder name: a 2-layer RoBERTa with a byte-level BPE tokenizer that
#: ``instalign.modeling.tiny_text`` writes to a local directory (Hugging Face layout) and
#: that is then loaded through the ordinary ``from_pretrained`` path. Random init.
TINY_TEXT_ENCODER = "instalign/tiny-roberta"


@dataclass
class BackboneConfig:
    """Visual encoder (paper §3.1): any timm model that supports ``features_only``."""

    #: A timm name, optionally with a pretrained tag after a dot. The paper (like Mask2Former
    #: and ReLA) starts from Swin-B's ImageNet-22k weights: the tag ``ms_in22k``. Without a tag
    #: timm would pick its default, ``ms_in22k_ft_in1k`` (fine-tuned on ImageNet-1k).
    name: str = "swin_base_patch4_window12_384.ms_in22k"
    #: True: the timm hub weights; a path: a local weights file (.safetensors/.pth); False: random init.
    pretrained: Union[bool, str] = True
    #: Feature levels to take; the pixel decoder reads channels/strides from timm's ``feature_info``.
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    #: Extra keyword arguments for ``timm.create_model`` (e.g. ``embed_dim``/``depths`` of a tiny Swin).
    #: The paper preset sets Swin-B's stochastic depth to Mask2Former's 0.3 explicitly (timm's
    #: silent default would be 0.1).
    kwargs: dict[str, Any] = field(default_factory=lambda: {"drop_path_rate": 0.3})

    def __post_init__(self) -> None:
        self.out_indices = tuple(self.out_indices)
        check(len(self.out_indices) == 4, "model.backbone.out_indices: need 4 levels (strides 4, 8, 16, 32)")


@dataclass
class TextEncoderConfig:
    """Text encoder (paper §3.1): a Hugging Face ``AutoModel`` by hub name or local directory."""

    name: str = "roberta-base"
    #: True: load weights with ``from_pretrained``; False: random init from the same config.
    pretrained: bool = True
    #: Extra ``AutoConfig`` overrides (ignored unless ``pretrained`` is False).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    #: Tokens per expression including special tokens (ReLA uses 20).
    max_tokens: int = 20

    def __post_init__(self) -> None:
        check(self.max_tokens >= 3, "model.text_encoder.max_tokens must be >= 3")


@dataclass
class PixelDecoderConfig:
    """Mask2Former's multi-scale deformable-attention pixel decoder (DESIGN §1)."""

    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024
    #: "pytorch" (memory-lean grid_sample path, any device), "reference" (the naive path, for tests and
    #: debugging) or "auto" (a registered kernel where it is available for the input, else "pytorch").
    attention_impl: Literal["pytorch", "reference", "auto"] = "auto"

    def __post_init__(self) -> None:
        check(self.num_layers >= 0, "model.pixel_decoder.num_layers must be >= 0")
        check_literal(self, "attention_impl")


@dataclass
class ModelConfig:
    """The InstAlign model (paper §3) with every ablation switch of Table 3."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    #: Square input side; images are plainly resized to it (ReLA: aspect not kept).
    image_size: int = 480
    hidden_dim: int = 256  # C
    num_queries: int = 100  # N
    num_blocks: int = 9  # K
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0
    pre_norm: bool = False
    # --- Table 3 switches -------------------------------------------------------------
    aggregation: Aggregation = "aia"
    #: τ for ``aggregation=fixed_threshold``: instances with p̂ > τ are unioned.
    score_threshold: float = 0.5
    no_target_input: NoTargetInput = "concat"
    #: ``pot`` (the paper's blocks), ``mask2former`` (no text anywhere in the decoder) or
    #: ``rela`` (ReLA's region-language cross-attention in place of the object–text step).
    decoder: Decoder = "pot"

    def __post_init__(self) -> None:
        for name in ("aggregation", "no_target_input", "decoder"):
            check_literal(self, name)
        check(self.image_size % 32 == 0, f"model.image_size={self.image_size}: must be a multiple of 32")
        # The backbone is built for model.image_size (``img_size``); a second size in its kwargs
        # would win there and fail at the first forward pass with timm's own assertion.
        img_size = self.backbone.kwargs.get("img_size", self.image_size)
        check(img_size == self.image_size, f"model.backbone.kwargs.img_size={img_size} differs from "
              f"model.image_size={self.image_size}: drop it, the backbone is built for model.image_size")
        check(self.hidden_dim % self.num_heads == 0, "model.hidden_dim must be divisible by model.num_heads")
        check(self.num_queries >= 1, "model.num_queries must be >= 1")
        check(self.num_blocks >= 1, "model.num_blocks must be >= 1")
        check(0.0 < self.score_threshold < 1.0, "model.score_threshold must be in (0, 1)")


@dataclass
class LossConfig:
    """Training objective (paper §3.4–3.7, eqs. 5–9 and 13)."""

    merged_weight: float = 5.0  # λ_merged (eq. 13)
    inst_weight: float = 1.0  # λ_inst (eq. 13)
    nt_weight: float = 0.1  # λ_nt (eq. 13)
    #: Weight of the no-target (positive) samples in the no-target BCE. The paper is silent on
    #: class balance; 1 is the plain BCE (the ``paper`` preset), ``r = (1 - share) / share``
    #: (``share``: the train split's no-target share) balances the classes. ``auto`` (the ``tiny``
    #: preset) is ``sqrt(r)`` of the prepared train split, worked out from its manifest when a job
    #: is planned (``instalign.losses.balanced_nt_pos_weight``; docs/objective.md).
    nt_pos_weight: Union[float, Auto] = 1.0
    score_weight: float = 2.0  # λ_score (eqs. 5, 7)
    mask_weight: float = 5.0  # λ_mask, on BCE + dice (eqs. 5, 7)
    phrase_weight: float = 1.0  # λ_phrase (eqs. 3, 5, 7)
    instance_supervision: InstanceSupervision = "phrase_aligned"
    deep_supervision: bool = True
    num_points: int = 12544  # Mask2Former: 112 × 112 sampled points
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75

    def __post_init__(self) -> None:
        check_literal(self, "instance_supervision")
        for name in ("merged_weight", "inst_weight", "nt_weight", "score_weight", "mask_weight", "phrase_weight"):
            check(getattr(self, name) >= 0, f"loss.{name} must be >= 0")
        check(self.nt_pos_weight == "auto" or (isinstance(self.nt_pos_weight, float) and self.nt_pos_weight > 0),
               f"loss.nt_pos_weight={self.nt_pos_weight!r}: must be > 0 or 'auto'")
        check(self.num_points >= 1, "loss.num_points must be >= 1")
        check(self.oversample_ratio >= 1.0, "loss.oversample_ratio must be >= 1")
        check(0.0 <= self.importance_sample_ratio <= 1.0, "loss.importance_sample_ratio must be in [0, 1]")


@dataclass
class DataConfig:
    """What training reads from a prepared Parquet dataset."""

    train_split: str = "train"
    val_split: str = "val"
    #: Cap on samples per split (0 = all); for smoke runs.
    max_train_samples: int = 0
    max_val_samples: int = 0
    #: Validation samples drawn as overlays into the tracking store each epoch.
    num_overlays: int = 4

    def __post_init__(self) -> None:
        check(self.max_train_samples >= 0 and self.max_val_samples >= 0, "data.max_*_samples must be >= 0")


@dataclass
class TrainConfig:
    """Optimisation (DESIGN §2): AdamW, linear decay, bf16 autocast on GPU."""

    epochs: int = 20
    #: Stop after this many optimizer steps (0 = run all epochs); the schedule still spans ``epochs``.
    max_steps: int = 0
    batch_size: int = 32  # global, split across workers
    #: Micro-batches accumulated per optimizer step. The global batch ``batch_size`` = per-worker
    #: micro-batch × workers × ``grad_accum_steps`` (so it must divide evenly); gradients, the
    #: eq. 7 instance normaliser and the logged losses are those of the whole global batch
    #: (docs/objective.md). Steps, ``max_steps`` and the schedule count optimizer steps.
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1  # Mask2Former's backbone multiplier
    text_encoder_lr_mult: float = 0.1  # as the backbone: both are pretrained encoders
    #: Full-model gradient-norm clip (0 = off). The paper is silent; Mask2Former (and ReLA, built
    #: on it) clip the full model's gradient norm at 0.01 with AdamW (``CLIP_TYPE: full_model``,
    #: ``CLIP_VALUE: 0.01``), so the paper preset does too. Under AdamW a clip that fires on
    #: every step only re-weights steps against each other (Adam divides out the global
    #: scale); the engine logs the pre-clip norm (``grad_norm``) and the share of clipped
    #: steps (``grad_clipped``) so a user sees it.
    grad_clip: float = 0.01
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    log_every_steps: int = 10  # metrics to the tracker (window means)
    #: A progress line on rank 0 (epoch, step, losses, lr, samples/s, ETA, peak memory) when a
    #: report crosses a multiple of this; 0 = only the per-epoch validation lines.
    print_every_steps: int = 50
    checkpoint_every_steps: int = 0  # 0 = only at epoch end
    keep_checkpoints: int = 2  # top-k by val gIoU
    #: ``torch.compile`` the model for training and validation: ``auto`` (default) compiles on
    #: CUDA, where fused kernels pay for the compilation many times over, and stays eager on CPU,
    #: where compiling costs minutes of a short run (the quickstart's numbers are eager);
    #: ``true``/``false`` force it (``instalign.engine.resolve_compile``).
    compile: Union[bool, Auto] = "auto"
    #: Recompute activations in the backward pass instead of storing them (less memory, one more
    #: forward of those parts per step): timm's ``set_grad_checkpointing`` on the Swin backbone and
    #: ``torch.utils.checkpoint`` around each pixel-decoder layer. Gradients are unchanged.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_literal(self, "precision")
        check(isinstance(self.compile, bool) or self.compile == "auto",
              f"train.compile={self.compile!r}: expected true, false or 'auto'")
        check(self.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1")
        check(self.epochs >= 1, "train.epochs must be >= 1")
        check(self.batch_size >= 1, "train.batch_size must be >= 1")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr, "train.lr must be > 0 and 0 <= train.min_lr <= train.lr")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 = off)")
        check(self.log_every_steps >= 1, "train.log_every_steps must be >= 1")
        check(self.print_every_steps >= 0, "train.print_every_steps must be >= 0 (0 = validation lines only)")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # --- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "Config":
        return build_dataclass(cls, data, source)

    def to_yaml(self, path: Union[str, Path, None] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values (``model.num_queries`` → 100): MLflow params, Tune keys."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and node and all(isinstance(k, str) for k in node) and not prefix.endswith("kwargs") \
                    and not prefix.endswith("config_overrides"):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out


# --- presets -----------------------------------------------------------------------------

def paper() -> Config:
    """The paper's configuration (§4.1; DESIGN §1–2)."""
    return Config()


def tiny() -> Config:
    """Toy-width InstAlign: same code paths, CPU forward+backward in well under a second."""
    cfg = Config()
    cfg.model.backbone = BackboneConfig(
        name="swin_tiny_patch4_window7_224",
        pretrained=False,
        kwargs=dict(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 6], window_size=4),
    )
    cfg.model.text_encoder = TextEncoderConfig(name=TINY_TEXT_ENCODER, pretrained=False, max_tokens=20)
    cfg.model.pixel_decoder = PixelDecoderConfig(num_layers=1, num_heads=4, num_points=2, ffn_dim=64)
    cfg.model.image_size = 128
    cfg.model.hidden_dim = 32
    cfg.model.num_queries = 8
    cfg.model.num_blocks = 3
    cfg.model.num_heads = 4
    cfg.model.ffn_dim = 64
    cfg.loss.num_points = 1024
    # A random-init toy at the 0.5 threshold learns "no target" only with the classes balanced
    # (docs/objective.md, "where the paper is silent"): sqrt(targeted / no-target) of the train split.
    cfg.loss.nt_pos_weight = "auto"
    cfg.train.batch_size = 8
    # The paper's 1e-4 is for pretrained encoders over 20 epochs; this random-init toy trains for
    # a few hundred steps (the quickstart), where 1e-3 decayed to 1e-4 learned the no-target
    # head and the masks fastest of the schedules measured (docs/objective.md, "where the paper is silent").
    cfg.train.lr = 1e-3
    cfg.train.min_lr = 1e-4
    cfg.train.backbone_lr_mult = 1.0  # random init: nothing pretrained to protect
    cfg.train.text_encoder_lr_mult = 1.0
    cfg.train.epochs = 10
    return cfg


PRESETS = {"paper": paper, "tiny": tiny}


# --- loading -----------------------------------------------------------------------------

def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.num_queries=50")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"override {item!r}: unknown key {key!r}")
            node = node[part]
        if not isinstance(node, dict) or (parts[-1] not in node and not _is_free_mapping(parts)):
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return Config.from_dict(data, source="overrides")


def _is_free_mapping(parts: list[str]) -> bool:
    # Keys inside free-form dicts (backbone.kwargs, text_encoder.config_overrides) may be new.
    return len(parts) >= 2 and parts[-2] in ("kwargs", "config_overrides")


def load_config(source: Union[str, Path, Config, None] = "paper", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name (``paper``, ``tiny``), a YAML path or a ``Config``, plus dotted overrides.

    A YAML file may start from a preset with a top-level ``preset: tiny`` key; the rest of
    the file then overrides that preset.
    """
    if source is None:
        source = "paper"
    if isinstance(source, Config):
        cfg = copy.deepcopy(source)
    elif str(source) in PRESETS:
        cfg = PRESETS[str(source)]()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config {str(source)!r}: no such file and not a preset ({sorted(PRESETS)})")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: expected a mapping at top level")
        base = data.pop("preset", None)
        if base is not None:
            if base not in PRESETS:
                raise ConfigError(f"config {path}: preset {base!r} unknown; choose from {sorted(PRESETS)}")
            merged = _deep_merge(PRESETS[base]().to_dict(), data)
            cfg = Config.from_dict(merged, source=str(path))
        else:
            cfg = Config.from_dict(data, source=str(path))
    return apply_overrides(cfg, list(overrides)) if overrides else cfg


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
