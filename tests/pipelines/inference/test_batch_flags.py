"""Batch prediction's options (``pipelines.inference.batch_flags``): defined once for
``instalign predict --data`` and ``python -m pipelines.inference.batch``, without importing Ray."""

from __future__ import annotations

import argparse
import subprocess
import sys

from pipelines.inference.batch_flags import add_data_arguments


def test_the_options_and_their_defaults():
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args([])
    assert (args.data, args.split, args.num_workers, args.gpus_per_worker, args.cpus_per_worker, args.batch_size,
            args.limit, args.address, args.experiment) == (None, "val", 1, None, None, None, 0, None,
                                                           "instalign-batch-predict")
    args = parser.parse_args(["--data", "t.parquet", "--num-workers", "2", "--limit", "5"])
    assert (args.data, args.num_workers, args.limit) == ("t.parquet", 2, 5)


def test_predict_on_one_image_defines_them_without_importing_ray():
    code = ("import sys; from pipelines.cli import build_parser; "
            "a = build_parser('predict').parse_args(['predict', '--model', 'm', '--image', 'x.png', '--text', 't']); "
            "assert a.data is None and a.split == 'val'; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)
