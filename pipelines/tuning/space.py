"""Search spaces for ``instalign tune``: YAML files in ``tune_spaces/``, validated on load.

A space file::

    base: paper            # preset or config YAML the trials start from
    search: random         # random | grid | optuna
    params:
      loss.merged_weight: {type: loguniform, low: 1.25, high: 20.0}
      model.num_queries:  {type: grid, values: [20, 50, 100, 200]}

Keys are dotted paths of ``instalign.config.Config``; every sampled value is checked by
building the config it would produce, so a bad key, range or switch value fails here, with
the file and the key named, before any trial starts.

``search: rows`` lists the trials themselves instead of a product of values — an ablation
table that changes one factor at a time from a reference (the paper's Table 3)::

    base: paper
    search: rows
    rows:                                   # one trial per row: overrides of the base
      full: {}
      a_vanilla: {loss.instance_supervision: vanilla}
      e_mask2former: {model.decoder: mask2former}

It becomes one grid parameter, ``row``, whose values are self-describing labels
(``"a_vanilla | loss.instance_supervision=vanilla"``): :func:`trial_config` expands a label
back into its values (:func:`row_values`), so a trial needs nothing but the label Tune hands it.

For the Table 3 report (``pipelines.tuning.table3``) a row may name its factor with the
reserved key ``group`` (config keys are dotted, so it cannot clash): once one row does, every
row but the reference must. The reference row — the one every Δ is measured from — is the
top-level ``reference: NAME``, else the row with no overrides (the base itself)::

    reference: full
    rows:
      full: {}
      a_vanilla: {group: instance supervision, loss.instance_supervision: vanilla}

:meth:`SearchSpace.with_seeds` runs every row ``K`` times with ``train.seed`` = base, base+1, …
(``instalign tune --seeds K``): a second grid parameter beside ``row``.

Sampled values stay values: :func:`trial_config` sets Tune's typed samples (a float loss
weight, an int query count, a switch's string) into the base config's tree and validates
the result once — no detour through override text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from instalign.config import PRESETS, Config, ConfigError
from instalign.errors import InstAlignError

DISTRIBUTIONS = {"uniform", "loguniform", "randint", "choice", "grid"}
SEARCHES = {"random", "grid", "optuna", "rows"}
#: The one parameter of a ``search: rows`` space, and how its labels are written.
ROW_KEY = "row"
_ROW_NAME_SEP, _ROW_ITEM_SEP = " | ", ", "
#: A row's factor (Table 3's groups); not a config key.
GROUP_KEY = "group"
#: What ``--seeds`` varies across a row's trials (``instalign.config.TrainConfig.seed``).
SEED_KEY = "train.seed"


class SpaceError(InstAlignError, ValueError):
    """A search-space file is invalid; the message names the file and the key."""


@dataclass
class Param:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    values: list[Any] = field(default_factory=list)

    def candidates(self) -> list[Any]:
        """Values that stand for the whole range in validation (ends, or every listed value)."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


@dataclass(frozen=True)
class RowSpec:
    """One row of a ``search: rows`` space: its trial's overrides and its Table 3 factor."""

    name: str
    label: str  # the value of the ``row`` parameter (module docstring)
    values: dict[str, Any]
    group: Optional[str] = None


