"""Table 3 as a report (``pipelines.tuning.table3``): the arithmetic with known numbers, the
space's groups, reference and seeds, the files from a real MLflow store; then a real
2-row × 2-seed search through Ray Tune on the tiny preset."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from pipelines.tuning.space import SpaceError, load_space
from pipelines.tuning.table3 import (Cell, TrialScore, build_table, fmt_cell, fmt_delta, mean_std, table3_from_mlflow,
                                     to_markdown, write_table3)


def rows_space(tmp_path, rows, **top):
    path = tmp_path / "rows.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", "search": "rows", **top, "rows": rows}, sort_keys=False))
    return path


def scores(row, status="completed", **by_seed):
    """``TrialScore``s of one row: ``s0=(gIoU, cIoU, N_acc)``, …"""
    return [TrialScore(row, int(k[1:]), status, dict(zip(("val_gIoU", "val_cIoU", "val_N_acc"), v)), f"{row}-{k}")
            for k, v in by_seed.items()]


@pytest.fixture
def space(tmp_path):
    return load_space(rows_space(tmp_path, {
        "full": {},
        "n2": {"group": "(d) queries N", "model.num_queries": 2},
        "vanilla": {"group": "(a) supervision", "loss.instance_supervision": "vanilla"},
        "n8": {"group": "(d) queries N", "model.num_queries": 8}}))


# --- the arithmetic ---------------------------------------------------------------------------

def test_mean_and_sample_std():
    assert mean_std([30.0, 32.0, 34.0]) == (32.0, 2.0)  # ddof=1: sqrt((4 + 0 + 4) / 2)
    mean, std = mean_std([28.0, 29.0])
    assert mean == 28.5 and std == pytest.approx(math.sqrt(0.5))
    assert mean_std([41.0]) == (41.0, None)
    m, s = mean_std([])
    assert math.isnan(m) and s is None


def test_table_groups_rows_and_measures_delta_from_the_reference(space):
    trials = [*scores("full", s0=(30, 20, 60), s1=(32, 22, 70), s2=(34, 24, 80)),
              *scores("n2", s0=(28, 18, 50), s1=(29, 20, 50)),
              *scores("n2", "stopped_early", s2=(5, 5, 5)),  # not the row: left out of its mean
              *scores("vanilla", s0=(40, 30, 90)),
              *scores("n8", "error", s0=(0, 0, 0))]
    table = build_table(trials, space.rows, space.reference)
    # Reference first, then the factors in the file's order, each factor's rows in file order.
    assert [(r.group, r.name) for r in table] == [("reference", "full"), ("(d) queries N", "n2"),
                                                  ("(d) queries N", "n8"), ("(a) supervision", "vanilla")]
    full, n2, n8, vanilla = table
    assert full.is_reference and full.cells["gIoU"] == Cell(32.0, 2.0, 0.0) and full.seeds == (0, 1, 2)
    assert full.cells["N-acc"] == Cell(70.0, 10.0, 0.0)
    assert n2.seeds == (0, 1) and n2.trials == 3 and n2.setting == "model.num_queries=2"
    assert n2.cells["gIoU"].mean == 28.5 and n2.cells["gIoU"].delta == -3.5
    assert n2.cells["cIoU"].std == pytest.approx(math.sqrt(2)) and n2.cells["cIoU"].delta == -3.0
    assert vanilla.cells["gIoU"] == Cell(40.0, None, 8.0)  # one seed: no spread
    assert math.isnan(n8.cells["gIoU"].mean) and n8.cells["gIoU"].delta is None and n8.trials == 1

    assert (fmt_cell(full.cells["gIoU"]), fmt_delta(full.cells["gIoU"], True)) == ("32.00 ± 2.00", "ref")
    assert (fmt_cell(n2.cells["gIoU"]), fmt_delta(n2.cells["gIoU"], False)) == ("28.50 ± 0.71", "-3.50")
    assert (fmt_cell(vanilla.cells["gIoU"]), fmt_delta(vanilla.cells["gIoU"], False)) == ("40.00 ± n/a", "+8.00")
    assert (fmt_cell(n8.cells["gIoU"]), fmt_delta(n8.cells["gIoU"], False)) == ("—", "—")

    md = to_markdown(table, title="rows.yaml", seeds=[0, 1, 2], reference="full").splitlines()
    assert "3 seeds a row (train.seed 0, 1, 2)" in md[2] and "reference row `full`" in md[2]
    assert md[4].startswith("| factor | row | setting | trials | gIoU | Δ gIoU | cIoU | Δ cIoU | N-acc | Δ N-acc |")
    assert md[6] == ("| reference | full (ref) | base config | 3/3 | 32.00 ± 2.00 | ref | 22.00 ± 2.00 | ref "
                     "| 70.00 ± 10.00 | ref |")
    assert md[7].startswith("| (d) queries N | n2 | model.num_queries=2 | 2/3 | 28.50 ± 0.71 | -3.50 |")
    assert md[8].startswith("|  | n8 |")  # the factor printed once, on its first row
    assert md[-1] == "Rows with fewer than 3 completed trials (stopped early, errored or unfinished): n2, n8, vanilla."


def test_without_a_reference_there_is_no_delta(tmp_path):
    space = load_space(rows_space(tmp_path, {"a": {"model.num_queries": 2}, "b": {"model.num_queries": 4}}))
    assert space.reference is None and [r.group for r in space.rows] == [None, None]
    table = build_table([*scores("a", s0=(1, 2, 3)), *scores("b", s0=(2, 3, 4))], space.rows, None)
    assert [r.cells["gIoU"].delta for r in table] == [None, None] and not any(r.is_reference for r in table)
    assert "No reference row: no Δ." in to_markdown(table, title="t", seeds=[0], reference=None)


# --- the space file: groups, reference, seeds -------------------------------------------------

def test_rows_name_their_factor_and_the_reference(tmp_path, space):
    assert space.reference == "full"  # the row with no overrides, by default
    assert [(r.name, r.group) for r in space.rows][:2] == [("full", None), ("n2", "(d) queries N")]
    assert space.params[0].values[1] == "n2 | model.num_queries=2"  # the group is not part of the trial
    named = load_space(rows_space(tmp_path, {"full": {}, "n2": {"model.num_queries": 2}}, reference="n2"))
    assert named.reference == "n2"
    with pytest.raises(SpaceError, match=r"rows\.yaml: reference='ful' is not a row; the rows are \['full', 'n2'\]"):
        load_space(rows_space(tmp_path, {"full": {}, "n2": {"model.num_queries": 2}}, reference="ful"))
    with pytest.raises(SpaceError, match=r"rows\.n4: no 'group' \(its Table 3 factor\)"):
        load_space(rows_space(tmp_path, {"full": {}, "n2": {"group": "N", "model.num_queries": 2},
                                         "n4": {"model.num_queries": 4}}))
    with pytest.raises(SpaceError, match=r"rows\.n2\.group: a row's factor must be a non-empty string, got 3"):
        load_space(rows_space(tmp_path, {"full": {}, "n2": {"group": 3, "model.num_queries": 2}}))
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: tiny\nsearch: grid\nreference: a\nparams:\n  loss.nt_weight: {type: grid, values: [1.0]}\n")
    with pytest.raises(SpaceError, match="'reference' names a row of a search=rows space; this one is search=grid"):
        load_space(grid)


def test_seeds_replicate_rows_only(tmp_path, space):
    seeded = space.with_seeds(3, 7)
    assert [p.key for p in seeded.params] == ["row", "train.seed"] and seeded.params[1].values == [7, 8, 9]
    assert seeded.grid_size() == 4 * 3 and space.grid_size() == 4  # the original is unchanged
    with pytest.raises(SpaceError, match=r"--seeds replicates the rows of a search=rows space .*search=grid"):
        load_space("tune_spaces/queries.yaml").with_seeds(2, 0)
    with pytest.raises(SpaceError, match="--seeds must be >= 1, got 0"):
        space.with_seeds(0, 0)
    own_seed = load_space(rows_space(tmp_path, {"full": {}, "s": {"train.seed": 3}}))
    with pytest.raises(SpaceError, match=r"rows\.s sets train\.seed, which --seeds sets per trial"):
        own_seed.with_seeds(2, 0)


def test_shipped_table3_groups_are_its_factors():
    """Every row of a group changes the same switch; the reference is the full model."""
    from instalign.config import paper
    from pipelines.tuning.space import trial_config

    space = load_space("tune_spaces/ablations.yaml")
    assert space.reference == "full"
    full, keys = paper().flat(), {}
    for row in space.rows[1:]:
        changed = {k for k, v in trial_config(paper(), row.values).flat().items() if v != full[k]}
        keys.setdefault(row.group, set()).update(changed)
    assert keys == {"(a) instance supervision": {"loss.instance_supervision"}, "(b) aggregation": {"model.aggregation"},
                    "(c) no-target input": {"model.no_target_input"}, "(d) queries N": {"model.num_queries"},
                    "(e) decoder": {"model.decoder"}}


# --- the files, from a real MLflow store (no Ray) ----------------------------------------------

def test_report_files_from_mlflow_alone(tmp_path, space):
    """Child runs shaped as ``pipelines.tuning.trial`` writes them; the report reads only MLflow."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("t3", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="search").info.run_id
    client.log_param(parent, "tune.space", str(tmp_path / "rows.yaml"))
    client.log_artifact(parent, str(tmp_path / "rows.yaml"), "search")
    (tmp_path / "base_config.yaml").write_text(__import__("instalign.config", fromlist=["tiny"]).tiny().to_yaml())
    client.log_artifact(parent, str(tmp_path / "base_config.yaml"), "search")
    labels = {r.name: r.label for r in space.rows}
    for row, seed, status, giou in [("full", 0, "completed", 30.0), ("full", 1, "completed", 34.0),
                                    ("n2", 0, "completed", 25.0), ("n2", 1, "error", 1.0),
                                    ("vanilla", 0, "completed", 31.0), ("vanilla", 1, "completed", 33.0)]:
        child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "instalign.tune.status": status,
                                             "instalign.tune.params": json.dumps(
                                                 {"row": labels[row], "train.seed": seed})}).info.run_id
        client.log_param(child, "train.seed", seed)
        for step, value in ((4, giou - 10), (8, giou)):  # the final validation counts, not the best
            client.log_metric(child, "val_gIoU", value, step=step)
            client.log_metric(child, "val_cIoU", value / 2, step=step)
            client.log_metric(child, "val_N_acc", 100 - value, step=step)
    paths = write_table3(client, parent, space, tmp_path / "report")
    assert [p.name for p in paths] == ["table3.md", "table3.csv", "table3_trials.csv", "table3_gIoU.png"]
    with open(paths[1]) as f:
        table = {r["row"]: r for r in csv.DictReader(f)}
    assert list(table) == ["full", "n2", "n8", "vanilla"]
    assert (table["full"]["gIoU_mean"], table["full"]["gIoU_std"], table["full"]["group"]) == \
        ("32.0", "2.828427", "reference")
    assert (table["n2"]["gIoU_mean"], table["n2"]["gIoU_std"], table["n2"]["gIoU_delta"]) == ("25.0", "n/a", "-7.0")
    assert (table["n2"]["completed"], table["n2"]["trials"], table["n2"]["seeds"]) == ("1", "2", "0")
    assert (table["vanilla"]["cIoU_mean"], table["vanilla"]["N-acc_delta"]) == ("16.0", "0.0")
    assert table["n8"]["gIoU_mean"] == "n/a" and table["n8"]["trials"] == "0"
    assert "2 seeds a row (train.seed 0, 1)" in paths[0].read_text()
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = table3_from_mlflow(store, parent, tmp_path / "again")  # the space and base from the parent's artifacts
    assert [p.read_bytes() for p in again[:3]] == [p.read_bytes() for p in paths[:3]]


