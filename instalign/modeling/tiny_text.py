"""The reserved tiny text encoder ``instalign/tiny-roberta`` (tests, quickstart; paper §3.1 at toy size).

Instead of a mock, the tiny preset uses a real RoBERTa (``RobertaConfig``: hidden 32,
2 layers, 4 heads, FFN 64) with a real byte-level BPE tokenizer, written once in the
Hugging Face ``save_pretrained`` layout and then loaded through the same
``AutoTokenizer``/``AutoModel`` ``from_pretrained`` path as ``roberta-base``. The
tokenizer is trained (``tokenizers``) on a small English corpus embedded below and built
deterministically from word lists of what referring expressions say (colours, shapes,
positions, COCO categories, relations, counts, "no target" phrasing), so two machines
get byte-identical files. The weights are a seeded random init (nothing is pretrained),
saved as well so ``pretrained=True`` also loads the same deterministic model.

Location: ``<cache root>/tiny-roberta`` (:func:`instalign.cache.cache_root`). It is built
once by :func:`instalign.integrity.build_once`: under a file lock, into a temporary sibling,
sealed with every file's size and digest, then renamed into place; concurrent processes
(the ranks of a DDP group) wait for the first and share its copy, and a damaged copy is
rebuilt. The files are written here with plain ``to_json_file`` / safetensors calls, not
``PreTrainedModel.save_pretrained``: under an initialised ``torch.distributed`` that writes
the model files on rank 0 only, and a non-zero rank that built the cache used to publish a
directory without ``config.json`` or weights.
"""

from __future__ import annotations

import json
import shutil
from itertools import product
from pathlib import Path

from instalign.cache import cache_root
from instalign.integrity import build_once

#: Bump when the corpus, the tokenizer recipe or the config change: a stale directory is rebuilt.
VERSION = 2
_KIND = "tiny-roberta"
#: What a complete copy must hold (the seal lists these and every other file written).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa ids 0..4
VOCAB_SIZE = 1024
MODEL_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=514,  # RoBERTa: positions start at pad_token_id + 1 = 2, so 512 tokens fit
    type_vocab_size=1,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)

_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "pink", "gray", "grey"]
_SHAPES = ["square", "circle", "triangle", "rectangle", "ring", "star", "box", "ball", "disk", "stripe"]
_SIZES = ["big", "small", "large", "tiny", "tall", "short", "long", "wide"]
_POSITIONS = ["left", "right", "top", "bottom", "middle", "center", "front", "back", "corner", "edge"]
_OBJECTS = [
    "person", "man", "woman", "boy", "girl", "kid", "child", "guy", "lady", "player", "people", "bicycle", "car",
    "motorcycle", "bus", "train", "truck", "boat", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "umbrella", "bag", "tie", "skis", "kite", "bottle", "cup", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "pizza", "donut", "cake", "chair", "couch", "bed",
    "table", "tv", "laptop", "phone", "book", "clock", "vase", "teddy", "shirt", "jacket", "hat", "plate",
]
_RELATIONS = ["next to", "behind", "in front of", "on top of", "under", "beside", "near", "holding", "wearing",
              "on the left of", "on the right of", "between", "above", "below", "closest to", "farthest from"]
_COUNTS = ["one", "two", "three", "four", "both", "all", "every", "each", "the two", "all three"]
_TEMPLATES = [
    "the {c} {s} on the {p}",
    "{c} {s}",
    "{z} {c} {s} at the {p}",
    "the {s} {r} the {c} {o}",
    "{n} {c} {o}s on the {p}",
    "the {o} in {c}",
    "{p} {o}",
    "the {z} {o} {r} the {s}",
    "all {c} objects",
    "there is no {c} {s} in the picture",
    "nothing {c} near the {p} {s}",
]


def corpus() -> list[str]:
    """The embedded training corpus: deterministic, ~4k referring-expression-like lines."""
    lines = []
    for i, (c, s, p) in enumerate(product(_COLOURS, _SHAPES, _POSITIONS)):
        fill = dict(
            c=c, s=s, p=p,
            z=_SIZES[i % len(_SIZES)],
            o=_OBJECTS[i % len(_OBJECTS)],
            r=_RELATIONS[i % len(_RELATIONS)],
            n=_COUNTS[i % len(_COUNTS)],
        )
        for t in _TEMPLATES[i % 3:: 3]:
            lines.append(t.format(**fill))
    lines += [f"the {o} {r} the {o2}" for o, r, o2 in zip(_OBJECTS, _RELATIONS * 4, reversed(_OBJECTS))]
    lines += [" ".join(ws) for ws in (_COLOURS, _SHAPES, _SIZES, _POSITIONS, _OBJECTS, _COUNTS)]
    lines += [w.capitalize() + "." for w in _OBJECTS] + ["0 1 2 3 4 5 6 7 8 9 , . ! ? ' - ( )"]
    return lines


def cache_dir() -> Path:
    """Where the tiny text encoder lives: ``<cache root>/tiny-roberta``."""
    return cache_root() / "tiny-roberta"


def _write(out: Path) -> None:
    """Train the tokenizer and write tokenizer + config + seeded weights in HF layout."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(corpus(), vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    raw = out / "bpe"
    raw.mkdir()
    bpe.save_model(str(raw))
    vocab = json.loads((raw / "vocab.json").read_text())
    merge_lines = (raw / "merges.txt").read_text().splitlines()
    merges = [tuple(line.split()) for line in merge_lines if line.strip() and not line.startswith("#")]
    shutil.rmtree(raw)
    tokenizer = RobertaTokenizerFast(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(str(out))
    config = RobertaConfig(vocab_size=len(vocab), **MODEL_CONFIG)
    # Seeded init without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RobertaModel(config, add_pooling_layer=False)
    # Not model.save_pretrained: it skips the files on non-zero ranks (module docstring).
    config.to_json_file(str(out / "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def ensure_tiny_roberta(path: Path | None = None) -> Path:
    """Return the directory of the tiny RoBERTa, building it first if it is missing or damaged.

    Raises:
        OSError: the cache directory is not writable (set ``INSTALIGN_CACHE``).
    """
    path = Path(path) if path is not None else cache_dir()
    return build_once(path, _write, kind=_KIND, meta={"version": VERSION, "name": "instalign/tiny-roberta"},
                      required=REQUIRED_FILES)


__all__ = ["ensure_tiny_roberta", "cache_dir", "corpus", "VERSION", "MODEL_CONFIG", "REQUIRED_FILES"]
