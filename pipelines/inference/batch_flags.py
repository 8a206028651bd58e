"""The options of batch prediction: ``instalign predict --data`` and ``python -m pipelines.inference.batch``.

Apart from ``batch`` so that ``instalign predict`` on one image, which defines these options
too, imports no Ray (``ray`` and ``ray.data``: 0.9 CPU-s measured).
"""

from __future__ import annotations

import argparse

__all__ = ["add_data_arguments"]


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``instalign predict`` adds for ``--data`` (its ``--model``, ``--out``,
    ``--top-words`` and ``--tracking-uri`` are shared)."""
    parser.add_argument("--data", default=None, metavar="DATASET_DIR|TABLE.csv|TABLE.parquet",
                        help="predict every (image, expression) pair of a prepared dataset split or a table "
                             "(columns text + image_path or image); --out is then an output directory")
    parser.add_argument("--split", default="val", help="split of a prepared dataset (default: val)")
    parser.add_argument("--num-workers", type=int, default=1, help="model replicas (Ray actors)")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per replica (0: CPU; default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per replica")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per model call (default: 32 on a GPU, 8 on a CPU)")
    parser.add_argument("--limit", type=int, default=0, help="predict only the first N rows (0: all)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (auto, HOST:PORT); default: a private local cluster")
    parser.add_argument("--experiment", default="instalign-batch-predict", help="MLflow experiment of the run")
