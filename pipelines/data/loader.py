"""Prepared Parquet → a shuffled Ray Dataset of training samples (DESIGN §3; paper §4.1 input).

``load_samples`` reads the split's files (as the manifest lists them) and explodes every
image row into its samples — one per sentence — inside ``map_batches`` on CPU workers,
with :func:`instalign.data.parquet.row_to_samples`, the same function the plain PyTorch
``ParquetGRES`` uses. Each image is decoded and resized to S×S once for all its sentences.
Rows carry a uint8 (S, S, 3) image: normalisation happens on the training device in
:func:`rows_to_batch` (4× fewer bytes through the object store and over PCIe).

Shuffling without an all-to-all. gRefCOCO's train split is ~200k samples of a 480×480×3
uint8 image each (~140 GB decoded): ``random_shuffle`` over samples would push all of that
through the object store every epoch, and even over the ~17k encoded image rows it is a
full exchange of ~3 GB per epoch. Ray's local shuffle buffer is no cheap substitute either:
it re-``take``-s Arrow tensor rows — ~8 ms per 480² image row on the 2-core dev machine,
and a 256-sample buffer made iteration ~3× slower there. So the shuffle is done where the
data are born, in two seeded stages:

1. the Parquet files are read in a random order (``read_parquet(shuffle=...)``);
2. inside the UDF, the image rows of a file are permuted and taken in windows of
   ``IMAGES_PER_WINDOW`` images whose ~15 sentences each are permuted together, then cut
   into blocks of ``SAMPLES_PER_BLOCK`` — a batch of 32 holds sentences of ~32 images.

Per-epoch orders: pass ``seed=base_seed + epoch`` (the pipeline re-executes each epoch).

The tokenizer comes from the model's text-encoder config: ``load_samples`` takes either a
ready ``GRESTransform`` or ``text_cfg`` (+ ``image_size``); with ``text_cfg`` each Ray
worker process loads the tokenizer once, lazily, and caches it (nothing heavy is pickled).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import FileShuffleConfig

from instalign.config import TextEncoderConfig
from instalign.data.batch import Batch
from instalign.data.parquet import columns_to_batch, row_to_samples, samples_to_columns, split_files
from instalign.data.transforms import GRESTransform
from instalign.modeling.text_encoder import load_tokenizer

__all__ = ["load_samples", "rows_to_batch", "RowsToBatch", "pin_host_memory", "torch_batches", "PREFETCH_BATCHES",
           "transform_from_text_cfg"]

#: Images decoded together and whose samples are shuffled together (~32 × 15 samples; at 480²
#: ~250 MB peak per task: images, per-sample masks and the stacked output block).
IMAGES_PER_WINDOW = 32
#: Samples per output block (~45 MB of 480² images).
SAMPLES_PER_BLOCK = 64
#: Batches Ray Data prepares ahead of the training loop (its default is 1): with 2, the next
#: batch's fetch, collate and host-to-device copy overlap the whole current step, not just its tail.
PREFETCH_BATCHES = 2
_COLUMNS = ["image_id", "dataset", "split", "width", "height", "image", "instances", "samples"]


@functools.lru_cache(maxsize=4)
def transform_from_text_cfg(text_cfg_json: str, image_size: int, max_tokens: int) -> Any:
    """A ``GRESTransform`` with the text encoder's tokenizer, built once per process."""
    text_cfg = TextEncoderConfig(**json.loads(text_cfg_json))
    return GRESTransform(image_size=image_size, max_tokens=max_tokens, tokenizer=load_tokenizer(text_cfg))


def _explode(batch: pa.Table, *, transform: Any | None, spec: tuple[str, int, int] | None, shuffle: bool,
             seed: int | None) -> Iterator[dict[str, Any]]:
    """Ray Data UDF: a block of image rows → chunks of samples (``SAMPLE_FIELDS`` columns)."""
    if transform is None:
        transform = transform_from_text_cfg(*spec)
    rows = batch.to_pylist()
    if not rows:
        return
    # Seeded by the block's content, not its position: file order varies, the result per file does not.
    rng = np.random.default_rng(None if seed is None else [seed, int(rows[0]["image_id"]) & 0x7FFFFFFF])
    order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
    for start in range(0, len(rows), IMAGES_PER_WINDOW):
        samples = [smp for i in order[start:start + IMAGES_PER_WINDOW] for smp in row_to_samples(rows[i], transform)]
        if shuffle:
            samples = [samples[j] for j in rng.permutation(len(samples))]
        for c in range(0, len(samples), SAMPLES_PER_BLOCK):
            yield _ray_columns(samples[c:c + SAMPLES_PER_BLOCK])


