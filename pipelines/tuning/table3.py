"""The paper's Table 3 as a report: a ``search: rows`` search, its rows grouped by factor, each
row's gIoU / cIoU / N-acc as mean ± std over its seeds and Δ to the reference row.

``instalign tune --space tune_spaces/ablations.yaml --seeds K`` runs every row K times
(``train.seed`` = base, base+1, …; ``pipelines.tuning.space.SearchSpace.with_seeds``).
When the search ends, :func:`write_table3` reads the trials back **from MLflow alone** — each
trial's child run carries its row (tag ``instalign.tune.params``), its seed (param
``train.seed``), its outcome (tag ``instalign.tune.status``) and its validation metrics — and
writes into the report folder and the parent run:

* ``table3.md`` — the table as the paper prints it, rows grouped by the space's ``group``;
* ``table3.csv`` — the same numbers, one line a row, for a spreadsheet or pandas;
* ``table3_trials.csv`` — one line a trial (row, seed, status, metrics, MLflow run), the inputs;
* ``table3_gIoU.png`` — horizontal bars of each row's mean gIoU with ± std error bars.

What a cell means. A trial's value is its **final** validation (the last epoch it ran,
MLflow's latest value), not its best epoch: picking the best epoch on the validation set and
reporting that set would flatter every row. Only ``completed`` trials count — a row stopped
early (ASHA) or errored is not the row — and the ``trials`` column says how many of the K did.
The ± is the sample standard deviation (``ddof=1``) over those trials, ``n/a`` with one. Δ is the
row's mean minus the reference row's mean (the space's ``reference``; none: no Δ).

:func:`table3_from_mlflow` recomputes all of it from a tracking store and a parent run id:
the space file and base config come from the parent run's ``search/`` artifacts.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from pipelines.tuning.space import ROW_KEY, SEED_KEY, RowSpec, SearchSpace, row_name

#: The MLflow metric of each column, and the column's name (Table 3's three).
COLUMNS = (("val_gIoU", "gIoU"), ("val_cIoU", "cIoU"), ("val_N_acc", "N-acc"))
#: The factor shown for a reference row that names none.
REFERENCE_GROUP = "reference"
PARAMS_TAG, STATUS_TAG = "instalign.tune.params", "instalign.tune.status"


@dataclass(frozen=True)
class TrialScore:
    """One trial as MLflow holds it: its row, seed, outcome and final validation metrics."""

    row: str
    seed: int
    status: str  # completed | stopped_early | error | unfinished (``report.CHILD_STATUS``)
    metrics: dict[str, float]
    run_id: str = ""


@dataclass(frozen=True)
class Cell:
    """A row's statistic of one metric over its completed trials."""

    mean: float  # NaN: no completed trial
    std: Optional[float]  # None: fewer than two trials
    delta: Optional[float]  # mean − reference mean; None: no reference (or no value)


@dataclass(frozen=True)
class Table3Row:
    name: str
    group: str
    setting: str  # the row's overrides, ``key=value, …`` ("base config" for none)
    is_reference: bool
    seeds: tuple[int, ...]  # of its completed trials
    trials: int  # all of its trials, whatever their outcome
    cells: dict[str, Cell]  # by column name (``COLUMNS``)


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof=1): ``(nan, None)`` for none, ``(v, None)`` for one."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def ordered_rows(rows: list[RowSpec], reference: Optional[str]) -> list[tuple[str, RowSpec]]:
    """``(group, row)`` in report order: the reference first, then groups by first appearance."""
    groups: dict[str, list[RowSpec]] = {}
    for row in rows:
        if row.name != reference:
            groups.setdefault(row.group or "", []).append(row)
    first = [(_group_of(r, reference), r) for r in rows if r.name == reference]
    return first + [(g, r) for g, members in groups.items() for r in members]


def _group_of(row: RowSpec, reference: Optional[str]) -> str:
    return row.group or (REFERENCE_GROUP if row.name == reference else "")


