"""Data: release readers, synthetic data, masks, images, transforms, the records schema.

Submodules are imported where used (``from instalign.data.readers import read_grefcoco``);
nothing is imported here, so ``import instalign.data.batch`` stays cheap.

* ``source``      — ``GRESSource``: what every reader returns (DESIGN §3)
* ``readers``     — gRefCOCO, Ref-ZOM, RefCOCO/+/g as released → ``GRESSource``
* ``release_files`` — where a release's files are, how they are opened, their checksums
* ``release_checks`` — one record read typed and bounded; the split and file name checks
* ``safe_pickle`` — restricted unpickler for the REFER-family ``.p`` files
* ``masks``       — COCO segmentation ↔ compressed RLE (pycocotools)
* ``images``      — strict, fast decode to RGB; JPEG encode
* ``transforms``  — ``GRESTransform``, the one resize/normalise/tokenise for train and serve
* ``synthetic``   — a shapes dataset in the exact gRefCOCO on-disk format
* ``records``     — the versioned Arrow schema of prepared Parquet
* ``batch``       — the ``Batch`` every loader yields
"""
