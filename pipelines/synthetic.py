"""``instalign synthetic``: write a synthetic dataset in the gRefCOCO on-disk format.

The output is read by ``instalign prepare --dataset grefcoco --root OUT`` exactly like the
official release (see ``instalign.data.synthetic`` for what it contains and why).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from instalign.data.synthetic import generate_grefcoco


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="root directory to write (grefcoco/ and images/ inside)")
    parser.add_argument("--num-images", type=int, default=200, help="number of images (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    parser.add_argument("--min-size", type=int, default=96, help="smallest image side in pixels (default: 96)")
    parser.add_argument("--max-size", type=int, default=320, help="largest image side in pixels (default: 320)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        counts = generate_grefcoco(args.out, num_images=args.num_images, seed=args.seed,
                                   min_size=args.min_size, max_size=args.max_size)
    except ValueError as exc:
        print(f"instalign synthetic: {exc}", file=sys.stderr)
        return 2
    totals = {k: sum(v.values()) for k, v in counts.items()}
    print(json.dumps({"out": str(args.out), "seconds": round(time.perf_counter() - start, 2),
                      "totals": totals, "per_split": counts}, indent=2))
    return 0