def _ray_columns(samples: list[dict]) -> dict[str, Any]:
    """``samples_to_columns`` with masks as a ragged uint8 object array: Arrow stores bool
    bit-packed, and packing/``take`` on it measured ~10× slower than on uint8 (a free view)."""
    columns = samples_to_columns(samples)
    ragged = np.empty(len(samples), dtype=object)  # an object array: Ray does not try (and warn) to stack
    for i, m in enumerate(columns["instance_masks"]):
        ragged[i] = m.view(np.uint8)
    columns["instance_masks"] = ragged
    return columns


def load_samples(
    data_dir: str,
    split: str,
    transform: Any | None = None,
    *,
    text_cfg: Any | None = None,
    image_size: int | None = None,
    max_tokens: int | None = None,
    shuffle: bool = True,
    seed: int | None = 0,
    limit: int = 0,
    num_cpus: float = 1.0,
) -> Any:
    """A ``ray.data.Dataset`` of the samples of ``split``, one row per sentence.

    Columns: ``image`` (S, S, 3) uint8, ``input_ids``/``attention_mask`` (L,) int64,
    ``instance_masks`` (M, S, S) uint8 0/1 (ragged: M varies per row; padded and made bool per
    batch by :func:`rows_to_batch`), ``num_instances`` int64, ``no_target`` bool, ``sample_id`` str.

    Args:
        data_dir: a prepared dataset (local path or URI).
        split: e.g. ``"train"``.
        transform: a ready ``GRESTransform`` (pickled to the workers); or else
        text_cfg: the model's ``TextEncoderConfig``: its tokenizer is loaded lazily per worker;
        image_size: S (with ``text_cfg``).
        max_tokens: L (with ``text_cfg``; default ``text_cfg.max_tokens``).
        shuffle: file order, image order and sample order randomised (module docstring); no
            ``local_shuffle_buffer_size`` is needed when iterating.
        seed: the shuffle seed (``None``: a fresh random order); use ``seed + epoch`` per epoch.
        limit: keep the first ``limit`` samples (0: all). With ``shuffle`` a seeded random subset.
        num_cpus: CPUs per decode task.
    """
    if (transform is None) == (text_cfg is None):
        raise ValueError("load_samples: pass exactly one of `transform` or `text_cfg` (+ image_size)")
    spec = None
    if text_cfg is not None:
        if image_size is None:
            raise ValueError("load_samples: `image_size` is required with `text_cfg`")
        spec = (_to_json(text_cfg), int(image_size), int(max_tokens or text_cfg.max_tokens))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fs, paths = split_files(data_dir, split)
    if not paths:
        raise ValueError(f"{data_dir}: split {split!r} has no Parquet file (every record was quarantined?)")
    # select_columns, not read_parquet(columns=...) (deprecated since Ray 2.5x): Ray pushes the
    # projection down into the Parquet read, so other columns are still never read.
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=FileShuffleConfig(seed=seed) if shuffle else None)
    ds = ds.select_columns(_COLUMNS)
    ds = ds.map_batches(_explode, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
                        fn_kwargs=dict(transform=transform, spec=spec, shuffle=shuffle, seed=seed))
    return ds.limit(limit) if limit else ds


def _to_json(text_cfg: Any) -> str:
    data = dataclasses.asdict(text_cfg) if dataclasses.is_dataclass(text_cfg) else dict(text_cfg)
    return json.dumps(data, sort_keys=True)  # hashable: the per-worker cache key


def pin_host_memory(device: Any) -> bool:
    """Whether the collate stages host tensors in pinned memory: for a CUDA device only.

    Pinned (page-locked) memory lets the host-to-device copies run as asynchronous DMA while
    the host goes on; on CPU there is no copy to speed up, and page-locking is a pure cost
    (and fails on a machine without a CUDA driver).
    """
    return torch.device(device).type == "cuda"


def rows_to_batch(batch: Mapping[str, Any], device: Any = "cpu", transform: Any | None = None) -> Batch:
    """Collate a Ray numpy batch of samples into a ``Batch`` on ``device`` (masks padded, images
    normalised on the device), through pinned memory with non-blocking copies on CUDA."""
    return columns_to_batch(batch, device=device, transform=transform, pin_memory=pin_host_memory(device))


class RowsToBatch(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=RowsToBatch(device))``: Ray's collate-class form of
    :func:`rows_to_batch` (a plain function is deprecated there since Ray 2.47)."""

    def __init__(self, device: Any = "cpu", transform: Any | None = None) -> None:
        self.device = device
        self.transform = transform

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        return rows_to_batch(batch, self.device, self.transform)


def torch_batches(shard: Any, *, batch_size: int, device: Any, drop_last: bool = False) -> Iterator[Batch]:
    """``Batch``-es of a Ray Data shard (a training worker's train or val split) on ``device``:
    :class:`RowsToBatch` collates, :data:`PREFETCH_BATCHES` are prepared ahead."""
    return iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, collate_fn=RowsToBatch(device),
                                         prefetch_batches=PREFETCH_BATCHES))