# --- `instalign tune --seeds` -----------------------------------------------------------------

def test_seeds_are_refused_where_they_cannot_replicate_a_row(tmp_path, space):
    """Before any data is read or cluster started: a grid, ASHA, or --num-samples beside --seeds."""
    from pipelines.cli import build_parser
    from pipelines.tuning.tune import tune

    with pytest.raises(SpaceError, match=r"queries\.yaml: --seeds replicates the rows of a search=rows space"):
        tune("tune_spaces/queries.yaml", str(tmp_path / "none"), config="tiny", scheduler="none", seeds=2)
    with pytest.raises(ValueError, match="--seeds 2: Table 3's replicates must each train to the end; "
                                         "add --scheduler none"):
        tune(space.path, str(tmp_path / "none"), config="tiny", seeds=2)  # ASHA is the default
    with pytest.raises(ValueError, match="the seeds are the repeats; drop --num-samples 3"):
        tune(space.path, str(tmp_path / "none"), config="tiny", scheduler="none", seeds=2, num_samples=3)
    args = build_parser("tune").parse_args(["tune", "--space", space.path, "--data", "/d", "--seeds", "3"])
    assert args.seeds == 3
    assert build_parser("tune").parse_args(["tune", "--space", space.path, "--data", "/d"]).seeds is None


