"""The shipped search spaces (``tune_spaces/*.yaml``) and the space loader's errors; no Ray."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import yaml

from instalign.config import Config, load_config, paper, tiny
from pipelines.tuning.space import ROW_KEY, SpaceError, load_space, row_values, trial_config, trial_overrides, yaml_value

SPACES = sorted((Path(__file__).resolve().parents[3] / "tune_spaces").glob("*.yaml"))


def write(tmp_path: Path, params: dict, **top) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", "search": "random", **top, "params": params}))
    return path


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_loads_for_both_presets(path):
    for base in (None, paper(), tiny()):
        space = load_space(path, base)
        assert space.params and space.search in ("random", "grid", "optuna", "rows")
        assert set(p.key for p in space.params) <= set((base or paper()).flat()) | {ROW_KEY}


def test_shipped_spaces_are_what_their_comments_say():
    spaces = {p.stem: load_space(p) for p in SPACES}
    assert {"loss_weights", "queries", "ablations"} <= set(spaces)
    # Loss weights: log-uniform over [λ/4, 4λ] around the paper's λ of eqs. 5–7 and 13.
    lw, defaults = spaces["loss_weights"], paper().flat()
    assert lw.search == "random" and len(lw.params) == 6
    for p in lw.params:
        assert p.type == "loguniform"
        assert math.sqrt(p.low * p.high) == pytest.approx(defaults[p.key]) and p.high / p.low == pytest.approx(16)
    assert spaces["queries"].grid_size() == 8 and spaces["queries"].search == "grid"
    # Every combination of the switches: 3 supervisions × 3 aggregations × 4 no-target inputs × 3 decoders.
    assert spaces["ablations_grid"].grid_size() == 108 and spaces["ablations_grid"].search == "grid"


def test_ablations_are_table3_one_factor_at_a_time_from_the_full_model():
    """13 rows: the full model and each Table 3 row changing exactly one switch of it, nothing else."""
    space = load_space(next(p for p in SPACES if p.stem == "ablations"))
    assert space.search == "rows" and [p.key for p in space.params] == [ROW_KEY] and space.grid_size() == 13
    full = paper().flat()
    changed: dict[str, set] = {}
    for label in space.params[0].values:
        cfg = trial_config(paper(), {ROW_KEY: label}).flat()
        assert load_config(paper(), trial_overrides({ROW_KEY: label})).flat() == cfg  # the CLI's path agrees
        diff = {k: v for k, v in cfg.items() if v != full[k]}
        if label.startswith("full"):
            assert diff == {}
            continue
        assert len(diff) == 1, (label, diff)  # one factor at a time
        ((key, value),) = diff.items()
        changed.setdefault(key, set()).add(value)
    assert changed == {
        "loss.instance_supervision": {"vanilla", "none"},
        "model.aggregation": {"aia_no_prelu", "fixed_threshold"},
        "model.no_target_input": {"q_global", "t_sen", "mean_queries"},
        "model.num_queries": {20, 50, 200},
        "model.decoder": {"mask2former", "rela"},
    }
    assert "--scheduler none" in Path(space.path).read_text()  # rows must be full trainings


def test_rows_spaces_are_validated_row_by_row(tmp_path):
    def rows_file(rows, **top):
        path = tmp_path / "rows.yaml"
        path.write_text(yaml.safe_dump({"base": "tiny", "search": "rows", **top, "rows": rows}, sort_keys=False))
        return path

    space = load_space(rows_file({"ref": {}, "small": {"model.num_queries": 4, "loss.nt_weight": 0.2}}))
    assert space.params[0].values == ["ref | ", "small | loss.nt_weight=0.2, model.num_queries=4"]
    assert row_values(space.params[0].values[1]) == {"loss.nt_weight": 0.2, "model.num_queries": 4}
    assert trial_overrides({ROW_KEY: space.params[0].values[0]}) == []
    cfg = trial_config(tiny(), {ROW_KEY: space.params[0].values[1]})
    assert (cfg.loss.nt_weight, cfg.model.num_queries) == (0.2, 4) and isinstance(cfg.model.num_queries, int)
    with pytest.raises(SpaceError, match=r"rows\.bad\.loss\.nope: unknown config key"):
        load_space(rows_file({"bad": {"loss.nope": 1}}))
    with pytest.raises(SpaceError, match=r"rows\.bad: not a valid config: .*expected one of"):
        load_space(rows_file({"bad": {"model.decoder": "detr"}}))
    with pytest.raises(SpaceError, match=r"rows\.again: the same trial as row 'ref'"):
        load_space(rows_file({"ref": {}, "again": {}}))
    with pytest.raises(SpaceError, match="'rows' goes with search=rows and no 'params'"):
        load_space(rows_file({"ref": {}}, params={"loss.nt_weight": {"type": "grid", "values": [0.1]}}))


def test_every_ablation_grid_point_is_a_valid_training_config():
    """Each value is checked alone on load; here every *combination* builds a config."""
    space = load_space(next(p for p in SPACES if p.stem == "ablations_grid"))
    keys = [p.key for p in space.params]
    seen = set()
    for values in itertools.product(*(p.values for p in space.params)):
        cfg = load_config(paper(), trial_overrides(dict(zip(keys, values))))
        flat = cfg.flat()
        assert tuple(flat[k] for k in keys) == values
        seen.add(values)
    assert len(seen) == 108


def test_overrides_round_trip_every_value_type():
    """JSON's ``1e-09`` reads back from YAML as a string; the override text must not."""
    for value in (1e-9, 2.5e-05, 0.003, 5.0, 100, "aia", "yes", True, [20, 50]):
        assert yaml.safe_load(yaml_value(value)) == value
    cfg = load_config(tiny(), trial_overrides({"train.lr": 1e-9, "train.min_lr": 1e-10, "model.decoder": "mask2former",
                                               "loss.deep_supervision": False, "model.num_queries": 20}))
    assert (cfg.train.lr, cfg.train.min_lr, cfg.model.decoder, cfg.loss.deep_supervision, cfg.model.num_queries) == \
        (1e-9, 1e-10, "mask2former", False, 20)
    assert trial_overrides({"b.x": 1, "a.y": "z"}) == ["a.y=z", "b.x=1"]


