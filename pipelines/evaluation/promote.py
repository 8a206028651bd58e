"""``instalign promote``: ``@champion`` moves only to a version that beats what serves now.

A registered version becomes ``models:/NAME@champion`` only through :func:`promote`, which
``instalign promote`` and ``instalign quickstart`` (stage 6) both call:

1. it reads which version is ``@champion`` now (none on a new model);
2. it evaluates the candidate *and* that champion on the same prepared split with the same
   code (``pipelines.evaluation.evaluate.evaluate_dataset``, gRefCOCO metrics with the per-slice gIoU of
   ``instalign.metrics``), next to the two trivial predictors (:func:`baselines`);
3. it applies the rule, :func:`decide` (rationale: docs/promotion.md): gIoU above both
   trivial baselines, N-acc and T-acc each at least :data:`MIN_CLASS_ACC`, and — when there
   is a champion — gIoU above the champion's by more than ``margin`` points with no slice
   (single-, multi-, 2-, 3+- and no-target samples) more than ``slice_tolerance`` points
   below the champion's;
4. on a pass it moves the aliases (:func:`move_champion`): ``@previous`` to the old champion,
   then ``@champion`` to the candidate — only if ``@champion`` is still the version it was
   compared with;
5. it writes both models' numbers, the slices and the decision into the candidate version's
   description and tags (``pipelines.models.registry.annotate_version``).

Concurrency. MLflow's registry has no transaction and no compare-and-set on an alias, so
:func:`move_champion` (a) holds a per-model lock while it re-reads and moves — a local file
lock under the cache root: it serialises promotions *on one machine* only; (b) re-reads
``@champion`` under the lock and refuses if it is no longer the version the candidate was
compared with (the evaluation is then stale); (c) moves ``@previous`` first, so a crash
between the two calls leaves ``@champion`` where it was (``@previous`` then names the
champion itself); (d) reads ``@champion`` back after moving and reports a loss if another
machine moved it in between. Two promotions from different machines at the same instant can
still both pass (b): the registry then holds one of the two decisions (both compared with the
same champion, so ``@previous`` is right either way), and (d) tells the loser in most
interleavings, not all (docs/promotion.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch.utils.data import DataLoader

from instalign.cache import cache_root
from instalign.data.parquet import ParquetGRES
from instalign.data.transforms import GRESTransform
from instalign.errors import InstAlignError
from instalign.integrity import exclusive
from instalign.metrics import SLICES, GRESMetrics
from instalign.modeling.text_encoder import load_tokenizer
from pipelines.core import flags
from pipelines.evaluation.evaluate import checkpoint_config, evaluate_dataset, log_evaluation
from pipelines.models.registry import annotate_version, set_alias
from pipelines.models.source import RegistryError, configure_tracking, resolve_checkpoint

log = logging.getLogger(__name__)

#: The floor on N-acc and on T-acc (percent). Both trivial predictors score 0 on one of the
#: two; 50 asks the model to be right on at least half of each class's samples at the paper's
#: threshold (p̂_nt > 0.5) — better than a coin flip on both.
MIN_CLASS_ACC = 50.0
#: Default ``--margin``: gIoU points by which a candidate must beat the champion (strictly more).
DEFAULT_MARGIN = 0.0
#: Default ``--slice-tolerance``: how many gIoU points any one slice may fall below the champion's.
DEFAULT_SLICE_TOLERANCE = 2.0
#: The slices of ``instalign.metrics.GRESMetrics`` (``<slice>.gIoU``, ``<slice>.samples``).
SLICE_NAMES = tuple(SLICES)
CHAMPION, PREVIOUS = "champion", "previous"

Metrics = Mapping[str, Any]


# --- the rule ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concluded: ``passed``, the rule and every clause with its numbers
    (``text``, written into the version's description), and the failed clauses on one line."""

    passed: bool
    text: str
    reason: str = ""