@pytest.mark.ray
@pytest.mark.slow
def test_two_rows_two_seeds_end_to_end(prepared_dataset, ray_local, tmp_path):
    """2 rows × 2 seeds = 4 trials of 1 epoch × 4 steps (tiny, 32 train / 8 val samples), 2 at a
    time, through real Ray Tune and a real MLflow store: each trial is a child run with its
    seed, and the report's numbers are the children's final validations, mean ± std."""
    from mlflow import MlflowClient

    from pipelines.tuning.tune import tune

    from tests.pipelines.tuning.test_tune import BASE_OVERRIDES

    path = rows_space(tmp_path, {"full": {}, "nt2": {"group": "no-target weight", "loss.nt_weight": 2.0}})
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = tune(str(path), str(prepared_dataset), config="tiny",
                  overrides=(*BASE_OVERRIDES, "train.epochs=1", "train.lr=0.01", "train.seed=5"), seeds=2,
                  scheduler="none", max_concurrent=2, workers_per_trial=1, cpus_per_worker=0.45, name="t3",
                  storage_path=str(tmp_path / "ray"), experiment="test-table3", tracking_uri=store, max_failures=0)
    assert [r.status for r in result.trials] == ["completed"] * 4, [r.error for r in result.trials]

    client = MlflowClient(tracking_uri=store)
    children = client.search_runs([client.get_run(result.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    by_row: dict[str, list] = {}
    for child in children:  # the row and the seed, from MLflow
        row = json.loads(child.data.tags["instalign.tune.params"])["row"].split(" | ")[0]
        by_row.setdefault(row, []).append((int(child.data.params["train.seed"]), child.data.metrics))
    assert {row: sorted(s for s, _ in ts) for row, ts in by_row.items()} == {"full": [5, 6], "nt2": [5, 6]}

    report = tmp_path / "ray" / "t3"
    assert {"table3.md", "table3.csv", "table3_trials.csv", "table3_gIoU.png"} <= \
        {a.path for a in client.list_artifacts(result.parent_run_id)}
    with open(report / "table3.csv") as f:
        table = {r["row"]: r for r in csv.DictReader(f)}
    for row, ts in by_row.items():
        assert len([m["val_gIoU"] for _, m in ts]) == 2
        # val N-acc is NaN on these 8 targeted samples, and MLflow keeps no NaN: the cell says so.
        for metric, col in (("val_gIoU", "gIoU"), ("val_cIoU", "cIoU"), ("val_N_acc", "N-acc")):
            mean, std = mean_std([m[metric] for _, m in ts if metric in m])
            if math.isnan(mean):
                assert table[row][f"{col}_mean"] == table[row][f"{col}_std"] == "n/a"
                continue
            assert float(table[row][f"{col}_mean"]) == pytest.approx(mean, abs=1e-5)
            assert float(table[row][f"{col}_std"]) == pytest.approx(std, abs=1e-5)
    assert float(table["nt2"]["gIoU_delta"]) == pytest.approx(
        float(table["nt2"]["gIoU_mean"]) - float(table["full"]["gIoU_mean"]), abs=1e-5)
    md = (report / "table3.md").read_text()
    assert "2 seeds a row (train.seed 5, 6)" in md and "| no-target weight | nt2 | loss.nt_weight=2.0 | 2/2 |" in md
    again = table3_from_mlflow(store, result.parent_run_id, tmp_path / "again")
    assert again[0].read_text() == md and again[1].read_text() == (report / "table3.csv").read_text()