def build_table(trials: Iterable[TrialScore], rows: list[RowSpec], reference: Optional[str]) -> list[Table3Row]:
    """Table 3's rows from the trials (module docstring: what counts, ± and Δ)."""
    trials = list(trials)
    done = {r.name: [t for t in trials if t.row == r.name and t.status == "completed"] for r in rows}
    stats = {name: {col: mean_std([t.metrics[m] for t in ts if math.isfinite(t.metrics.get(m, math.nan))])
                    for m, col in COLUMNS} for name, ts in done.items()}
    ref = stats.get(reference) if reference else None
    table = []
    for group, row in ordered_rows(rows, reference):
        cells = {}
        for _, col in COLUMNS:
            mean, std = stats[row.name][col]
            delta = None if ref is None or math.isnan(mean) or math.isnan(ref[col][0]) else mean - ref[col][0]
            cells[col] = Cell(mean, std, delta)
        setting = ", ".join(f"{k}={v}" for k, v in sorted(row.values.items())) or "base config"
        table.append(Table3Row(row.name, group, setting, row.name == reference,
                               tuple(sorted(t.seed for t in done[row.name])),
                               sum(t.row == row.name for t in trials), cells))
    return table


def fmt_cell(cell: Cell) -> str:
    """``31.20 ± 1.40``; ``31.20 ± n/a`` from one trial; ``—`` from none."""
    if math.isnan(cell.mean):
        return "—"
    return f"{cell.mean:.2f} ± " + ("n/a" if cell.std is None else f"{cell.std:.2f}")


def fmt_delta(cell: Cell, is_reference: bool) -> str:
    if is_reference:
        return "ref"
    return "—" if cell.delta is None else f"{cell.delta:+.2f}"


def seeds_of(trials: Iterable[TrialScore]) -> list[int]:
    return sorted({t.seed for t in trials})


def to_markdown(table: list[Table3Row], *, title: str, seeds: list[int], reference: Optional[str]) -> str:
    """Table 3 in Markdown: the factor printed on its group's first row, as the paper does."""
    k = len(seeds)
    lines = [f"# Table 3: {title}", "",
             f"{k} seed{'s' if k != 1 else ''} a row (train.seed {', '.join(map(str, seeds)) or '—'}). Each cell is "
             "the mean ± sample standard deviation (ddof=1) over the row's completed trials of the final "
             "validation epoch; `n/a`: one trial, no spread. "
             + (f"Δ = the row's mean − the mean of the reference row `{reference}`."
                if reference else "No reference row: no Δ."),
             "", "| factor | row | setting | trials | " + " | ".join(f"{c} | Δ {c}" for _, c in COLUMNS) + " |",
             "|" + " --- |" * (4 + 2 * len(COLUMNS))]
    shown = None
    for r in table:
        group = r.group if r.group != shown else ""
        shown = r.group
        cells = " | ".join(f"{fmt_cell(r.cells[c])} | {fmt_delta(r.cells[c], r.is_reference)}" for _, c in COLUMNS)
        lines.append(f"| {group} | {r.name}{' (ref)' if r.is_reference else ''} | {r.setting} | "
                     f"{len(r.seeds)}/{r.trials} | {cells} |")
    short = [r.name for r in table if len(r.seeds) < k]
    if short:
        lines += ["", f"Rows with fewer than {k} completed trials (stopped early, errored or unfinished): "
                  + ", ".join(short) + "."]
    return "\n".join(lines) + "\n"


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else repr(round(value, 6))


