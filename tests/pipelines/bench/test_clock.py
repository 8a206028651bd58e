"""Wall and process-tree CPU time of a block (``pipelines.bench.clock``), on real processes."""

from __future__ import annotations

import os
import time

from pipelines.bench.clock import Clock, TreeCPU, tree_cpu_by_pid


def test_tree_cpu_counts_a_child_that_exits_inside_the_block():
    """A worker that ends before the block does (as a job's Ray workers do) still counts; a plain
    difference of the tree's CPU at both ends would lose it (or go negative)."""
    import subprocess
    import sys

    with TreeCPU(every_s=0.05) as cpu:
        subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                        "while time.process_time() - t < 0.6: pass"], check=True)
    assert 0.5 <= cpu.seconds <= 3.0


def test_the_tree_holds_this_process_and_its_cpu_grows():
    before = tree_cpu_by_pid()[os.getpid()]
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
    assert tree_cpu_by_pid()[os.getpid()] >= before + 0.1


def test_a_clock_reports_wall_and_cpu_seconds_with_the_items():
    with Clock() as clock:
        time.sleep(0.2)
    result = clock.result(items=10)
    assert result["items"] == 10 and 0.2 <= result["seconds"] < 5
    assert 0 <= result["cpu_seconds"] < result["seconds"]  # asleep: little CPU
