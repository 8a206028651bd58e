"""Ray's own output is set up by explicit calls, never by importing a module.

* Importing the modules every verb imports (``flags``, ``ray_cluster``, ``ray_logs``) changes no
  environment variable, and the CLI's (``flags``, ``ray_logs``) import no Ray: there is no
  import order to keep.
* :func:`skip_known_worker_lines` makes the driver drop Ray's known noise lines whether Ray was
  imported before or after it, keeps a user's own pattern, and ``instalign`` calls it before a
  verb imports Ray. Checked in fresh interpreters (Ray reads its settings once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PREEMPTION_LINE = ("ERROR actor_manager.py: Actor with class name: 'PreemptionWatcher' and ID: 1 has constructor "
                   "arguments in the object store and max_restarts > 0.")


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter without Ray's skip pattern in its environment; its stdout."""
    clean = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_SKIP_REGEX"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env={**clean, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_importing_the_flags_and_the_ray_modules_writes_no_environment():
    """And ``flags`` and ``ray_logs`` import no Ray: the CLI imports them before a verb does."""
    out = run_python("""
        import os, sys
        before = dict(os.environ)
        from pipelines.core import flags, ray_logs
        print("ray" in sys.modules)
        from pipelines.core import ray_cluster
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        print(changed)
    """)
    assert out.splitlines() == ["False", "[]"]


DEDUP = """\
import json
{first}
from pipelines.core.ray_logs import skip_known_worker_lines
{then}
from ray._private import ray_logging
batch = {{"ip": "1.2.3.4", "pid": 7, "lines": [{line!r}, "epoch 1 step 2 loss 0.5"]}}
print(json.dumps([b["lines"] for b in ray_logging.stdout_deduplicator.deduplicate(batch)]))
"""


def test_known_worker_lines_are_dropped_whether_ray_was_imported_before_or_after():
    before = run_python(DEDUP.format(first="import ray._private.ray_logging", then="skip_known_worker_lines()",
                                     line=PREEMPTION_LINE))
    after = run_python(DEDUP.format(first="", then="skip_known_worker_lines()\nimport ray", line=PREEMPTION_LINE))
    untouched = run_python(DEDUP.format(first="import ray._private.ray_logging", then="", line=PREEMPTION_LINE))
    assert before.strip() == after.strip() == '[["epoch 1 step 2 loss 0.5"]]'
    assert PREEMPTION_LINE in untouched  # Ray alone prints it


def test_a_users_own_skip_pattern_wins():
    out = run_python(DEDUP.format(first="import ray._private.ray_logging", then="skip_known_worker_lines()",
                                  line=PREEMPTION_LINE), RAY_DEDUP_LOGS_SKIP_REGEX="^epoch")
    assert out.strip() == f'[["{PREEMPTION_LINE}"]]'


def test_the_cli_sets_the_pattern_before_a_verb_imports_ray():
    out = run_python("""
        from pipelines import cli
        from pipelines.core.ray_logs import SKIP_WORKER_LINES
        try:
            cli.main(["train", "--help"])  # imports the train verb, and Ray with it
        except SystemExit:
            pass
        from ray._private import ray_logging
        print("skips:", getattr(ray_logging.stdout_deduplicator.skip_re, "pattern", None) == SKIP_WORKER_LINES)
    """)
    assert "--num-workers" in out and out.splitlines()[-1] == "skips: True"


def _workers_started_line(count: int, multiple: int, concurrency: int) -> str:
    """The raylet's note, as ``worker_pool.cc`` words it (the quickstart on 2 cores: 8, 4x, 2)."""
    return (f"WARNING: {count} PYTHON worker processes have been started on node: 7f22 with address: 192.0.2.2, which "
            f"is {multiple}x the maximum expected startup concurrency ({concurrency}). This could be a result of using "
            "a large number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU requests (e.g., "
            "num_cpus=0.1) allowing high concurrency. See https://github.com/ray-project/ray/issues/3644 for some "
            "discussion of workarounds.")


