"""The training-job core (``pipelines.training.job``) without a cluster: the data plan and the job's settings."""

from __future__ import annotations

import math

import pytest

from instalign.config import load_config

MANIFEST = {"counts": {"train": {"samples": 40}, "val": {"samples": 9}}}


def test_plan_data_checks_the_config_against_the_dataset():
    from pipelines.training.job import plan_data

    cfg = load_config("tiny", ["train.batch_size=8", "data.max_val_samples=4"])
    plan = plan_data(cfg, "/d", MANIFEST, num_workers=2)
    assert (plan.train_samples, plan.val_samples, plan.steps_per_epoch) == (40, 4, 5)
    capped = plan_data(load_config(cfg, ["data.max_train_samples=17"]), "/d", MANIFEST, num_workers=1)
    assert (capped.train_samples, capped.steps_per_epoch) == (17, 2)  # a partial last batch is dropped
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        plan_data(cfg, "/d", MANIFEST, num_workers=3)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        plan_data(cfg, "/d", MANIFEST, num_workers=0)
    with pytest.raises(ValueError, match=r"/d: split 'train' has 40 samples, fewer than one global batch"):
        plan_data(load_config(cfg, ["train.batch_size=64"]), "/d", MANIFEST, num_workers=1)
    with pytest.raises(ValueError, match=r"/d: the dataset has no split 'val' \(it has \['train'\]\)"):
        plan_data(cfg, "/d", {"counts": {"train": {"samples": 40}}}, num_workers=1)


def test_a_job_is_assembled_once_with_its_settings():
    from pipelines.training.job import TrainJob, plan_data
    from pipelines.core.resources import plan_workers

    cfg = load_config("tiny", ["train.batch_size=8"])
    job = TrainJob(config=cfg, data=plan_data(cfg, "/d", MANIFEST, 2), run_name="r",
                   resources=plan_workers(2, cluster={"CPU": 2}), storage_path="/runs", tracking_uri="sqlite:///m.db",
                   mlflow_run_id="abc", data_order="ordered", max_failures=1)
    spec = job.run_spec()
    assert (spec.run_name, spec.steps_per_epoch, spec.mlflow_run_id, spec.data_order) == ("r", 5, "abc", "ordered")
    params = job.params()
    assert params["per_worker_batch"] == 4 and params["cpus_per_worker"] == 0.5 and params["storage_path"] == "/runs"
    assert (params["device"], params["use_gpu"], params["gpus_per_worker"]) == ("cpu", False, 0.0)
    gpu = TrainJob(config=cfg, data=job.data, run_name="r", resources=plan_workers(2, cluster={"CPU": 16, "GPU": 2}),
                   storage_path="/runs", tracking_uri="", mlflow_run_id="")
    assert (gpu.params()["device"], gpu.params()["gpus_per_worker"], gpu.params()["cpus_per_worker"]) == \
        ("gpu", 1.0, 1.0)


