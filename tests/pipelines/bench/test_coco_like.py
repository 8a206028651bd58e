"""The COCO-sized release ``instalign bench data`` generates (``pipelines.bench.coco_like``): a real
gRefCOCO-layout release that the real reader and the driver's checks accept whole."""

from __future__ import annotations

from instalign.data.readers import read_source
from pipelines.bench.coco_like import make_coco_like, release_owns
from pipelines.core.output_dirs import MARKER_NAME
from pipelines.data.records import plan_tasks


def test_the_release_reads_back_with_nothing_quarantined(tmp_path):
    totals = make_coco_like(tmp_path / "rel", num_images=2, seed=1, instances=3)
    source = read_source("grefcoco", str(tmp_path / "rel"))
    assert (len(source.images), len(source.annotations), len(source.refs)) == (
        totals["images"], totals["annotations"], totals["refs"]) == (2, 6, 2 * (3 + 2 + 1))
    assert sum(len(r.sentences) for r in source.refs) == totals["samples"]
    tasks, records, _, dropped = plan_tasks(source, image_root=tmp_path / "rel")
    assert records == [] and dropped == 0 and len(tasks) == 2
    assert all(info.width == 640 and info.height == 480 for info in source.images.values())


def test_it_owns_only_what_it_writes(tmp_path):
    make_coco_like(tmp_path / "rel", num_images=1)
    written = [p.relative_to(tmp_path / "rel").as_posix() + ("/" if p.is_dir() else "")
               for p in (tmp_path / "rel").rglob("*")]
    assert MARKER_NAME in written and all(release_owns(rel) for rel in written)
    for foreign in ("notes.txt", "images/train2014/photo.jpg", "grefcoco/other.json", "../x"):
        assert not release_owns(foreign), foreign
