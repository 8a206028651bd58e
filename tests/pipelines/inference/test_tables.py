"""Reading a Parquet table of pairs for batch prediction (``pipelines.inference.tables``).

A table may carry its images as bytes. It used to be read whole on the driver and turned into
Python lists (a 64 MiB table: 374-390 MiB of driver RSS); now the driver reads only the
footers (``plan_parquet``) and Ray tasks stream one row group at a time (``read_piece``).
The rows must stay exactly what the whole-table read gave: same ids, numbering across row
groups and files, paths resolved against the table's directory, ``--limit`` the first rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.inference.tables import INPUT_SCHEMA, plan_parquet, read_piece

REPO = Path(__file__).resolve().parents[3]
MiB = 2**20


def _image_table(path: Path, *, mib: int, row_groups: int, rows: int = 256) -> Path:
    """``rows`` pairs whose images are ``mib`` MiB of random (incompressible) bytes in all."""
    size = mib * MiB // rows
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "image": [os.urandom(size) for _ in range(rows)],
                      "text": ["the thing"] * rows})
    pq.write_table(table, path, row_group_size=rows // row_groups)
    assert pq.ParquetFile(path).metadata.num_row_groups == row_groups
    return path


def _mixed_dir(root: Path) -> Path:
    """Two files, five row groups, every kind of cell: ids present and missing, image bytes,
    relative and absolute paths, a missing text, a number as text."""
    root.mkdir()
    def rows(start: int, n: int) -> dict:
        k = range(start, start + n)
        return {"id": [None if i % 3 == 0 else f"id{i}" for i in k],
                "image": [bytes([i]) * (i + 1) if i % 2 else None for i in k],
                "image_path": [None if i % 2 else (f"img/{i}.png" if i % 4 else f"/abs/{i}.png") for i in k],
                "text": [None if i == 5 else (f"thing {i}" if i % 7 else str(i)) for i in k]}
    pq.write_table(pa.table(rows(0, 12)), root / "a.parquet", row_group_size=4)
    pq.write_table(pa.table(rows(12, 8)), root / "b.parquet", row_group_size=4)
    return root


def _whole_table_rows(data: Path, limit: int = 0) -> list[dict]:
    """The rows as the whole-table read made them (``pq.read_table`` then per-row rules)."""
    table = pq.read_table(data).to_pylist()
    base = data.parent if data.is_file() else data
    out = []
    for k, row in enumerate(table[:limit or None]):
        path = row.get("image_path")
        out.append({"row_id": str(row["id"]) if row.get("id") is not None else str(k),
                    "image": row.get("image"),
                    "image_path": None if path is None else (path if os.path.isabs(path) else str(base / path)),
                    "text": None if row["text"] is None else str(row["text"]), "gt_mask": None, "gt_no_target": None,
                    "gt_num_targets": None})
    return out


def _streamed_rows(data: Path, limit: int = 0) -> list[dict]:
    base = data.parent if data.is_file() else data
    return [row for piece in plan_parquet(str(data), limit) for t in read_piece(piece, str(base))
            for row in t.to_pylist()]


@pytest.mark.parametrize("limit", [0, 1, 6, 13, 20, 99])
def test_streamed_rows_equal_the_whole_table_read(tmp_path, limit):
    data = _mixed_dir(tmp_path / "pairs")
    pieces = plan_parquet(str(data), limit)
    everything = [("a.parquet", 0, 0), ("a.parquet", 1, 4), ("a.parquet", 2, 8), ("b.parquet", 0, 12),
                  ("b.parquet", 1, 16)]
    assert [(Path(p["path"]).name, p["row_group"], p["first"]) for p in pieces] == everything[:len(pieces)]
    assert sum(p["rows"] for p in pieces) == min(limit or 20, 20)
    assert _streamed_rows(data, limit) == _whole_table_rows(data, limit)
    one_file = data / "a.parquet"
    assert _streamed_rows(one_file, limit) == _whole_table_rows(one_file, limit)


def test_a_table_without_the_columns_is_refused_from_its_footer(tmp_path):
    from pipelines.inference.tables import BatchPredictError

    pq.write_table(pa.table({"caption": ["x"], "image_path": ["a.png"]}), tmp_path / "t.parquet")
    with pytest.raises(BatchPredictError, match="needs a 'text' column"):
        plan_parquet(str(tmp_path / "t.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BatchPredictError, match="bad.parquet: not a readable table"):
        plan_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(BatchPredictError, match="no such file"):
        plan_parquet(str(tmp_path / "absent.parquet"))


_MEASURE = textwrap.dedent("""
    import json, sys, tracemalloc
    import pandas, pyarrow as pa  # imported by any first Arrow-from-Python conversion: not the data's cost
    from pipelines.inference.tables import plan_parquet, read_piece

    def rss_peak_mib():  # VmHWM: the peak resident set since the reset below
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024

    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux)
        f.write("5")
    before = rss_peak_mib()
    tracemalloc.start()
    rows = 0
    for piece in plan_parquet(sys.argv[1]):
        for table in read_piece(piece, "/"):
            rows += table.num_rows
        del table
    print(json.dumps({"rows": rows, "python_peak": tracemalloc.get_traced_memory()[1],
                      "arrow_peak": pa.default_memory_pool().max_memory(), "rss_growth_mib": rss_peak_mib() - before}))
""")


def test_reading_a_big_table_holds_one_row_group_not_the_table(tmp_path):
    """128 MiB of images in 64 row groups, read in a fresh process: Arrow's and Python's peaks
    stay near one row group (2 MiB; Arrow's Parquet reader decodes a whole row group at once),
    RSS growth far below the table (the whole-table read grew RSS by ~6x the table)."""
    path = _image_table(tmp_path / "t.parquet", mib=128, row_groups=64)
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["rows"] == 256
    assert got["arrow_peak"] + got["python_peak"] < 16 * MiB, got
    assert got["rss_growth_mib"] < 128 / 3, got


@pytest.mark.ray
def test_the_driver_never_holds_a_tables_images(ray_local, tmp_path):
    """``read_pairs`` on the driver: its Python allocations stay far below the 64 MiB of images
    (the whole-table read made a Python ``bytes`` of every image there); the rows the tasks
    stream are the whole-table read's."""
    from pipelines.inference.tables import read_pairs

    def count(path: Path) -> int:
        ds, kind = read_pairs(str(path))
        assert kind == "table"
        return ds.count()

    assert count(_image_table(tmp_path / "small.parquet", mib=1, row_groups=2)) == 256  # Ray Data's lazy imports
    path = _image_table(tmp_path / "t.parquet", mib=64, row_groups=16)
    tracemalloc.start()
    try:
        assert count(path) == 256
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"driver Python peak {peak / MiB:.1f} MiB for a 64 MiB table"

    data = _mixed_dir(tmp_path / "pairs")
    ds, _ = read_pairs(str(data), limit=13)
    assert ds.schema().names == INPUT_SCHEMA.names
    assert sorted(ds.take_all(), key=lambda r: int(r["row_id"].removeprefix("id"))) == _whole_table_rows(data, 13)