def test_a_data_order_is_checked_once_where_it_enters_before_anything_starts(monkeypatch, tmp_path):
    """``check_data_order`` is the one check; ``train`` and ``tune`` make it first, before reading
    the data or starting Ray, and the error is one line naming the value and the choices."""
    from pipelines.training.job import check_data_order
    from pipelines.training.train import train
    from pipelines.tuning.tune import tune

    assert check_data_order("ordered") == "ordered" and check_data_order("streaming") == "streaming"
    message = r"^data_order='shuffled': expected one of \('streaming', 'ordered'\)$"
    with pytest.raises(ValueError, match=message):
        check_data_order("shuffled")
    monkeypatch.setattr("pipelines.core.ray_cluster.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ValueError, match=message):
        train(load_config("tiny"), str(tmp_path / "no-such-data"), data_order="shuffled")
    with pytest.raises(ValueError, match=message):
        tune(str(tmp_path / "no-such-space.yaml"), str(tmp_path / "no-such-data"), data_order="shuffled")


def test_best_checkpoint_is_the_best_scored_one_that_verifies(tmp_path):
    """A resumed run can keep a damaged checkpoint with a good old score: it is passed over."""
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from pipelines.training.job import best_checkpoint
    from tests.support.tiny_checkpoint import make_checkpoint

    ckpts = {step: Checkpoint(str(make_checkpoint(tmp_path / f"step_{step:08d}"))) for step in (2, 4, 6, 8)}
    result = SimpleNamespace(checkpoint=ckpts[8], best_checkpoints=[
        (ckpts[2], {"step": 2, "val_gIoU": float("nan")}), (ckpts[4], {"step": 4, "val_gIoU": 30.0}),
        (ckpts[6], {"step": 6, "val_gIoU": 40.0}), (ckpts[8], {"step": 8, "val_gIoU": 30.0})])
    assert best_checkpoint(result) is ckpts[6]
    weights = tmp_path / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert best_checkpoint(result) is ckpts[8]  # the tie at 30 goes to the later step
    assert best_checkpoint(SimpleNamespace(checkpoint=ckpts[2], best_checkpoints=[
        (ckpts[2], {"step": 2, "val_gIoU": float("nan")})])) is ckpts[2]  # nothing scored: the latest


def test_the_no_target_weight_is_balanced_on_the_train_split():
    from instalign.losses import balanced_nt_pos_weight

    # the quickstart's train split: 294 of 1519 expressions are no-target
    assert balanced_nt_pos_weight(1519, 294) == round(math.sqrt(1225 / 294), 4) == 2.0412
    assert balanced_nt_pos_weight(10, 5) == 1.0  # balanced already: plain BCE
    assert balanced_nt_pos_weight(10, 0) == balanced_nt_pos_weight(10, 10) == 1.0  # one class: nothing to balance
    with pytest.raises(ValueError):
        balanced_nt_pos_weight(10, 11)


def test_auto_options_are_worked_out_once_from_the_manifest_for_every_training_verb():
    from pipelines.training.job import TrainJob, plan_data, resolve_data_options
    from pipelines.core.resources import plan_workers

    manifest = {"counts": {"train": {"samples": 1519, "no_target_samples": 294}, "val": {"samples": 9}}}
    tiny = load_config("tiny")
    assert tiny.loss.nt_pos_weight == "auto" and load_config("paper").loss.nt_pos_weight == 1.0
    job = TrainJob(config=tiny, data=plan_data(tiny, "/d", manifest, 1), run_name="r",
                   resources=plan_workers(1, cluster={"CPU": 2}), storage_path="/runs", tracking_uri="sqlite:///m.db",
                   mlflow_run_id="abc")
    # the workers, the checkpoint's config.yaml and the run's params see the number, never "auto"
    assert job.config.loss.nt_pos_weight == 2.0412 and "nt_pos_weight: 2.0412" in job.config.to_yaml()
    assert job.derived == {"loss.nt_pos_weight": "auto: 2.0412 = sqrt(targeted / no-target) = sqrt(1225 / 294) "
                                                  "of split 'train'"}
    assert tiny.loss.nt_pos_weight == "auto"  # the caller's config is not changed
    # a number is kept as it is, and nothing is said to be derived
    fixed, derived = resolve_data_options(load_config("tiny", ["loss.nt_pos_weight=3"]), manifest)
    assert (fixed.loss.nt_pos_weight, derived) == (3.0, {})
    # a split without no-target samples: the plain BCE, and the reason
    plain, derived = resolve_data_options(tiny, MANIFEST)
    assert plain.loss.nt_pos_weight == 1.0 and "0 no-target of 40 samples" in derived["loss.nt_pos_weight"]


def test_an_unresolved_auto_weight_cannot_build_a_criterion():
    from instalign.config import ConfigError
    from instalign.losses import build_criterion

    with pytest.raises(ValueError, match="worked out from a prepared train split"):
        build_criterion(load_config("tiny").loss)
    for bad in ("-1", "0", "always", "true"):
        with pytest.raises(ConfigError, match="nt_pos_weight"):
            load_config("tiny", [f"loss.nt_pos_weight={bad}"])
