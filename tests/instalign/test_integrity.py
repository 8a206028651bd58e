"""Whole or not at all: sealed directories, the tiny-encoder cache under torch.distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from instalign.integrity import SEAL_FILE, IntegrityError, build_once, seal, verify
from instalign.modeling.tiny_text import REQUIRED_FILES, ensure_tiny_roberta


def _write_files(directory: Path) -> None:
    (directory / "sub").mkdir()
    (directory / "a.bin").write_bytes(b"x" * 100)
    (directory / "sub" / "b.json").write_text('{"k": 1}')


def test_seal_lists_every_file_and_verify_names_the_bad_one(tmp_path):
    _write_files(tmp_path)
    content = seal(tmp_path, kind="demo")
    assert sorted(content["files"]) == ["a.bin", "sub/b.json"]
    assert content["files"]["a.bin"]["size"] == 100 and len(content["files"]["a.bin"]["sha256"]) == 64
    assert verify(tmp_path, kind="demo", required=["a.bin"])["kind"] == "demo"

    with pytest.raises(IntegrityError, match="not a 'checkpoint'"):
        verify(tmp_path, kind="checkpoint")
    with pytest.raises(IntegrityError, match=r"c\.txt: missing \(not listed"):
        verify(tmp_path, required=["c.txt"])
    (tmp_path / "a.bin").write_bytes(b"y" * 100)  # same size, other content
    with pytest.raises(IntegrityError, match="a.bin: content differs"):
        verify(tmp_path)
    verify(tmp_path, digests=False)  # sizes alone cannot see that
    (tmp_path / "a.bin").write_bytes(b"x" * 40)
    with pytest.raises(IntegrityError, match="a.bin: 40 bytes, the seal says 100"):
        verify(tmp_path, digests=False)
    (tmp_path / "sub" / "b.json").unlink()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    with pytest.raises(IntegrityError, match=r"sub/b\.json: missing"):
        verify(tmp_path)
    (tmp_path / SEAL_FILE).unlink()
    with pytest.raises(IntegrityError, match=f"{SEAL_FILE}: missing"):
        verify(tmp_path)


def test_build_once_rebuilds_a_damaged_entry_and_leaves_no_temporaries(tmp_path, caplog):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        _write_files(out)

    final = tmp_path / "entry"
    assert build_once(final, build, kind="demo", required=["a.bin"]) == final
    assert build_once(final, build, kind="demo") == final and len(calls) == 1  # reused
    (final / "a.bin").write_bytes(b"")  # truncated
    build_once(final, build, kind="demo")
    assert len(calls) == 2 and (final / "a.bin").stat().st_size == 100
    assert "rebuilding" in caplog.text and "a.bin" in caplog.text
    build_once(final, build, kind="demo", meta={"version": 2})  # an older recipe is stale
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", "entry"]

    def forgetful(out: Path) -> None:  # a build that does not write what it must
        (out / "other").write_text("")

    with pytest.raises(IntegrityError, match=r"a\.bin: missing"):
        build_once(tmp_path / "bad", forgetful, kind="demo", required=["a.bin"])
    assert not (tmp_path / "bad").exists()


def _rank_builds(rank: int, world: int, init_file: str, cache: str, order: list[int], out: str) -> None:
    """Each rank of a gloo group builds the tiny encoder in turn (``order``), the others waiting."""
    os.environ["INSTALIGN_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for builder in order:
            if rank == builder:
                path = ensure_tiny_roberta()
                Path(out, f"rank{rank}.json").write_text(json.dumps(
                    {"path": str(path), "files": sorted(os.listdir(path)),
                     "mtime": (path / "model.safetensors").stat().st_mtime_ns}))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_tiny_encoder_built_first_on_rank1_is_complete_for_rank0_and_a_plain_process(tmp_path):
    """The race the quickstart lost: under torch.distributed, transformers' save_pretrained writes
    the model files on rank 0 only, so a cache built by rank 1 used to lack config.json."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    mp.start_processes(_rank_builds, args=(2, str(tmp_path / "init"), str(cache), [1, 0], str(out)), nprocs=2,
                       join=True, start_method="spawn")
    r1, r0 = (json.loads((out / f"rank{r}.json").read_text()) for r in (1, 0))
    for name in REQUIRED_FILES + (SEAL_FILE,):
        assert name in r1["files"], name
    assert r0["path"] == r1["path"] and r0["mtime"] == r1["mtime"]  # rank 0 reused rank 1's build
    plain = subprocess.run(
        [sys.executable, "-c", "from transformers import AutoModel, AutoTokenizer; import sys; "
         "from instalign.modeling.tiny_text import ensure_tiny_roberta; p = str(ensure_tiny_roberta()); "
         "m = AutoModel.from_pretrained(p); t = AutoTokenizer.from_pretrained(p); print(type(m).__name__, len(t))"],
        env={**os.environ, "INSTALIGN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    model_name, vocab = plain.stdout.split()[-2:]
    assert model_name == "RobertaModel" and int(vocab) > 500


def test_a_damaged_tiny_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTALIGN_CACHE", str(tmp_path))
    path = ensure_tiny_roberta()
    good = (path / "config.json").read_bytes()
    (path / "config.json").unlink()  # what a non-zero rank used to publish
    assert ensure_tiny_roberta() == path and (path / "config.json").read_bytes() == good
    (path / "tokenizer.json").write_text("{")  # truncated
    ensure_tiny_roberta()
    json.loads((path / "tokenizer.json").read_text())
    verify(path, kind="tiny-roberta")
