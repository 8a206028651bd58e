"""The Arrow schema of a prepared dataset (DESIGN §3), defined once and versioned.

One row per *image*: the image is stored once however many expressions refer to it.
Instance masks are COCO RLE (compressed ``counts`` string) at the *stored* image size.
A sample is one sentence: ``samples[k]`` names its target annotation ids, or none.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

INSTANCE_TYPE = pa.struct([
    ("ann_id", pa.int64()),
    ("category_id", pa.int32()),
    ("rle", pa.string()),  # COCO compressed RLE counts, size = (height, width) of the stored image
])

SAMPLE_TYPE = pa.struct([
    ("ref_id", pa.int64()),
    ("sent_id", pa.int64()),
    ("text", pa.string()),
    ("ann_ids", pa.list_(pa.int64())),  # empty ⇔ no target
    ("no_target", pa.bool_()),
])

IMAGE_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("orig_width", pa.int32()),
    ("orig_height", pa.int32()),
    ("width", pa.int32()),  # stored (re-encoded) size
    ("height", pa.int32()),
    ("image", pa.binary()),  # JPEG bytes
    ("instances", pa.list_(INSTANCE_TYPE)),
    ("samples", pa.list_(SAMPLE_TYPE)),
], metadata={b"instalign.schema_version": str(SCHEMA_VERSION).encode()})

QUARANTINE_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("image_id", pa.int64()),
    ("ref_id", pa.int64()),  # -1 when the record is an image or annotation
    ("ann_id", pa.int64()),  # -1 when not about one annotation
    ("reason", pa.string()),  # a short code: missing_image, corrupt_image, invalid_segmentation, ...
    ("detail", pa.string()),  # the human-readable message
])

MANIFEST_NAME = "_manifest.json"
QUARANTINE_DIR = "_quarantine"
