"""``instalign synthetic``: write a synthetic dataset in the gRefCOCO on-disk format.

The output is read by ``instalign prepare --dataset grefcoco --root OUT`` exactly like the
official release. Two styles: ``shapes`` (the quickstart's, ``instalign.data.synthetic``)
and ``objects`` (held out: other vocabulary, relations, more objects, other sizes and
no-target rate; ``instalign.data.synthetic_objects``), on which nothing is tuned.
"""

from __future__ import annotations

import argparse
import json
import time

from instalign.data.synthetic import generate_grefcoco
from instalign.data.synthetic_objects import generate_objects
from instalign.errors import USAGE, InstAlignError

#: style → (generator, default smallest side, default largest side)
STYLES = {"shapes": (generate_grefcoco, 96, 320), "objects": (generate_objects, 160, 448)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="root directory to write (grefcoco/ and images/ inside)")
    parser.add_argument("--num-images", type=int, default=200, help="number of images (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    parser.add_argument("--style", choices=sorted(STYLES), default="shapes",
                        help="shapes: the quickstart's set; objects: the held-out set nothing is tuned on "
                             "(default: shapes)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="smallest image side in pixels (default: 96 for shapes, 160 for objects)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="largest image side in pixels (default: 320 for shapes, 448 for objects)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        generate, min_size, max_size = STYLES[args.style]
        counts = generate(args.out, num_images=args.num_images, seed=args.seed,
                          min_size=args.min_size or min_size, max_size=args.max_size or max_size)
    except ValueError as exc:  # a bad option value (--num-images 0 …): a usage error, as before
        raise InstAlignError(str(exc), exit_code=USAGE) from exc
    totals = {k: sum(v.values()) for k, v in counts.items()}
    print(json.dumps({"out": str(args.out), "style": args.style, "seconds": round(time.perf_counter() - start, 2),
                      "totals": totals, "per_split": counts}, indent=2))
    return 0
