"""``instalign synthetic`` (``pipelines.data.synthetic``): the verb over the two generators, real files."""

from __future__ import annotations

import json

from pipelines.cli import main


def test_the_verb_writes_a_release_and_prints_its_counts(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "s"), "--num-images", "4", "--seed", "1",
                 "--min-size", "64", "--max-size", "96"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["style"], summary["out"]) == ("shapes", str(tmp_path / "s"))
    assert summary["totals"] == {k: sum(v.values()) for k, v in summary["per_split"].items()}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["grefcoco", "images"]
    images = [p for p in (tmp_path / "s" / "images").rglob("*") if p.is_file()]
    assert len(images) == 4


def test_the_objects_style_and_a_bad_size_is_one_line(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "o"), "--num-images", "3", "--style", "objects"]) == 0
    assert json.loads(capsys.readouterr().out)["style"] == "objects"
    assert main(["synthetic", "--out", str(tmp_path / "bad"), "--min-size", "300", "--max-size", "200"]) == 2
    err = capsys.readouterr().err
    assert err == "instalign synthetic: need 32 <= min_size < max_size, got 300, 200\n"