def test_bad_key_names_the_file_and_the_key(tmp_path):
    path = write(tmp_path, {"loss.no_such_weight": {"type": "uniform", "low": 0.0, "high": 1.0}})
    with pytest.raises(SpaceError, match=rf"{path}: params\.loss\.no_such_weight: unknown config key"):
        load_space(path)
    path = write(tmp_path, {"model": {"type": "choice", "values": [1]}})  # a section, not a field
    with pytest.raises(SpaceError, match=rf"{path}: params\.model: unknown config key"):
        load_space(path)


@pytest.mark.parametrize("spec, message", [
    ({"type": "uniform", "low": 2.0, "high": 1.0}, r"low=2\.0 must be < high=1\.0"),
    ({"type": "uniform", "low": 1.0, "high": 1.0}, r"low=1\.0 must be < high=1\.0"),
    ({"type": "loguniform", "low": 0.0, "high": 1.0}, "loguniform needs low > 0"),
    ({"type": "uniform", "low": "a", "high": 1.0}, "'low' and 'high' must be numbers"),
    ({"type": "randint", "low": 1.5, "high": 4}, "randint bounds must be integers"),
    ({"type": "normal", "low": 0.0, "high": 1.0}, "type='normal'; expected one of"),
    ({"type": "uniform", "low": 0.0, "high": 1.0, "values": [1]}, r"unexpected field\(s\) \['values'\]"),
    ({"type": "choice", "values": []}, "'values' must be a non-empty list"),
])
def test_bad_range_names_the_file_and_the_key(tmp_path, spec, message):
    path = write(tmp_path, {"loss.merged_weight": spec})
    with pytest.raises(SpaceError, match=rf"{path}: params\.loss\.merged_weight: {message}"):
        load_space(path)


def test_a_range_the_config_refuses_names_the_file_the_key_and_the_value(tmp_path):
    path = write(tmp_path, {"loss.merged_weight": {"type": "uniform", "low": -1.0, "high": 5.0}})
    with pytest.raises(SpaceError, match=rf"{path}: loss\.merged_weight=-1\.0 is not a valid config value: "
                                         r".*loss\.merged_weight must be >= 0"):
        load_space(path)
    path = write(tmp_path, {"model.num_queries": {"type": "randint", "low": 0, "high": 10}})
    with pytest.raises(SpaceError, match=rf"{path}: model\.num_queries=0 .*num_queries must be >= 1"):
        load_space(path)


@pytest.mark.parametrize("key, bad", [("model.aggregation", "max_pool"), ("model.no_target_input", "cls_token"),
                                      ("loss.instance_supervision", "strong"), ("model.decoder", "detr")])
def test_bad_switch_value_names_the_file_the_key_and_the_choices(tmp_path, key, bad):
    good = getattr(getattr(Config(), key.split(".")[0]), key.split(".")[1])
    path = write(tmp_path, {key: {"type": "grid", "values": [good, bad]}}, search="grid")
    with pytest.raises(SpaceError, match=rf"{path}: {key}='{bad}' is not a valid config value: .*expected one of"):
        load_space(path)


def test_bad_file_structure(tmp_path):
    with pytest.raises(SpaceError, match="no such search-space file"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SpaceError, match=r"list\.yaml: expected a mapping"):
        load_space(tmp_path / "list.yaml")
    uniform = {"loss.nt_weight": {"type": "uniform", "low": 0.05, "high": 0.2}}
    with pytest.raises(SpaceError, match=r"unknown top-level key\(s\) \['trials'\]"):
        load_space(write(tmp_path, uniform, trials=3))
    with pytest.raises(SpaceError, match="search='bayes'"):
        load_space(write(tmp_path, uniform, search="bayes"))
    with pytest.raises(SpaceError, match="search=grid needs every param of type grid"):
        load_space(write(tmp_path, uniform, search="grid"))
    with pytest.raises(SpaceError, match="search=optuna cannot take grid params"):
        load_space(write(tmp_path, {"model.num_queries": {"type": "grid", "values": [20, 50]}}, search="optuna"))
    with pytest.raises(SpaceError, match=r"base='huge' is not a preset"):
        load_space(write(tmp_path, uniform, base="huge"))
    with pytest.raises(SpaceError, match="'params' must be a non-empty mapping"):
        load_space(write(tmp_path, {}))


def test_the_no_target_weight_is_searchable_with_auto_among_its_choices(tmp_path):
    path = write(tmp_path, {"loss.nt_pos_weight": {"type": "choice", "values": ["auto", 1.0, 2.5]}})
    space = load_space(path)
    values = [trial_config(tiny(), {"loss.nt_pos_weight": v}).loss.nt_pos_weight for v in space.params[0].values]
    assert values == ["auto", 1.0, 2.5]  # "auto" is worked out per trial from the data (pipelines.training.job)
    with pytest.raises(SpaceError, match="nt_pos_weight"):
        load_space(write(tmp_path, {"loss.nt_pos_weight": {"type": "choice", "values": ["always", 1.0]}}))
