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
