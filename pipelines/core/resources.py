"""Resource planning for every training job: CPUs, GPUs and storage, in one place.

Ray Train workers that reserve every CPU leave no slot for the Ray Data tasks that read and
decode their input, and the run then hangs forever (PLATFORM-FACTS, "Deadlock"). Every
rule that prevents that lives here, used by ``instalign train``, each Tune trial, the
quickstart and ``instalign evaluate`` alike:

* :func:`resolve_gpus_per_worker` — GPU workers by default when the cluster has GPUs;
* :func:`default_cpus_per_worker` — the one default share of a cluster per Train worker;
* :func:`data_cpus_per_task` — the CPUs of one Ray Data decode task beside such a worker;
* :func:`check_leaves_room_for_data` — refuse a request that takes every CPU;
* :func:`plan_workers` / :func:`describe_workers` — one Train run's workers, and the line
  that says at its start which device it trains on;
* :func:`plan_concurrency` — how many Tune trials fit at once;
* :func:`storage_root` / :func:`join_storage` — where Ray keeps run directories.

Pure arithmetic except :func:`cluster_cpus` and :func:`cluster_totals`, which read the connected
cluster's resources; nothing here starts or joins a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Optional

#: Share of the cluster's CPUs kept free for Ray Data (at least one whole CPU).
DATA_CPU_SHARE = 0.25
#: CPUs that must stay free for Ray Data: its file-listing and Parquet read tasks take a whole CPU each.
DATA_CPUS = 1.0
#: CPU share of a Tune trial's driver function (PLATFORM-FACTS: 1 starves the workers, 0 is rejected).
TRIAL_CPU = 0.01
#: Most CPUs a worker takes by default: a big node should not hand its whole budget to torch threads.
MAX_DEFAULT_CPUS = 4.0
#: Default Ray storage for run directories and checkpoints (relative to the working directory).
DEFAULT_STORAGE = "ray_results"


@dataclass(frozen=True)
class WorkerResources:
    """What each Ray Train worker of a job reserves, and what its data tasks get."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool = False
    gpus_per_worker: float = 0.0
    placement_strategy: str = "PACK"

    @property
    def data_cpus(self) -> float:
        """CPUs per Ray Data decode task (:func:`data_cpus_per_task`)."""
        return data_cpus_per_task(self.cpus_per_worker)

    def per_worker(self) -> dict[str, float]:
        """Ray's ``resources_per_worker``."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}


def cluster_cpus() -> float:
    """CPUs the connected cluster advertises in total (all nodes)."""
    return cluster_totals()["CPU"]


def cluster_totals() -> dict[str, float]:
    """``{"CPU": n, "GPU": m}``: what the connected cluster advertises in total (all nodes)."""
    import ray

    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0.0)), "GPU": float(resources.get("GPU", 0.0))}


def resolve_gpus_per_worker(requested: Optional[float], total_gpus: float, *, flag: str = "--gpus-per-worker") -> float:
    """GPUs per Train worker: ``requested`` when given (0: CPU workers), else 1 when the cluster has GPUs.

    The default follows the cluster because a GPU cluster that trains on CPU does so silently
    and ~100x slower (the paper preset: 78 s per step on CPU). A cluster whose GPUs are all on
    nodes still to come (an autoscaler's) advertises none yet: pass ``--gpus-per-worker 1`` there.

    Raises:
        ValueError: a negative request (named as ``flag``, the option the user gave it with).
    """
    if requested is None:
        return 1.0 if total_gpus >= 1 else 0.0
    if requested < 0:
        raise ValueError(f"{flag} must be >= 0, got {requested:g}")
    return float(requested)


def default_cpus_per_worker(num_workers: int, *, total_cpus: Optional[float] = None, use_gpu: bool = False,
                            concurrent: int = 1, driver_cpus: float = 0.0) -> float:
    """CPUs per Train worker that leave a share of the cluster to Ray Data.

    GPU workers take 1 CPU each (the GPU does the work; the CPU feeds it). CPU workers of
    ``concurrent`` jobs split what remains after keeping :data:`DATA_CPU_SHARE` of the
    cluster (at least one CPU) and each job's ``driver_cpus`` (a Tune trial's
    :data:`TRIAL_CPU`), in quarter-CPU steps — so a worker and a decode task
    (:func:`data_cpus_per_task`) tile one CPU exactly — at most :data:`MAX_DEFAULT_CPUS`.
    On a cluster too small for a quarter each (one CPU in total, many workers), the workers
    share half of it.

    Raises:
        ValueError: no workers, or a cluster without CPUs.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    total = cluster_cpus() if total_cpus is None else float(total_cpus)
    if total <= 0:
        raise ValueError(f"the Ray cluster advertises no CPUs (total {total}); cannot place {num_workers} workers")
    if use_gpu:
        return 1.0
    slots = num_workers * max(1, concurrent)
    room = total - max(1.0, DATA_CPU_SHARE * total) - max(1, concurrent) * driver_cpus
    share = math.floor(4 * room / slots + 1e-9) / 4
    if share < 0.25:
        share = total / (2 * slots)
    return round(min(MAX_DEFAULT_CPUS, share), 3)


