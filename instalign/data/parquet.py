"""Prepared Parquet → training samples, in plain PyTorch (DESIGN §3; no Ray here).

A prepared dataset stores one row per *image* (``records.IMAGE_SCHEMA``); training wants
one *sample* per sentence (ReLA / gRefCOCO: a sample is an expression with its target
instances and their union, or none). :func:`row_to_samples` does that explosion for both
readers of the format — the Ray loader (``pipelines/data/loader.py``, inside ``map_batches``)
and :class:`ParquetGRES` (a map-style ``torch`` dataset for evaluation and tests) — so the
two cannot drift. Each image is decoded and resized once for all of its sentences, its
instance masks are decoded once (one pycocotools call) and every sentence of the image is
tokenised in one tokenizer call.

A sample (the dict both produce, numpy arrays):

* ``image`` (S, S, 3) uint8 — plainly resized to S×S (ReLA: aspect not kept); normalised
  later, on the device, by :func:`columns_to_batch` (a uint8 image is 4× smaller to move).
* ``input_ids``, ``attention_mask`` (L,) int64, padded to ``max_tokens``.
* ``instance_masks`` (M, S, S) bool — the sample's targets, in ``ann_ids`` order; M = 0 for
  a no-target sample. ``num_instances`` = M.
* ``no_target`` bool, ``sample_id`` ``"<image_id>:<ref_id>:<sent_id>"`` (``Batch`` contract).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from instalign.data.batch import Batch
from instalign.data.records import IMAGE_SCHEMA, MANIFEST_NAME, SCHEMA_VERSION
from instalign.errors import InstAlignError

__all__ = [
    "DatasetFormatError",
    "read_manifest",
    "split_files",
    "row_to_samples",
    "samples_to_columns",
    "columns_to_batch",
    "collate",
    "ParquetGRES",
]

#: Sample fields, in the order ``samples_to_columns`` emits them.
SAMPLE_FIELDS = ("image", "input_ids", "attention_mask", "instance_masks", "num_instances", "no_target", "sample_id")


class DatasetFormatError(InstAlignError, ValueError):
    """A directory is not a (finished, compatible) prepared dataset; the message says why."""


# --- locating the files ----------------------------------------------------------------

def _filesystem(data_dir: str) -> tuple[pafs.FileSystem, str]:
    if "://" in str(data_dir):
        return pafs.FileSystem.from_uri(str(data_dir))
    import os

    return pafs.LocalFileSystem(), os.path.abspath(str(data_dir))


def read_manifest(data_dir: str) -> dict:
    """The dataset's ``_manifest.json``; absent means ``prepare`` did not finish."""
    fs, root = _filesystem(data_dir)
    path = f"{root}/{MANIFEST_NAME}"
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise DatasetFormatError(f"{data_dir}: no {MANIFEST_NAME} — not a prepared dataset, or `instalign prepare` "
                                 f"did not finish (the manifest is written last)") from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetFormatError(f"{path}: schema version {version!r}, this code reads {SCHEMA_VERSION}; "
                                 f"re-run `instalign prepare`")
    _check_file_sizes(fs, root, data_dir, manifest.get("file_sizes") or {})
    return manifest


def _check_file_sizes(fs: pafs.FileSystem, root: str, data_dir: str, sizes: Mapping[str, int]) -> None:
    """Every file the manifest lists is there with its size: whole or not at all.

    The manifest is written last, but copies (rsync, an object-store upload) move files in
    any order; a shard that is missing or shorter than prepare wrote it fails here, named,
    instead of in the middle of an epoch.
    """
    if not sizes:
        return
    names = list(sizes)
    for name, info in zip(names, fs.get_file_info([f"{root}/{n}" for n in names])):
        if info.type == pafs.FileType.NotFound:
            raise DatasetFormatError(f"{data_dir}: {name} is missing (the manifest lists it): the dataset was copied "
                                     f"partially, or files were removed; copy it again or re-run `instalign prepare`")
        if info.size != sizes[name]:
            raise DatasetFormatError(f"{data_dir}: {name} has {info.size} bytes, the manifest says {sizes[name]} "
                                     f"(truncated or partly copied)")


