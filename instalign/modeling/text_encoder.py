"""Text encoder (paper §3.1): a Hugging Face encoder + a linear projection to the model width.

The paper encodes the expression with RoBERTa-base and projects the word features to C,
giving ``T0 ∈ R^{L×C}``; the attention mask is kept for every later use of T (object-text
attention, POA eq. 1, the sentence feature of eq. 11). Any ``AutoModel`` encoder works:
``roberta-base`` from the hub or its cache, a local directory in ``save_pretrained``
layout, or the reserved tiny RoBERTa (``config.TINY_TEXT_ENCODER``, see ``tiny_text``).

Only ``create_text_encoder`` / ``load_tokenizer`` call ``from_pretrained`` (DESIGN §6.4);
``TextEncoder`` receives the built model. The pooler of BERT-style models is dropped at
load time: InstAlign reads word features only, and a pooler would be a parameter without
gradient (DDP refuses those).

Letters: B batch, L tokens, C model width, E encoder hidden size.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Union

from torch import Tensor, nn

from instalign.config import TINY_TEXT_ENCODER, TextEncoderConfig
from instalign.errors import InstAlignError


class TextEncoderLoadError(InstAlignError, RuntimeError):
    """The text encoder or its tokenizer could not be loaded; the message says how to fix it."""


class TextEncoder(nn.Module):
    """Word features projected to C.

    Args:
        encoder: a transformers encoder returning ``last_hidden_state`` (B, L, E).
        hidden_dim: C.
    """

    def __init__(self, *, encoder: nn.Module, hidden_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(int(encoder.config.hidden_size), hidden_dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Args: input_ids, attention_mask (B, L). Returns: T0 (B, L, C)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden)


def resolve_source(name: str) -> str:
    """Hub name or local directory to hand to ``from_pretrained`` (materialises the tiny RoBERTa)."""
    if name == TINY_TEXT_ENCODER:
        from instalign.modeling.tiny_text import ensure_tiny_roberta

        return str(ensure_tiny_roberta())
    return os.path.expanduser(name) if name.startswith("~") else name


def _hint(name: str) -> str:
    return (
        f"Text encoder {name!r} could not be found offline or on the Hugging Face Hub. If the machine is offline "
        "(HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1), either pre-fill the Hugging Face cache on a machine with "
        "internet, or set model.text_encoder.name to a local directory in save_pretrained layout (config.json, "
        "tokenizer files, model.safetensors), e.g. one written by AutoModel/AutoTokenizer .save_pretrained(dir). "
        f"For tests use model.text_encoder.name={TINY_TEXT_ENCODER}."
    )


def _load_error(name: str, err: Exception) -> TextEncoderLoadError:
    return TextEncoderLoadError(f"{_hint(name)} Cause: {type(err).__name__}: {err}")


def _max_text_tokens(config: Any) -> int | None:
    """Longest input the position table allows (RoBERTa's positions start at pad_token_id + 1)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if "roberta" in str(getattr(config, "model_type", "")):
        limit -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return int(limit)


def create_text_encoder(
    *,
    name: str,
    pretrained: bool,
    hidden_dim: int,
    max_tokens: int,
    config_overrides: dict[str, Any] | None = None,
) -> TextEncoder:
    """Load (or randomly initialise) the encoder and add the projection to C.

    Args:
        name: hub name, local directory, or ``config.TINY_TEXT_ENCODER``.
        pretrained: True loads weights with ``from_pretrained``; False builds ``AutoModel.from_config``
            from the named config with ``config_overrides`` applied (random init).
        hidden_dim: C.
        max_tokens: tokens per expression; checked against the position table.
        config_overrides: ``AutoConfig`` attribute overrides (random init only).

    Raises:
        TextEncoderLoadError: the name cannot be resolved (offline, unknown, broken directory) or
            ``max_tokens`` exceeds the encoder's positions.
    """
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    source = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from e
    if not pretrained:
        for key, value in (config_overrides or {}).items():
            if not hasattr(config, key):
                raise TextEncoderLoadError(
                    f"model.text_encoder.config_overrides: {type(config).__name__} has no attribute {key!r}"
                )
            setattr(config, key, value)
    limit = _max_text_tokens(config)
    if limit is not None and max_tokens > limit:
        raise TextEncoderLoadError(
            f"model.text_encoder.max_tokens={max_tokens} exceeds what {name!r} can encode ({limit} positions)"
        )
    extra: dict[str, Any] = {}
    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError:
        model_cls = None
    if model_cls is not None and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        extra["add_pooling_layer"] = False
    try:
        if pretrained:
            encoder = AutoModel.from_pretrained(source, config=config, **extra)
        else:
            encoder = AutoModel.from_config(config, **extra)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from e
    if getattr(encoder, "pooler", None) is not None:  # a model class without add_pooling_layer
        encoder.pooler = None
    return TextEncoder(encoder=encoder, hidden_dim=hidden_dim)


def load_tokenizer(text_cfg: Union[TextEncoderConfig, str]) -> Any:
    """The tokenizer that matches the text encoder (``AutoTokenizer.from_pretrained``).

    Args:
        text_cfg: the model's ``TextEncoderConfig`` (or just the encoder name).

    Returns:
        A ``PreTrainedTokenizerBase``; callers pad/truncate to ``max_tokens`` (``GRESTransform``).

    Raises:
        TextEncoderLoadError: the tokenizer cannot be found (offline and not cached, bad directory).
    """
    from transformers import AutoTokenizer

    name = text_cfg if isinstance(text_cfg, str) else text_cfg.name
    try:
        return AutoTokenizer.from_pretrained(resolve_source(name))
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from e


__all__ = ["TextEncoder", "TextEncoderLoadError", "create_text_encoder", "load_tokenizer", "resolve_source"]