def _num(metrics: Metrics, key: str) -> float:
    value = metrics.get(key)
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _setting(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _baseline_clauses(candidate: Metrics, baselines: Mapping[str, Metrics]) -> list[tuple[bool, str]]:
    if not baselines:
        raise ValueError("no trivial baselines were measured: the rule needs them")
    best_name, best = max(((n, _num(m, "gIoU")) for n, m in baselines.items()),
                          key=lambda kv: -math.inf if math.isnan(kv[1]) else kv[1])
    g, n, t = (_num(candidate, k) for k in ("gIoU", "N_acc", "T_acc"))
    return [  # NaN compares False: a split without one of the classes cannot show it, and fails
        (g > best, f"gIoU {g:.1f} > best trivial baseline ({best_name}) {best:.1f}"),
        (n >= MIN_CLASS_ACC, f"N-acc {n:.1f} >= {MIN_CLASS_ACC:.0f}"),
        (t >= MIN_CLASS_ACC, f"T-acc {t:.1f} >= {MIN_CLASS_ACC:.0f}"),
    ]


def _champion_clauses(candidate: Metrics, champion: Metrics, margin: float, tolerance: float,
                      label: str) -> tuple[list[tuple[bool, str]], list[str]]:
    g, h = _num(candidate, "gIoU"), _num(champion, "gIoU")
    clauses = [(g > h + margin, f"gIoU {g:.1f} > {label} {h:.1f} + margin {margin:g}")]
    skipped = []
    for name in SLICE_NAMES:
        n_cand, n_champ = _num(candidate, f"{name}.samples"), _num(champion, f"{name}.samples")
        if not (n_cand > 0 and n_champ > 0):  # 0 samples (or not measured) in either model: nothing to compare
            skipped.append(name)
            continue
        c, s = _num(candidate, f"{name}.gIoU"), _num(champion, f"{name}.gIoU")
        clauses.append((c >= s - tolerance, f"{name} gIoU {c:.1f} >= {label} {s:.1f} - {tolerance:g}"))
    return clauses, skipped


def decide(candidate: Metrics, champion: Metrics | None, baselines: Mapping[str, Metrics],
           margin: float = DEFAULT_MARGIN, slice_tolerance: float = DEFAULT_SLICE_TOLERANCE, *,
           champion_version: str | int | None = None) -> Decision:
    """Whether ``candidate`` may replace ``champion`` as ``@champion``: the rule, no I/O.

    The rule: gIoU strictly above every trivial baseline's, N-acc and T-acc each
    ``>= MIN_CLASS_ACC``; with a champion (``None``: there is none yet, the baseline clauses
    alone decide) also gIoU ``> champion gIoU + margin`` and, for every slice measured (more
    than 0 samples) in both models, slice gIoU ``>= champion's - slice_tolerance``. A NaN
    (a metric that could not be measured) fails its clause.

    Args:
        candidate, champion: ``evaluate_dataset`` results (percentages, ``<slice>.gIoU`` and
            ``<slice>.samples`` included) on the same split.
        baselines: ``{name: metrics}`` of the trivial predictors (:func:`baselines`).
        margin, slice_tolerance: gIoU points, finite and ``>= 0`` (else ``ValueError``).
        champion_version: named in the text.
    """
    margin, slice_tolerance = _setting("margin", margin), _setting("slice tolerance", slice_tolerance)
    clauses = _baseline_clauses(candidate, baselines)
    label = "champion" + (f" (version {champion_version})" if champion_version is not None else "")
    skipped: list[str] = []
    if champion is not None:
        more, skipped = _champion_clauses(candidate, champion, margin, slice_tolerance, label)
        clauses += more
    passed = all(ok for ok, _ in clauses)
    rule = (f"Promotion rule (instalign promote): @champion only if gIoU beats every trivial baseline "
            f"({', '.join(baselines)}), N-acc and T-acc are each >= {MIN_CLASS_ACC:.0f} at the paper's no-target "
            f"threshold 0.5, and gIoU beats the current champion's by more than {margin:g} points with no slice "
            f"({', '.join(SLICE_NAMES)}) more than {slice_tolerance:g} points below the champion's. ")
    rule += (f"Compared with the {label}" + (f" (slices without samples, skipped: {', '.join(skipped)})" if skipped
                                            else "") + ". " if champion is not None
             else "No champion yet: the baseline clauses alone. ")
    text = (rule + "This version: " + "; ".join(f"{'PASS' if ok else 'FAIL'} {what}" for ok, what in clauses)
            + f" -> {'promote to @champion' if passed else 'not promoted'}.")
    reason = "" if passed else "failed: " + "; ".join(what for ok, what in clauses if not ok)
    return Decision(passed, text, reason)


# --- the trivial baselines -------------------------------------------------------------------

def baselines(data_dir: str, split: str, *, image_size: int, text_cfg: Any) -> dict[str, dict[str, float]]:
    """gRefCOCO metrics of the two trivial predictors on ``split`` (the bar any model must clear).

    * always empty: an empty mask and "there is a target" for every sample;
    * always no-target: the no-target flag for every sample.

    Slices included (each sample's target count, as ``engine.evaluate`` passes it). One plain
    process, no Ray: a loop over the split's samples, no model.
    """
    transform = GRESTransform(image_size=image_size, max_tokens=text_cfg.max_tokens, tokenizer=load_tokenizer(text_cfg))
    ds = ParquetGRES(data_dir, split, transform)
    empty, no_target = GRESMetrics(), GRESMetrics()
    for batch in DataLoader(ds, batch_size=32, collate_fn=ds.collate):
        nothing = torch.zeros_like(batch.union_masks)  # (B, S, S)
        flags = torch.zeros_like(batch.no_target)  # (B,)
        targets = [m.shape[0] for m in batch.instance_masks]
        empty.update(nothing, flags, batch.union_masks, batch.no_target, targets)
        no_target.update(nothing, ~flags, batch.union_masks, batch.no_target, targets)
    return {"always empty": empty.compute(), "always no-target": no_target.compute()}


# --- the aliases -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Move:
    """What :func:`move_champion` did: ``moved``, the aliases it left, and why not if it did not."""

    moved: bool
    champion: str | None
    previous: str | None
    reason: str = ""


def aliases(name: str) -> dict[str, str]:
    """``{alias: version}`` of registered model ``name`` (``RegistryError`` if it does not exist)."""
    try:
        return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}
    except MlflowException as e:
        raise RegistryError(f"model {name!r}: {e.message}") from None


