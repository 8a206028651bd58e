"""Which checkpoint a run resumes from (``pipelines.training.resume``), on real sealed checkpoints."""

from __future__ import annotations

import shutil

import pytest

from tests.support.tiny_checkpoint import make_checkpoint


def test_checkpoint_names_sort_by_step_and_never_reuse_a_damaged_one():
    from pipelines.training.resume import checkpoint_name

    assert checkpoint_name(6) == "step_00000006" and checkpoint_name(6, {"step_00000004"}) == "step_00000006"
    assert checkpoint_name(6, {"step_00000006"}) == "step_00000006.1"
    assert checkpoint_name(6, {"step_00000006", "step_00000006.1"}) == "step_00000006.2"
    names = ["step_00000008", "step_00000006.1", "step_00000004", "step_00000006", "step_00000010"]
    assert sorted(names) == ["step_00000004", "step_00000006", "step_00000006.1", "step_00000008", "step_00000010"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run's storage: a good ``step_00000002``, and ``step_00000004`` whose weights were truncated."""
    run = tmp_path_factory.mktemp("run")
    make_checkpoint(run / "step_00000002")
    shutil.copytree(run / "step_00000002", run / "step_00000004")
    weights = next(p for p in (run / "step_00000004").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    return run


def test_resume_skips_a_damaged_latest_checkpoint_for_the_newest_that_verifies(run_dir):
    import ray.train

    from pipelines.training.resume import usable_checkpoint

    chosen, skipped = usable_checkpoint(ray.train.Checkpoint(str(run_dir / "step_00000004")))
    assert chosen.path.rstrip("/").endswith("step_00000002")
    assert [name for name, _ in skipped] == ["step_00000004"]
    chosen, skipped = usable_checkpoint(ray.train.Checkpoint(str(run_dir / "step_00000002")))
    assert chosen.path.rstrip("/").endswith("step_00000002") and skipped == []
    assert usable_checkpoint(None) == (None, [])


def test_no_checkpoint_that_verifies_is_one_error_naming_each(tmp_path, run_dir):
    import ray.train

    from instalign.checkpoint import CheckpointError
    from pipelines.training.resume import usable_checkpoint

    shutil.copytree(run_dir / "step_00000004", tmp_path / "step_00000004")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step_00000004: "):
        usable_checkpoint(ray.train.Checkpoint(str(tmp_path / "step_00000004")))