@dataclass
class SearchSpace:
    path: str
    base: str
    search: str
    params: list[Param]
    rows: list[RowSpec] = field(default_factory=list)  # search=rows only, in file order
    reference: Optional[str] = None  # the row Table 3's Δ is measured from

    def with_seeds(self, seeds: int, first: int) -> "SearchSpace":
        """This rows space with every row run ``seeds`` times, ``train.seed`` = first, first+1, …

        Only for ``search: rows``: a grid already repeats with ``--num-samples`` and a random
        search draws new values; a seed replicate is what a table of rows needs for its ±.
        """
        if self.search != "rows":
            raise SpaceError(f"{self.path}: --seeds replicates the rows of a search=rows space (Table 3); "
                             f"this space is search={self.search}")
        if seeds < 1:
            raise SpaceError(f"{self.path}: --seeds must be >= 1, got {seeds}")
        for row in self.rows:
            if SEED_KEY in row.values:
                raise SpaceError(f"{self.path}: rows.{row.name} sets {SEED_KEY}, which --seeds sets per trial")
        return replace(self, params=[*self.params, Param(SEED_KEY, "grid", values=list(range(first, first + seeds)))])

    @property
    def is_grid(self) -> bool:
        return any(p.type == "grid" for p in self.params)

    def grid_size(self) -> int:
        n = 1
        for p in self.params:
            if p.type == "grid":
                n *= len(p.values)
        return n

    def to_param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space`` (dotted key → domain), for the random and grid searches."""
        from ray import tune

        space: dict[str, Any] = {}
        for p in self.params:
            if p.type == "uniform":
                space[p.key] = tune.uniform(p.low, p.high)
            elif p.type == "loguniform":
                space[p.key] = tune.loguniform(p.low, p.high)
            elif p.type == "randint":
                space[p.key] = tune.randint(int(p.low), int(p.high))
            elif p.type == "choice":
                space[p.key] = tune.choice(p.values)
            else:
                space[p.key] = tune.grid_search(p.values)
        return space


def load_space(path: str | Path, base_config: Config | None = None) -> SearchSpace:
    """Read and validate a space file against ``base_config`` (or the file's ``base`` preset)."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SpaceError(f"{where}: no such search-space file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: expected a mapping with 'params'")
    unknown = sorted(set(data) - {"base", "search", "params", "rows", "reference"})
    if unknown:
        raise SpaceError(f"{where}: unknown top-level key(s) {unknown}; expected base, search, params "
                         "(or rows and reference)")
    base = str(data.get("base", "paper"))
    search = str(data.get("search", "random"))
    if search not in SEARCHES:
        raise SpaceError(f"{where}: search={search!r}; expected one of {sorted(SEARCHES)}")
    if base_config is None:
        if base not in PRESETS:
            raise SpaceError(f"{where}: base={base!r} is not a preset ({sorted(PRESETS)}); pass --config")
        base_config = PRESETS[base]()
    if "reference" in data and search != "rows":
        raise SpaceError(f"{where}: 'reference' names a row of a search=rows space; this one is search={search}")
    if search == "rows" or "rows" in data:
        return _load_rows(where, base, search, data, base_config)
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{where}: 'params' must be a non-empty mapping of dotted config keys")
    valid_keys = set(base_config.flat())
    params = [_parse_param(where, key, spec, valid_keys) for key, spec in raw.items()]
    if search == "grid" and not all(p.type == "grid" for p in params):
        raise SpaceError(f"{where}: search=grid needs every param of type grid")
    if search == "optuna" and any(p.type == "grid" for p in params):
        raise SpaceError(f"{where}: search=optuna cannot take grid params; use choice")
    for p in params:  # each candidate value must build a valid config
        for value in p.candidates():
            try:
                trial_config(base_config, {p.key: value})
            except ConfigError as e:
                raise SpaceError(f"{where}: {p.key}={value!r} is not a valid config value: {e}") from None
    return SearchSpace(path=where, base=base, search=search, params=params)


def _load_rows(where: str, base: str, search: str, data: dict, base_config: Config) -> SearchSpace:
    """A ``search: rows`` space: every row a trial (module docstring)."""
    if search != "rows" or "params" in data:
        raise SpaceError(f"{where}: 'rows' goes with search=rows and no 'params'")
    rows = data.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise SpaceError(f"{where}: 'rows' must be a non-empty mapping of row name -> overrides")
    valid_keys = set(base_config.flat())
    specs, seen = [], {}
    for name, values in rows.items():
        at = f"{where}: rows.{name}"
        if not isinstance(name, str) or not name or "|" in name or "," in name:
            raise SpaceError(f"{at}: a row name must be a non-empty string without '|' or ','")
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise SpaceError(f"{at}: expected a mapping of dotted config keys to values ({{}} for the base itself)")
        values = dict(values)
        group = values.pop(GROUP_KEY, None)
        if group is not None and (not isinstance(group, str) or not group.strip()):
            raise SpaceError(f"{at}.{GROUP_KEY}: a row's factor must be a non-empty string, got {group!r}")
        for key, value in values.items():
            if key not in valid_keys:
                raise SpaceError(f"{at}.{key}: unknown config key (see `instalign.config.Config().flat()`)")
            if isinstance(value, (dict, list)):
                raise SpaceError(f"{at}.{key}: a row sets plain values, got {value!r}")
        try:
            trial_config(base_config, values)
        except ConfigError as e:
            raise SpaceError(f"{at}: not a valid config: {e}") from None
        items = tuple(f"{k}={yaml_value(v)}" for k, v in sorted(values.items()))
        if items in seen:
            raise SpaceError(f"{at}: the same trial as row {seen[items]!r}")
        seen[items] = name
        specs.append(RowSpec(name, name + _ROW_NAME_SEP + _ROW_ITEM_SEP.join(items), values, group))
    reference = _reference_row(where, data, specs, seen.get(()))
    return SearchSpace(path=where, base=base, search=search, params=[Param(ROW_KEY, "grid", values=[
        s.label for s in specs])], rows=specs, reference=reference)


def _reference_row(where: str, data: dict, specs: list[RowSpec], base_row: Optional[str]) -> Optional[str]:
    """The row Table 3's Δ is measured from (module docstring); checks that groups are all or none."""
    names = [s.name for s in specs]
    reference = data.get("reference", base_row)
    if "reference" in data and reference not in names:
        raise SpaceError(f"{where}: reference={reference!r} is not a row; the rows are {names}")
    if any(s.group for s in specs):
        for s in specs:
            if s.group is None and s.name != reference:
                raise SpaceError(f"{where}: rows.{s.name}: no '{GROUP_KEY}' (its Table 3 factor); once one row "
                                 "names a group, every row but the reference must")
    return reference


def row_name(label: str) -> str:
    """The row name a ``search: rows`` label starts with."""
    return label.partition(_ROW_NAME_SEP)[0]


def row_values(label: str) -> dict[str, Any]:
    """The dotted keys and values a ``search: rows`` label stands for (``"full | "`` → ``{}``)."""
    _, sep, items = label.partition(_ROW_NAME_SEP)
    if not sep:
        raise SpaceError(f"row label {label!r}: expected 'name{_ROW_NAME_SEP}key=value{_ROW_ITEM_SEP}...'")
    out = {}
    for item in filter(None, items.split(_ROW_ITEM_SEP)):
        key, _, text = item.partition("=")
        out[key] = yaml.safe_load(text)
    return out


def _parse_param(where: str, key: str, spec: Any, valid_keys: set[str]) -> Param:
    at = f"{where}: params.{key}"
    if key not in valid_keys:
        raise SpaceError(f"{at}: unknown config key (see `instalign.config.Config().flat()`)")
    if not isinstance(spec, dict) or "type" not in spec:
        raise SpaceError(f"{at}: expected {{type: ..., ...}}")
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{at}: type={kind!r}; expected one of {sorted(DISTRIBUTIONS)}")
    extra = sorted(set(spec) - ({"type", "values"} if kind in ("choice", "grid") else {"type", "low", "high"}))
    if extra:
        raise SpaceError(f"{at}: unexpected field(s) {extra} for type {kind}")
    if kind in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{at}: 'values' must be a non-empty list")
        return Param(key, kind, values=values)
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise SpaceError(f"{at}: 'low' and 'high' must be numbers")
    if not low < high:
        raise SpaceError(f"{at}: low={low} must be < high={high}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{at}: loguniform needs low > 0")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise SpaceError(f"{at}: randint bounds must be integers")
    return Param(key, kind, low=float(low) if kind != "randint" else int(low),
                 high=float(high) if kind != "randint" else int(high))


def trial_config(base: Config, params: Mapping[str, Any]) -> Config:
    """``base`` with a trial's sampled dotted keys set to their values, validated once.

    The values are set into the base's tree as they are (``Config.from_dict`` widens an int
    to a float field and checks every type and range); keys must name existing leaves, or
    new keys inside the free-form mappings (``backbone.kwargs``, ``text_encoder.config_overrides``).

    Raises:
        ConfigError: an unknown key or a value the config refuses.
    """
    if ROW_KEY in params:  # a ``search: rows`` trial: its label stands for its values
        params = {**{k: v for k, v in params.items() if k != ROW_KEY}, **row_values(params[ROW_KEY])}
    data = base.to_dict()
    for key, value in sorted(params.items()):
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{key}: unknown config key")
            node = node[part]
        free = len(parts) >= 2 and parts[-2] in ("kwargs", "config_overrides")
        if not isinstance(node, dict) or (parts[-1] not in node and not free):
            raise ConfigError(f"{key}: unknown config key")
        node[parts[-1]] = value
    return Config.from_dict(data, source="trial config")


def yaml_value(value: Any) -> str:
    """``value`` as the YAML text an override carries, read back as exactly ``value``.

    Not JSON: YAML 1.1 reads JSON's ``1e-05`` as a *string* (a float needs a dot there), so a
    small learning rate would not survive the round trip; PyYAML writes ``1.0e-05``.
    """
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return text[:-len("\n...\n")] if text.endswith("\n...\n") else text.strip()


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """A sampled Tune config (dotted key → value; a rows label under ``row``) as ``key=value`` overrides."""
    if ROW_KEY in params:
        params = {**{k: v for k, v in params.items() if k != ROW_KEY}, **row_values(params[ROW_KEY])}
    return [f"{k}={yaml_value(v)}" for k, v in sorted(params.items())]