@contextlib.contextmanager
def _model_lock(name: str) -> Iterator[None]:
    """Promotions of ``name`` in this store, one at a time — on this machine (module docstring).

    A file lock under the cache root, keyed by the tracking URI's digest and the model name.
    Where no lock file can be made (a read-only cache) it goes on without one: the re-read
    under the lock and the read-back still refuse a stale or lost move.
    """
    store = hashlib.sha256(MlflowClient().tracking_uri.encode()).hexdigest()[:12]
    path = cache_root() / "locks" / "registry" / store / f"{quote(name, safe='')}.lock"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(path))
        except OSError as e:
            log.warning("promote: no lock at %s (%s); promoting without one", path, e)
        yield


def move_champion(name: str, version: str | int, *, expected: str | None) -> Move:
    """``@previous`` → the old champion, then ``@champion`` → ``version``, if ``@champion`` is
    still ``expected`` (the version the candidate was compared with; ``None``: none then).

    Refuses (``moved=False`` and the reason; nothing changed) when ``@champion`` moved since
    — the comparison no longer holds. Reports a loss when, read back after moving,
    ``@champion`` is not ``version`` (another machine moved it in the same instant).
    """
    version = str(version)
    with _model_lock(name):
        now = aliases(name)
        if now.get(CHAMPION) != expected:
            return Move(False, now.get(CHAMPION), now.get(PREVIOUS),
                        f"@champion moved from version {expected or '(none)'} to {now.get(CHAMPION) or '(none)'} "
                        f"since this promotion's evaluation began; evaluate again")
        if expected is not None:
            set_alias(name, expected, PREVIOUS)  # first: a crash before the next call leaves @champion as it was
        set_alias(name, version, CHAMPION)
        after = aliases(name)
    if after.get(CHAMPION) != version:
        return Move(False, after.get(CHAMPION), after.get(PREVIOUS),
                    f"another promotion moved @champion to version {after.get(CHAMPION)} at the same time")
    return Move(True, version, after.get(PREVIOUS))


# --- the whole promotion -----------------------------------------------------------------------

@dataclass
class Outcome:
    """A promotion: the decision, whether ``@champion`` moved, the numbers compared."""

    name: str
    version: str
    champion_version: str | None
    decision: Decision
    promoted: bool
    text: str  # the decision, plus why it was not applied if it was not: what the version records
    reason: str  # one line when not promoted
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] | None = None
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


