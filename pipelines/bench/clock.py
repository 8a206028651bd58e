"""Wall time and the CPU seconds of this process tree, for the benchmarks' per-core figures.

Per core is reported two ways: wall-clock rate / CPUs, and items per CPU-second consumed by
the whole local process tree (driver + Ray's raylet, object store and workers, from
``/proc``, sampled so that processes ending meanwhile count: :class:`TreeCPU`). The second
is what a core delivers when busy, and stays meaningful on a shared machine where wall time
measures the neighbours' load too.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["tree_cpu_by_pid", "TreeCPU", "Clock"]


def tree_cpu_by_pid() -> dict[int, float]:
    """CPU seconds (user + system) each process of this process's tree has used so far.

    A local Ray cluster (raylet, object store, workers) descends from the driver that started
    it, so this covers Ray's own overhead too. Linux ``/proc`` only (empty elsewhere).
    """
    if not os.path.isdir("/proc/self"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:  # exited meanwhile
            continue
        rest = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        procs[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)  # ppid; utime + stime
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in procs.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return {p: procs[p][1] for p in tree if p in procs}


class TreeCPU:
    """CPU seconds this process tree uses over a block, processes that exit meanwhile included.

    Sampled every ``every_s`` seconds: a process that ends keeps its last sample (so it loses
    at most one interval), and a parent's count never includes its children's (no ``cutime``:
    Ray's raylet does not reap its workers with ``wait``, so their time would vanish from it).
    Per-core throughput is then items per CPU-second: unlike wall time it does not move when
    other jobs share the cores.
    """

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.seconds = float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instalign-bench-cpu", daemon=True)

    def _sample(self) -> None:
        self._last.update(tree_cpu_by_pid())

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> "TreeCPU":
        self._first = tree_cpu_by_pid()
        self._last = dict(self._first)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._first:
            self.seconds = sum(cpu - self._first.get(pid, 0.0) for pid, cpu in self._last.items())


class Clock:
    """Wall and process-tree CPU time of a block."""

    def __enter__(self) -> "Clock":
        self._cpu = TreeCPU().__enter__()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self._cpu.__exit__(*exc)
        self.cpu = self._cpu.seconds

    def result(self, items: int) -> dict:
        return dict(seconds=self.wall, cpu_seconds=self.cpu, items=items)
