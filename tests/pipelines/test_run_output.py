"""What a user reads during ``instalign train``: a clean normal path (issue 13).

One tiny run of the real command, in a fresh interpreter with the user's environment (no
test conveniences), its output going to a pipe as it would to a log file or ``ray job logs``.
It must say which device it trains on, show rank 0's progress lines, and carry none of Ray's
internal chatter: no colour codes, no progress bars, no false alarm, no internal error line,
no Ray INFO lines, and not the raylet's first note on a 2-core machine that it started many
worker processes (true there by design: ``pipelines.core.ray_logs.SKIP_WORKER_LINES``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Lines of Ray's own (not this project's): a worker's forwarded line that is not a progress
#: line, Ray's log format (``file.py:123 -- message``), a C++ log line, a progress bar.
RAY_LINE = re.compile(r"^\((?!.*\[train\] )|\w+\.py:\d+ -- |\w+\.cc:\d+:|\d+%\|")
ANSI = "\x1b["


def ray_lines(output: str) -> list[str]:
    """The lines of ``output`` that Ray printed about itself (see :data:`RAY_LINE`)."""
    return [line for line in output.splitlines() if RAY_LINE.search(line)]


def test_ray_lines_are_told_from_ours():
    ours = ["2026-11-30 15:26:08,134 INFO pipelines.training.train: training on CPU: 2 workers × 0.5 CPU",
            "(RayTrainWorker pid=7628) [train] epoch 1/1 step 2/4 (50%) | loss 3.412 | ETA 0m10s", '  "step": 4,']
    theirs = ["(TrainController pid=7502) Requesting resources: {'CPU': 0.5} * 2",
              "2026-11-30 15:26:03,500\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
              "(TrainController pid=7502) [2026-11-30 15:26:22,655 E 7502 7533] core_worker.cc:2465: Actor with …",
              "(pid=7880) - ListFiles:   0%|          | 0.00/1.00 [00:00<?, ? row/s]"]
    assert ray_lines("\n".join(ours + theirs)) == theirs


def test_only_the_known_false_alarms_are_dropped():
    import logging

    from pipelines.core.ray_logs import DROPPED_RECORDS, apply_ray_log_level

    apply_ray_log_level()
    data = logging.getLogger("ray.data.dataset")
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    progress = logging.getLogger("ray.data._internal.progress")
    assert set(DROPPED_RECORDS) == {data.name, auth.name, progress.name}

    def passes(logger: logging.Logger, message: str) -> bool:  # the logger's own filters, as logging applies them
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, "x.py", 1, message, None, None)))

    assert not passes(data, "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job "
                            "will hang unless more CPUs are freed up.")
    assert not passes(auth, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to "
                            "opt out.")
    assert not passes(progress, "Progress bars disabled. To enable, set `ray.data.DataContext.get_current()."
                                "enable_progress_bars = True`.")
    assert passes(data, "Failed to read shard part-0007.parquet")
    assert passes(auth, "Token authentication is disabled for this Ray cluster. Anyone with network access …")
    apply_ray_log_level()  # idempotent: one filter per logger
    assert len(data.filters) == len(auth.filters) == len(progress.filters) == 1


@pytest.mark.ray
def test_the_worker_setup_hook_quiets_train_without_importing_it():
    """The hook runs in every worker of a job, Ray Data's too: importing ``ray.train`` there
    cost ~0.8 CPU-s per process. It must name Train's report logger without that import."""
    code = ("import logging, sys\n"
            "from pipelines.core.ray_logs import setup_worker_logging, train_report_logger_name\n"
            "setup_worker_logging()\n"
            "assert 'ray.train' not in sys.modules, 'the hook imported ray.train'\n"
            "assert logging.getLogger(train_report_logger_name()).level == logging.WARNING\n"
            "import ray.train.v2._internal.execution.context as c\n"
            "assert c.logger is logging.getLogger(train_report_logger_name()), (c.logger.name,)\n")
    env = {k: v for k, v in os.environ.items() if k != "INSTALIGN_RAY_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_normal_training_run_prints_progress_and_no_ray_chatter(prepared_dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no test conveniences
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--config", "tiny", "--data", str(prepared_dataset),
           "--num-workers", "2", "--name", "clean", "--storage-path", str(tmp_path / "ray"), "--max-failures", "0",
           "data.max_train_samples=16", "data.max_val_samples=8", "data.num_overlays=1", "train.epochs=1",
           "train.batch_size=8", "train.print_every_steps=1", "train.checkpoint_every_steps=2", "loss.num_points=256"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert json.loads(proc.stdout[proc.stdout.index("{\n"):proc.stdout.rindex("}") + 1])["metrics"]["step"] == 2

    assert "training on CPU: 2 workers × 0.5 CPU (the cluster has no GPUs; " in output
    progress = [line for line in output.splitlines() if "[train] " in line]
    assert any("[train] epoch 1/1 step 2/2" in line for line in progress), output[-5000:]
    assert any("[train] epoch 1/1 val at step 2" in line for line in progress)
    assert len(progress) == len(set(progress)), "\n".join(progress)  # each line once (Train's print patch is off)

    assert ANSI not in output
    assert "does not have any available CPUs" not in output  # the planner left room for Ray Data
    assert "core_worker" not in output and "RayDeprecationWarning" not in output
    chatter = ray_lines(output)
    assert chatter == [], "\n".join(chatter)


def test_repeat_notes_carry_no_colour_when_colour_is_off(monkeypatch):
    """Ray's deduplicator marks a repeated worker line "[repeated Nx across cluster]" in green
    whatever RAY_COLOR_PREFIX says; with RAY_COLOR_PREFIX=0 (output not a terminal) it is plain."""
    from ray._private import ray_logging

    from pipelines.core.ray_logs import plain_repeat_notes

    monkeypatch.setattr(ray_logging, "_color", ray_logging._color)  # restored afterwards

    def repeated_twice() -> str:
        clock = [0.0]
        dedup = ray_logging.LogDeduplicator(5, None, None, _timesource=lambda: clock[0])
        line = "WARNING: 26 PYTHON worker processes have been started on node"
        for pid in (1, 2, 3):
            dedup.deduplicate(dict(ip="10.0.0.1", pid=pid, lines=[line]))
        clock[0] = 10.0
        return "\n".join(out for batch in dedup.flush() for out in batch["lines"])

    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    plain_repeat_notes()
    assert "across cluster]" in repeated_twice() and ANSI in repeated_twice()  # Ray's own behaviour, untouched

    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    plain_repeat_notes()
    note = repeated_twice()
    assert "[repeated 2x across cluster]" in note and ANSI not in note



@pytest.mark.parametrize("setup", ["none", "driver", "worker"])
def test_ray_trains_exclude_resources_warning_is_ignored_in_the_driver_and_the_workers(setup):
    """The ``ordered`` data order (the quickstart's) builds Ray Train's ingest options in the
    driver, where Ray warns that ``exclude_resources`` is deprecated: a user cannot act on it.
    ``init_ray`` ignores that warning in the driver (also when Ray is already connected), and the
    job's worker setup hook in every worker; with neither, Ray's warning shows."""
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always")  # every warning shown, each time
        import ray
        from pipelines.core import ray_cluster, ray_logs
        from pipelines.training.job import GRESDataConfig
        if {setup!r} == "driver":
            ray.is_initialized = lambda: True  # init_ray then connects nothing: only its set-up runs
            ray_cluster.init_ray()
        elif {setup!r} == "worker":
            ray_logs.setup_worker_logging()
        GRESDataConfig(data_order="ordered")
        warnings.warn("another deprecation", DeprecationWarning)  # other warnings still show
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("exclude_resources" in done.stderr) == (setup == "none"), done.stderr[-3000:]
    assert "another deprecation" in done.stderr