def data_cpus_per_task(cpus_per_worker: float) -> float:
    """CPUs per Ray Data decode task: what a fractional worker leaves of its CPU, else a whole one."""
    fraction = cpus_per_worker - math.floor(cpus_per_worker)
    return round(1.0 - fraction, 3) if fraction > 1e-9 else 1.0


def check_leaves_room_for_data(num_workers: int, cpus_per_worker: float, *,
                               total_cpus: Optional[float] = None) -> None:
    """Refuse a request whose workers would take every CPU (Ray Data would then never run).

    A cluster-wide check only: Ray Data's Parquet read tasks ask for one whole CPU, so on
    nodes where the workers leave less than one free CPU the streaming train / val
    pipelines cannot be scheduled either (measured: a 2-node cluster of 1-CPU nodes with a
    0.5-CPU worker on each hangs in validation). Real nodes have CPUs to spare.
    """
    total = cluster_cpus() if total_cpus is None else float(total_cpus)
    taken = num_workers * cpus_per_worker
    if taken > total:
        raise ValueError(f"{num_workers} workers × {cpus_per_worker} CPUs = {taken} > the cluster's {total} CPUs")
    if taken >= total:
        raise ValueError(
            f"{num_workers} workers × {cpus_per_worker} CPUs take all {total} CPUs of the cluster: the Ray Data "
            "tasks that decode the training data could never be scheduled and the run would hang. "
            "Lower --cpus-per-worker (fractions are fine, e.g. 0.5) or add nodes.")


def plan_workers(num_workers: int, *, gpus_per_worker: Optional[float] = None,
                 cpus_per_worker: Optional[float] = None, placement_strategy: str = "PACK",
                 cluster: Optional[Mapping[str, float]] = None) -> WorkerResources:
    """The resources of one Train run (``instalign train``, quickstart).

    Args:
        gpus_per_worker: ``None`` (the default): one GPU per worker when the cluster has GPUs,
            else CPU workers (:func:`resolve_gpus_per_worker`); 0: CPU workers; else that share.
        cpus_per_worker: ``None``: :func:`default_cpus_per_worker`.
        cluster: the cluster's total resources (``{"CPU": …, "GPU": …}``, as
            ``ray.cluster_resources()``); default: the connected cluster's.
    """
    cluster = cluster_totals() if cluster is None else cluster
    total_cpus, total_gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    gpus = resolve_gpus_per_worker(gpus_per_worker, total_gpus)
    use_gpu = gpus > 0
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(num_workers, total_cpus=total_cpus, use_gpu=use_gpu)
    check_leaves_room_for_data(num_workers, cpus_per_worker, total_cpus=total_cpus)
    return WorkerResources(num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
                           gpus_per_worker=gpus, placement_strategy=placement_strategy)


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}{'' if n == 1 else 's'}"