def test_the_raylets_first_many_workers_note_on_a_small_node_is_dropped_and_later_ones_are_not():
    """On a 1- or 2-CPU node Train's fractional workers and Ray Data's tasks reach the raylet's
    4x note by design (issue 29: the quickstart printed it); a 5x note (more workers than a
    normal run starts there) and any note on a bigger node still reach the terminal."""
    import re

    from pipelines.core.ray_logs import SKIP_WORKER_LINES

    def dropped(line: str) -> bool:
        return re.search(SKIP_WORKER_LINES, line) is not None

    assert dropped(_workers_started_line(8, 4, 2)) and dropped(_workers_started_line(4, 4, 1))
    assert not dropped(_workers_started_line(10, 5, 2))
    assert not dropped(_workers_started_line(64, 4, 16))
    assert not dropped("WARNING: 8 JAVA worker processes have been started on node: x which is 4x the maximum "
                       "expected startup concurrency (2).")
    # Through Ray's own deduplicator, as the driver prints the raylet's lines.
    out = run_python(DEDUP.format(first="import ray._private.ray_logging", then="skip_known_worker_lines()",
                                  line=_workers_started_line(8, 4, 2)))
    assert out.strip() == '[["epoch 1 step 2 loss 0.5"]]'


ACTOR_POOL = """\
import os, sys
from pipelines.core.ray_cluster import init_ray
from pipelines.core import ray_logs
import ray, ray.data

class Same:
    def __call__(self, batch):
        return batch

mode = {mode!r}
init_ray(None, data_only=mode == "data_only")  # a data-only job's driver routes the advisory itself
if mode == "route":  # as the quickstart does, into its workdir
    print("routed to", ray_logs.route_actor_restart_advisory({log_dir!r}), flush=True)
print("session logs", ray._private.worker._global_node.get_logs_dir_path(), flush=True)
pool = ray.data.ActorPoolStrategy(size=1)  # as prepare, evaluate and batch predict run their actors
rows = ray.data.range(6, override_num_blocks=3).map_batches(Same, compute=pool, batch_size=2, num_cpus=0.5).take_all()
print("rows", len(rows), flush=True)
ray.shutdown()
"""


@pytest.mark.ray
def test_ray_cores_actor_restart_advisory_goes_to_a_file_not_the_terminal(tmp_path):
    """A Ray Data actor pool makes the driver's Ray core print ``ERROR … core_worker.cc: … has
    constructor arguments in the object store and max_restarts > 0`` (issue 29: the quickstart's
    prepare and evaluation), whatever the pool's own arguments: Ray Data passes its context and
    transform by reference. Routed, the line is in the file and the terminal has none of it; the
    dataset runs as before. Fresh interpreters: Ray logs it once per process."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_DATA_DISABLE_PROGRESS_BARS="1")

    def run(mode: str) -> subprocess.CompletedProcess:
        code = ACTOR_POOL.format(mode=mode, log_dir=str(tmp_path))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                              env=env)
        assert done.returncode == 0 and "rows 6" in done.stdout, done.stderr[-3000:]
        return done

    advisory = "has constructor arguments in the object store and max_restarts > 0"
    plain = run("plain")  # a training job's init routes nothing: Ray's own behaviour shows
    assert advisory in plain.stderr
    routed = run("route")
    assert advisory not in routed.stdout + routed.stderr and "core_worker" not in routed.stderr, routed.stderr[-3000:]
    log = (tmp_path / "ray-driver-advisories.log").read_text()
    assert advisory in log and "core_worker.cc" in log
    assert f"routed to {tmp_path / 'ray-driver-advisories.log'}" in routed.stdout
    # prepare, evaluate and batch predict (init_ray's data_only): into the session's Ray logs.
    data = run("data_only")
    assert advisory not in data.stdout + data.stderr and "core_worker" not in data.stderr, data.stderr[-3000:]
    logs = next(line.split(" ", 2)[2] for line in data.stdout.splitlines() if line.startswith("session logs "))
    assert advisory in (Path(logs) / "ray-driver-advisories.log").read_text()