def write_csv(table: list[Table3Row], path: Path) -> Path:
    """One line a row: ``<col>_mean``, ``<col>_std`` (``n/a`` under two trials), ``<col>_delta``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "row", "setting", "reference", "completed", "trials", "seeds",
                    *(f"{c}_{s}" for _, c in COLUMNS for s in ("mean", "std", "delta"))])
        for r in table:
            w.writerow([r.group, r.name, r.setting, r.is_reference, len(r.seeds), r.trials,
                        " ".join(map(str, r.seeds)),
                        *(_num(v) for _, c in COLUMNS for v in (r.cells[c].mean, r.cells[c].std, r.cells[c].delta))])
    return path


def write_trials_csv(trials: list[TrialScore], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", "status", *(m for m, _ in COLUMNS), "mlflow_run_id"])
        for t in sorted(trials, key=lambda t: (t.row, t.seed, t.run_id)):
            w.writerow([t.row, t.seed, t.status, *(_num(t.metrics.get(m)) for m, _ in COLUMNS), t.run_id])
    return path


def plot_table3(table: list[Table3Row], path: Path, *, title: str, column: str = "gIoU") -> Path:
    """Horizontal bars of ``column``'s mean per row (± std as error bars), one colour a factor,
    a gap between factors, and the reference's mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in table))
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    ys, y, previous = [], 0.0, None
    for r in table:
        y += 1.6 if previous is not None and r.group != previous else 1.0
        ys.append(-y)
        previous = r.group
    fig, ax = plt.subplots(figsize=(9.5, 1.2 + 0.38 * len(table)))
    for group in groups:  # one call a factor: one colour and one legend entry each
        members = [(r, yy) for r, yy in zip(table, ys) if r.group == group]
        ax.barh([yy for _, yy in members], [0.0 if math.isnan(r.cells[column].mean) else r.cells[column].mean
                                            for r, _ in members],
                xerr=[r.cells[column].std or 0.0 for r, _ in members], capsize=3, color=colours[group],
                label=group or "rows")
    ax.set_yticks(ys, [f"{r.name} ({len(r.seeds)})" for r in table])
    ref = next((r for r in table if r.is_reference and not math.isnan(r.cells[column].mean)), None)
    if ref is not None:
        ax.axvline(ref.cells[column].mean, linestyle="--", color="0.3", linewidth=1)
    ax.set_xlabel(f"val {column} (mean ± std over seeds; (n) completed trials)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- from MLflow ----------------------------------------------------------------------------

def collect_trials(client: Any, parent_run_id: str) -> list[TrialScore]:
    """Every trial of a rows search from its MLflow child runs (module docstring)."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=50000)
    trials = []
    for child in children:
        params = json.loads(child.data.tags.get(PARAMS_TAG) or "{}")
        if ROW_KEY not in params:
            continue  # not a rows trial
        seed = child.data.params.get(SEED_KEY, params.get(SEED_KEY, 0))
        trials.append(TrialScore(row=row_name(params[ROW_KEY]), seed=int(seed),
                                 status=child.data.tags.get(STATUS_TAG, "unfinished"),
                                 metrics={m: float(child.data.metrics[m]) for m, _ in COLUMNS
                                          if m in child.data.metrics},
                                 run_id=child.info.run_id))
    return trials


def write_table3(client: Any, parent_run_id: str, space: SearchSpace, out_dir: Path) -> list[Path]:
    """The report's four files in ``out_dir`` (module docstring), from MLflow; returns their paths."""
    trials = collect_trials(client, parent_run_id)
    table = build_table(trials, space.rows, space.reference)
    title = Path(space.path).name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "table3.md"
    md.write_text(to_markdown(table, title=title, seeds=seeds_of(trials), reference=space.reference))
    return [md, write_csv(table, out_dir / "table3.csv"), write_trials_csv(trials, out_dir / "table3_trials.csv"),
            plot_table3(table, out_dir / "table3_gIoU.png", title=f"Table 3: {title}")]


def table3_from_mlflow(tracking_uri: str, parent_run_id: str, out_dir: Path) -> list[Path]:
    """Recompute the report of a finished search from its tracking store alone."""
    import tempfile

    from mlflow import MlflowClient

    from instalign.config import load_config
    from pipelines.tuning.space import load_space

    client = MlflowClient(tracking_uri=tracking_uri)
    space_name = Path(client.get_run(parent_run_id).data.params["tune.space"]).name
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(client.download_artifacts(parent_run_id, "search/base_config.yaml", tmp))
        space = load_space(client.download_artifacts(parent_run_id, f"search/{space_name}", tmp), base)
        space.path = space_name
        return write_table3(client, parent_run_id, space, out_dir)