def describe_workers(r: WorkerResources, cluster: Mapping[str, float], *, requested_gpus: Optional[float],
                     what: str = "training") -> str:
    """The line a run logs at its start: which device it trains on, and why.

    ``training on GPU: 4 workers × 1 GPU + 1 CPU each (cluster: 8 GPUs, 64 CPUs)``, or
    ``training on CPU: 2 workers × 0.5 CPU (the cluster has no GPUs; 2 CPUs)`` — or, on a GPU
    cluster, that ``--gpus-per-worker 0`` asked for CPU. A GPU request larger than what the
    cluster has now is said too: the run waits for it (an autoscaler may add nodes).
    """
    total_cpus, total_gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    workers = f"{r.num_workers} worker{'s' if r.num_workers != 1 else ''}"
    where = f"{_count(total_gpus, 'GPU')}, {_count(total_cpus, 'CPU')}"
    if r.use_gpu:
        line = (f"{what} on GPU: {workers} × {r.gpus_per_worker:g} GPU + {r.cpus_per_worker:g} CPU each "
                f"(cluster: {where})")
        wanted = r.num_workers * r.gpus_per_worker
        if wanted > total_gpus:
            line += f"; {wanted:g} GPUs asked, more than the cluster has now: the run waits until they are free"
        return line
    line = f"{what} on CPU: {workers} × {r.cpus_per_worker:g} CPU"
    if total_gpus <= 0:
        return f"{line} (the cluster has no GPUs; {_count(total_cpus, 'CPU')})"
    return f"{line} (--gpus-per-worker {requested_gpus:g}; the cluster's {_count(total_gpus, 'GPU')} stay unused)"


def plan_concurrency(*, total_cpus: float, total_gpus: float, num_workers: int, cpus_per_worker: float,
                     gpus_per_worker: float, max_concurrent: Optional[int]) -> int:
    """Tune trials that may run at once (as many as fit when ``max_concurrent`` is None).

    ``M × (TRIAL_CPU + W × C)`` CPUs must leave at least one whole CPU free: Ray Data's file
    listing and Parquet read tasks take 1 CPU each, and with less free the trials' Train
    workers wait forever for their input (PLATFORM-FACTS, "Deadlock"; measured here: two
    0.5-CPU trials on 2 CPUs leave 0.98 and hang). ``M × W × G`` must not exceed the GPUs.

    Raises:
        ValueError: an explicit ``max_concurrent`` that does not fit, or not even one trial fits.
    """
    per_trial = TRIAL_CPU + num_workers * cpus_per_worker
    fit = math.floor((total_cpus - DATA_CPUS) / per_trial + 1e-9)
    why = (f"each trial takes {TRIAL_CPU} + {num_workers} workers × {cpus_per_worker:g} CPUs = {per_trial:g} CPUs "
           f"and {DATA_CPUS:g} of the cluster's {total_cpus:g} CPUs must stay free for Ray Data's read tasks")
    if gpus_per_worker > 0:
        fit = min(fit, math.floor(total_gpus / (num_workers * gpus_per_worker) + 1e-9))
        why += f"; each trial takes {num_workers} × {gpus_per_worker:g} of the cluster's {total_gpus:g} GPUs"
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {max_concurrent}")
        if max_concurrent > fit:
            raise ValueError(f"--max-concurrent {max_concurrent} does not fit: {why} (at most {max(fit, 0)} at once). "
                             "Lower --max-concurrent or --cpus-per-worker, or add nodes.")
        return max_concurrent
    if fit < 1:
        raise ValueError(f"not even one trial fits: {why}. Lower --cpus-per-worker (fractions are fine) or add nodes.")
    return fit


def storage_root(storage_path: Optional[str]) -> str:
    """Ray's ``storage_path``: a URI as given, else an absolute directory (default ``./ray_results``).

    Absolute because Train workers run with their working directory in Ray's session dir.
    """
    if storage_path and "://" in storage_path:
        return storage_path
    return str(Path(storage_path or DEFAULT_STORAGE).expanduser().resolve())


def join_storage(storage: str, name: str) -> str:
    """``<storage>/<name>`` for a directory or a URI."""
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def absolute_data_dir(data_dir: str) -> str:
    """A dataset path workers can open from any working directory (URIs unchanged)."""
    return data_dir if "://" in str(data_dir) else str(Path(data_dir).resolve())