def promote(name: str, version: str | int, data_dir: str, *, split: str = "val", margin: float = DEFAULT_MARGIN,
            slice_tolerance: float = DEFAULT_SLICE_TOLERANCE, candidate_metrics: Metrics | None = None,
            baseline_metrics: Mapping[str, Metrics] | None = None, num_workers: int = 1, batch_size: int = 16,
            address: str | None = None, metrics_source: str | None = None, experiment: str = "instalign") -> Outcome:
    """Evaluate, decide, move the aliases on a pass, record it on the version (module docstring).

    Args:
        name, version: the candidate, ``models:/name/version`` (a version, not an alias: pinned).
        data_dir, split: the prepared dataset both models are evaluated on.
        candidate_metrics, baseline_metrics: already measured on ``split`` by the caller (the
            quickstart's stages 4 and 5): not measured again. The champion always is.
        num_workers, batch_size, address: for ``evaluate_dataset``.
        experiment: where each evaluation made here is recorded as a run (as ``instalign
            evaluate`` records one; the version's tag ``instalign.eval.<split>.run_id`` names it).
    """
    version = str(version)
    _setting("margin", margin), _setting("slice tolerance", slice_tolerance)  # before minutes of evaluation
    champion_version = aliases(name).get(CHAMPION)
    if champion_version == version:  # nothing to compare, nothing to move
        return Outcome(name, version, version, Decision(False, "already @champion", "it is already @champion"),
                       False, "already @champion", "it is already @champion")

    def evaluate(v: str) -> dict[str, float]:
        started, uri = time.time(), f"models:/{name}/{v}"
        result = evaluate_dataset(uri, data_dir, split=split, metrics="gres", num_workers=num_workers,
                                  batch_size=batch_size, address=address)
        log_evaluation(result, model=uri, data_dir=data_dir, split=split, tracking_uri=mlflow.get_tracking_uri(),
                       experiment=experiment, started=started,
                       params={"num_workers": num_workers, "batch_size": batch_size,
                               "purpose": f"instalign promote of version {version}"})
        return result

    candidate = dict(candidate_metrics) if candidate_metrics is not None else evaluate(version)
    if baseline_metrics is None:
        cfg, text_cfg = checkpoint_config(resolve_checkpoint(f"models:/{name}/{version}"))
        baseline_metrics = baselines(data_dir, split, image_size=cfg.model.image_size, text_cfg=text_cfg)
    base = {k: dict(v) for k, v in baseline_metrics.items()}
    champion = evaluate(champion_version) if champion_version is not None else None
    decision = decide(candidate, champion, base, margin, slice_tolerance, champion_version=champion_version)

    promoted, text, reason = decision.passed, decision.text, decision.reason
    if decision.passed:
        move = move_champion(name, version, expected=champion_version)
        promoted, reason = move.moved, move.reason
        if not move.moved:
            text += f" Not applied: {move.reason}."
    annotate_version(name, version, metrics=candidate, baselines=base, decision=text, champion=champion,
                     champion_version=champion_version,
                     metrics_source=metrics_source or f"{split} split of {data_dir}, instalign promote")
    return Outcome(name, version, champion_version, decision, promoted, text, reason, candidate, champion, base)


def _cell(v: Any) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else f"{v:.1f}"


def comparison_table(columns: Mapping[str, Metrics]) -> str:
    """The models side by side: the overall metrics, then each slice's gIoU (and samples)."""
    rows = [(k, k) for k in ("gIoU", "cIoU", "N_acc", "T_acc", "nt_AUROC")]
    rows += [(f"{s} gIoU", f"{s}.gIoU") for s in SLICE_NAMES]
    width = max(12, *(len(c) + 2 for c in columns))
    lines = [f"{'':<20}" + "".join(f"{c:>{width}}" for c in columns)]
    for label, key in rows:
        cells = []
        for m in columns.values():
            n = m.get(key.replace(".gIoU", ".samples")) if key.endswith(".gIoU") else None
            cells.append(_cell(m.get(key)) + (f" ({int(n)})" if n is not None and n == n else ""))
        lines.append(f"{label:<20}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="registered model name")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="the candidate version")
    which.add_argument("--alias", help="the candidate by alias (e.g. candidate), pinned to its version at the start")
    parser.add_argument("--data", required=True, metavar="PARQUET_DIR", help="a dataset written by `instalign prepare`")
    parser.add_argument("--split", default="val", help="split both models are evaluated on (default: val)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="gIoU points by which the candidate must beat the champion (strictly more; default 0)")
    parser.add_argument("--slice-tolerance", type=float, default=DEFAULT_SLICE_TOLERANCE,
                        help="gIoU points any slice may fall below the champion's (default 2)")
    parser.add_argument("--num-workers", type=int, default=1, help="model replicas for each evaluation (Ray actors)")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per forward pass")
    flags.add_address(parser)
    flags.add_tracking(parser, experiment="instalign")  # --experiment: where the evaluations are recorded


def _candidate_version(name: str, version: str | None, alias: str | None) -> str:
    if version is not None:
        return str(version)
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        raise RegistryError(f"models:/{name}@{alias}: {e.message}") from None


def run(args: argparse.Namespace) -> int:
    # A per-file progress bar for each of the two models' downloads would bury the decision.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    configure_tracking(args.tracking_uri)
    version = _candidate_version(args.name, args.version, args.alias)
    out = promote(args.name, version, args.data, split=args.split, margin=args.margin,
                  slice_tolerance=args.slice_tolerance, num_workers=args.num_workers, batch_size=args.batch_size,
                  address=args.address, experiment=args.experiment)
    columns = {f"candidate v{out.version}": out.candidate}
    if out.champion is not None:
        columns[f"champion v{out.champion_version}"] = out.champion
    if out.champion_version == out.version:
        print(f"models:/{out.name}/{out.version} is already @champion: nothing to do")
        return 0
    print(comparison_table({**columns, **out.baselines}))
    print(out.text)
    if not out.promoted:
        raise InstAlignError(f"models:/{out.name}/{out.version} not promoted: {out.reason}")
    print(f"models:/{out.name}@champion -> version {out.version}"
          + (f" (@previous -> version {out.champion_version})" if out.champion_version else ""))
    return 0