def split_files(data_dir: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of ``split`` as the manifest lists them (never a glob: a stray or
    partial file from another run cannot sneak in)."""
    manifest = read_manifest(data_dir)
    files = manifest.get("files", {})
    if split not in files:
        raise DatasetFormatError(f"{data_dir}: no split {split!r}; the manifest has {sorted(files)}")
    fs, root = _filesystem(data_dir)
    return fs, [f"{root}/{split}/{name}" for name in files[split]]


# --- one image row → its samples ----------------------------------------------------------

def row_to_samples(row: Mapping[str, Any], transform: Any) -> list[dict[str, Any]]:
    """One image row (``IMAGE_SCHEMA`` as Python values) → one sample dict per sentence.

    Args:
        row: a row of the prepared Parquet.
        transform: the shared ``GRESTransform`` (resize, masks, tokenise).

    Returns:
        K samples (K = ``len(row["samples"])``), fields as in the module docstring. The image
        array is shared between them (decoded once).
    """
    from instalign.data.images import decode_image
    from instalign.data.masks import rle_decode_many

    where = f"image {row['image_id']} ({row['dataset']}/{row['split']})"
    samples = row["samples"]
    s = int(transform.image_size)
    image = transform.image_uint8(decode_image(row["image"], source=where, draft_size=transform.draft_size))
    image = np.asarray(image, dtype=np.uint8)
    h, w = int(row["height"]), int(row["width"])
    index = {int(inst["ann_id"]): k for k, inst in enumerate(row["instances"])}
    stored = rle_decode_many([inst["rle"] for inst in row["instances"]], h, w)  # (M_img, h, w)
    resized = _as_numpy(transform.masks(stored)).astype(bool, copy=False)  # (M_img, S, S)
    input_ids, attention_mask = transform.tokenize([smp["text"] for smp in samples])  # (K, L) each
    input_ids, attention_mask = _as_numpy(input_ids).astype(np.int64), _as_numpy(attention_mask).astype(np.int64)

    out = []
    for k, smp in enumerate(samples):
        try:
            pick = [index[int(a)] for a in smp["ann_ids"]]
        except KeyError as e:
            raise DatasetFormatError(f"{where}: ref {smp['ref_id']} names annotation {e.args[0]}, which the row "
                                     f"does not store") from None
        out.append(dict(
            image=image,
            input_ids=input_ids[k],
            attention_mask=attention_mask[k],
            instance_masks=resized[pick] if pick else np.zeros((0, s, s), dtype=bool),
            num_instances=len(pick),
            no_target=bool(smp["no_target"]),
            sample_id=f"{row['image_id']}:{smp['ref_id']}:{smp['sent_id']}",
        ))
    return out


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def samples_to_columns(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sample dicts → columns: stacked fixed-shape arrays, ``instance_masks`` a list of (M_i, S, S)."""
    return dict(
        image=np.stack([smp["image"] for smp in samples]),  # (B, S, S, 3)
        input_ids=np.stack([smp["input_ids"] for smp in samples]),  # (B, L)
        attention_mask=np.stack([smp["attention_mask"] for smp in samples]),  # (B, L)
        instance_masks=[smp["instance_masks"] for smp in samples],  # B × (M_i, S, S)
        num_instances=np.array([smp["num_instances"] for smp in samples], dtype=np.int64),
        no_target=np.array([smp["no_target"] for smp in samples], dtype=bool),
        sample_id=np.array([smp["sample_id"] for smp in samples], dtype=object),
    )


# --- columns → Batch (the collate of both loaders) -------------------------------------------

def columns_to_batch(columns: Mapping[str, Any], *, device: torch.device | str = "cpu",
                     transform: Any | None = None, pin_memory: bool = False) -> Batch:
    """Columns of B samples → a ``Batch`` on ``device``, instance masks padded per batch.

    The image travels as uint8 and is normalised on the device (``GRESTransform.normalize``): on a
    GPU that is one fused kernel and a quarter of the bytes over the bus.

    Args:
        columns: ``SAMPLE_FIELDS`` as arrays (``instance_masks`` a sequence of (M_i, S, S)).
        device: where the batch goes.
        transform: whose mean/std normalise the images (default: ImageNet's, as ``GRESTransform``).
        pin_memory: stage the host tensors in pinned memory before their non-blocking copies to
            ``device``, so the copies are truly asynchronous DMA (from pageable memory CUDA copies
            through a staging buffer and the host waits). For a CUDA ``device`` only: pinning is
            a pure cost on CPU (``pipelines.data.loader.pin_host_memory`` decides).
    """
    # Channels-first while still uint8: a 1-byte copy (which also makes Ray's read-only buffers
    # writable for torch); normalising a strided channels-last view instead is ~2× slower.
    images = np.ascontiguousarray(np.asarray(columns["image"]).transpose(0, 3, 1, 2))  # (B, 3, S, S) uint8
    b, s = images.shape[0], images.shape[2]
    if transform is None:
        transform = _default_normalizer(s)
    device = torch.device(device)

    def upload(array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        return (host.pin_memory() if pin_memory else host).to(device, non_blocking=True)

    if device.type == "cpu":
        # One sample at a time into one output: the float temporaries stay small enough for the
        # allocator to reuse, instead of three fresh (B, 3, S, S) buffers whose page faults
        # measured as half of the CPU cost. Bit-identical to the whole-batch call.
        pixels = torch.from_numpy(images)
        images = torch.empty(pixels.shape, dtype=torch.float32)  # (B, 3, S, S)
        for i in range(b):
            images[i: i + 1] = transform.normalize(pixels[i: i + 1])
    else:
        images = transform.normalize(upload(images))  # (B, 3, S, S)
    masks = [np.asarray(m) for m in columns["instance_masks"]]  # B × (M_i, S, S), bool or 0/1 uint8
    counts = np.asarray(columns["num_instances"], dtype=np.int64)
    for i, m in enumerate(masks):
        if m.shape[0] != counts[i] or (m.size and m.shape[1:] != (s, s)):
            raise ValueError(f"sample {i}: instance masks of shape {m.shape} but num_instances={counts[i]}, "
                             f"image side {s}")
    padded = np.zeros((b, max([m.shape[0] for m in masks] + [0]), s, s), dtype=bool)  # (B, M_max, S, S)
    union = np.zeros((b, s, s), dtype=bool)  # (B, S, S)
    for i, m in enumerate(masks):
        padded[i, : m.shape[0]] = m
        if m.shape[0]:
            m.any(axis=0, out=union[i])  # numpy: ~40× less CPU than torch's any(dim=1) over (B, M, S, S)
    instance_masks = upload(padded)  # one transfer, then views
    return Batch(
        images=images,
        input_ids=upload(np.array(columns["input_ids"], dtype=np.int64)),
        attention_mask=upload(np.array(columns["attention_mask"], dtype=np.int64)),
        instance_masks=[instance_masks[i, :n] for i, n in enumerate(counts.tolist())],
        union_masks=upload(union),
        no_target=upload(np.array(columns["no_target"], dtype=bool)),
        sample_ids=[str(x) for x in columns["sample_id"]],
    )


def _default_normalizer(image_size: int) -> Any:
    from instalign.data.transforms import GRESTransform

    # Only ``normalize`` is used: mean/std are GRESTransform's defaults; no tokenizer needed.
    return GRESTransform(image_size=image_size, max_tokens=3, tokenizer=None)


def collate(items: Sequence[Mapping[str, Any]], transform: Any | None = None) -> Batch:
    """``torch.utils.data.DataLoader`` collate for :class:`ParquetGRES` (CPU batch).

    ``transform`` supplies mean/std (default ImageNet's); ``ParquetGRES.collate`` binds its own.
    """
    if not items:
        raise ValueError("collate: empty list of samples")
    return columns_to_batch(samples_to_columns(items), device="cpu", transform=transform)


# --- a map-style dataset over one split --------------------------------------------------------

class ParquetGRES(Dataset):
    """One item per sample (sentence) of a prepared split, read with pyarrow (no Ray).

    Consecutive indices are the sentences of one image, so the last decoded image is kept:
    a sequential pass decodes each image once, as the Ray loader does.

    Args:
        data_dir: the prepared dataset (local path or URI).
        split: e.g. ``"val"``.
        transform: the shared ``GRESTransform``.
        limit: keep only the first ``limit`` samples (0: all).
    """

    def __init__(self, data_dir: str, split: str, transform: Any, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        fs, paths = split_files(data_dir, split)
        tables = []
        for path in paths:
            try:
                table = pq.read_table(path, filesystem=fs)
            except (OSError, pa.ArrowInvalid) as e:
                raise DatasetFormatError(f"{path}: cannot read Parquet ({e})") from None
            missing = set(IMAGE_SCHEMA.names) - set(table.column_names)
            if missing:
                raise DatasetFormatError(f"{path}: missing column(s) {sorted(missing)}")
            tables.append(table.select(IMAGE_SCHEMA.names))
        self.table = pa.concat_tables(tables) if tables else IMAGE_SCHEMA.empty_table()
        self.transform = transform
        # (row, k-th sentence of that row) for every sample, in file order.
        lengths = self.table.column("samples").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        ks = np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.zeros(0, dtype=np.int64)
        self.index = np.stack([rows, ks], axis=1)[: limit or None]  # (num_samples, 2)
        self._cached: tuple[int, list[dict]] | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        row, k = (int(v) for v in self.index[i])
        if self._cached is None or self._cached[0] != row:
            self._cached = (row, row_to_samples(self.table.slice(row, 1).to_pylist()[0], self.transform))
        return self._cached[1][k]

    def collate(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        """``collate`` normalising with this dataset's transform (pass as ``DataLoader(collate_fn=...)``)."""
        return collate(items, transform=self.transform)
