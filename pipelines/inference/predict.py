"""``instalign predict``: segment one image for one expression and explain the answer.

Paper §3.6 inference through ``instalign.predictor.Predictor``: the no-target decision
(p̂_nt > 0.5, eq. 12), else the merged mask σ(M_merged) > 0.5 (eq. 8) at the original image
size, plus the instances the aggregation relied on with their relevance p̂_i and the words
their Phrase-Object Alignment rows weigh most (eq. 1). ``--out`` draws it
(``instalign.visualize``); ``--json`` prints the same record the MLflow pyfunc serves
(masks as COCO RLE), so a script sees one format whichever way it asks.

The model is a checkpoint directory or a registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``), whose checkpoint artifact is downloaded once.

With ``--data`` (a prepared dataset split or a table of images and expressions) the same
verb runs batch inference on Ray Data instead (``pipelines.inference.batch``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from instalign.data.masks import rle_area
from instalign.errors import USAGE, InstAlignError
from instalign.predictor import Predictor
from instalign.visualize import save_overlay
from pipelines.core import flags
from pipelines.core.output_dirs import looks_like_image, replaceable_file
from pipelines.inference.batch_flags import add_data_arguments
from pipelines.models.pyfunc import PyfuncInputError, check_text, load_local_image
from pipelines.models.records import prediction_to_record
from pipelines.models.source import configure_tracking, is_model_uri, resolve_checkpoint


def describe(record: dict[str, Any], *, text: str, image: str, width: int, height: int) -> str:
    """A human-readable report of one pyfunc-format record."""
    area = rle_area(record["mask"]["counts"], height, width)
    lines = [
        f"expression : {text!r}",
        f"image      : {image} ({width}x{height})",
        f"no target  : {'YES' if record['no_target'] else 'no'} (p_nt = {record['no_target_prob']:.3f})",
        f"mask       : {area} px ({100.0 * area / max(width * height, 1):.1f} % of the image)",
        f"instances  : {len(record['instances'])}",
    ]
    for k, inst in enumerate(record["instances"], 1):
        x, y, w, h = (int(v) for v in inst["bbox"])
        words = " ".join(f"{word}({weight:.2f})" for word, weight in zip(inst["words"], inst["word_weights"]))
        lines.append(f"  #{k:<2} score {inst['score']:.3f}  bbox [{x}, {y}, {w}, {h}]  words: {words}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_model(parser)
    parser.add_argument("--image", default=None, help="image file (JPEG, PNG, ...)")
    parser.add_argument("--text", default=None, help="the referring expression")
    parser.add_argument("--out", default=None,
                        help="write an overlay PNG here (a new file, or an image to replace); with --data: the "
                             "output directory (new or empty)")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON (the pyfunc's format)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--top-words", type=int, default=3, help="words reported per instance")
    flags.add_tracking_uri(parser)
    add_data_arguments(parser)  # --data --split --num-workers --gpus-per-worker ... (batch inference on Ray Data)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "data", None):
        from pipelines.inference import batch  # lazy: Ray and Ray Data only with --data (batch_flags says why)

        return batch.run(args)
    if not args.image or args.text is None:
        raise InstAlignError("give --image and --text (one image), or --data and --out (a dataset or table)",
                             exit_code=USAGE)
    if args.out:  # an image this project wrote, or a new file: never the input image nor a user's file
        replaceable_file(args.out, kind="an image", looks_ours=looks_like_image, inputs=[args.image])
    if is_model_uri(args.model):
        configure_tracking(args.tracking_uri)
    checkpoint = resolve_checkpoint(args.model)
    # One image, one forward: compiling (tens of seconds on a GPU) would never be repaid.
    predictor = Predictor.from_checkpoint(checkpoint, device=args.device, top_words=args.top_words, compile=False)
    image = load_local_image(args.image)
    try:
        text = check_text(0, args.text, tokenizer=predictor.tokenizer, max_tokens=predictor.transform.max_tokens)
    except PyfuncInputError as e:  # the pyfunc's checks name a row; one --text has none
        raise InstAlignError(str(e).replace("row 0: ", "")) from e
    prediction = predictor.predict(image, text)

    record = prediction_to_record(prediction)
    width, height = image.size
    if args.out:
        out = save_overlay(image, prediction, text, args.out, top_words=args.top_words)
        record["overlay"] = str(Path(out).resolve())
    if args.json:
        print(json.dumps({"model": args.model, "image": args.image, "text": text, **record}))
    else:
        print(describe(record, text=text, image=args.image, width=width, height=height))
        if args.out:
            print(f"overlay    : {record['overlay']}")
    return 0
