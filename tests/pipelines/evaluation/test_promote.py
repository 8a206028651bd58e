"""``instalign promote``: the rule (pure), the alias moves (real sqlite registry), end to end (Ray).

The rule's tests are tables with no I/O. The alias tests use a real MLflow sqlite registry
whose versions have no model files (only the aliases are under test). The last test runs
the verb on two registered random tiny models, whose numbers nobody can predict: it checks
that the decision is the rule applied to the numbers the verb recorded, and that the
aliases, the version's description and tags and the exit status all say that decision.
"""

from __future__ import annotations

import math
import threading

import pytest

from tests.support.mlflow_store import tracking_store
from pipelines.evaluation.promote import MIN_CLASS_ACC, SLICE_NAMES, Decision, decide

BASELINES = {  # what the two trivial predictors score on a split with 23 % no-target samples
    "always empty": {"gIoU": 0.0, "cIoU": 0.0, "N_acc": 0.0, "T_acc": 100.0},
    "always no-target": {"gIoU": 22.8, "cIoU": 0.0, "N_acc": 100.0, "T_acc": 0.0},
}


def model(g: float, n: float = 70.0, t: float = 90.0, slices: dict[str, tuple[float, int]] | None = None):
    """Metrics as ``evaluate_dataset`` returns them; ``slices``: ``{slice: (gIoU, samples)}``."""
    out = {"gIoU": g, "cIoU": g, "N_acc": n, "T_acc": t}
    for name in SLICE_NAMES:
        gi, count = (slices or {}).get(name, (g, 10))
        out[f"{name}.gIoU"], out[f"{name}.samples"] = gi, count
    return out


# --- no champion: the trivial baselines alone (the quickstart's former gate) ---------------------

@pytest.mark.parametrize("metrics, promoted", [
    (model(65.0, 70.0, 90.0), True),
    (model(49.5, 0.0, 100.0), False),  # never says no-target: beats the baselines on gIoU alone, not champion
    (model(23.0, 100.0, 0.0), False),  # always says it
    (model(22.8, 80.0, 80.0), False),  # gIoU must be strictly above the best baseline
    (model(60.0, MIN_CLASS_ACC, MIN_CLASS_ACC), True),  # the floor itself passes
    (model(60.0, math.nan, 90.0), False),  # a val split without no-target samples cannot show it
    (model(math.nan), False),  # nothing measured
])
def test_without_a_champion_the_baselines_and_both_class_accuracies_decide(metrics, promoted):
    decision = decide(metrics, None, BASELINES)
    assert isinstance(decision, Decision) and decision.passed is promoted
    text = decision.text
    # The rule and this version's numbers, in words: what goes into the model version's description.
    assert "@champion only if gIoU beats every trivial baseline" in text
    assert f"N-acc and T-acc are each >= {MIN_CLASS_ACC:.0f}" in text
    assert "No champion yet: the baseline clauses alone." in text
    assert f"{metrics['gIoU']:.1f}" in text and "always no-target" in text
    assert text.endswith("promote to @champion." if promoted else "not promoted.")
    assert ("FAIL" in text) != promoted
    assert (decision.reason == "") == promoted and "\n" not in decision.reason
    assert "champion (version" not in text  # no comparison with a champion that does not exist


# --- with a champion: each clause --------------------------------------------------------------

CHAMPION = model(50.0, slices={"single": (60.0, 12), "multi": (40.0, 8), "multi_2": (42.0, 5),
                               "multi_3plus": (36.0, 3), "no_target": (70.0, 6)})


def with_slice(base: dict, name: str, giou: float, samples: int | None = None) -> dict:
    out = dict(base)
    out[f"{name}.gIoU"] = giou
    if samples is not None:
        out[f"{name}.samples"] = samples
    return out


BETTER = model(55.0, slices={"single": (66.0, 12), "multi": (41.0, 8), "multi_2": (43.0, 5),
                             "multi_3plus": (37.0, 3), "no_target": (72.0, 6)})

CASES = [
    # (id, candidate, champion, margin, tolerance, passes, the failed clause quoted in the reason)
    ("better everywhere", BETTER, CHAMPION, 0.0, 2.0, True, None),
    ("worse than the champion", model(45.0), CHAMPION, 0.0, 2.0, False, "gIoU 45.0 > champion (version 7) 50.0"),
    ("equal is not better", dict(CHAMPION), CHAMPION, 0.0, 2.0, False, "gIoU 50.0 > champion (version 7) 50.0"),
    ("beats the champion but not a baseline", model(20.0), model(10.0), 0.0, 2.0, False,
     "gIoU 20.0 > best trivial baseline (always no-target) 22.8"),
    ("beats the champion, N-acc under the floor", dict(BETTER, N_acc=49.9), CHAMPION, 0.0, 2.0, False, "N-acc 49.9"),
    ("beats the champion, T-acc under the floor", dict(BETTER, T_acc=10.0), CHAMPION, 0.0, 2.0, False, "T-acc 10.0"),
    ("inside the margin", BETTER, CHAMPION, 5.0, 2.0, False, "+ margin 5"),  # 55 is not > 50 + 5
    ("above the margin", BETTER, CHAMPION, 4.9, 2.0, True, None),
    ("one slice 2.5 points down", with_slice(BETTER, "multi_3plus", 33.5), CHAMPION, 0.0, 2.0, False,
     "multi_3plus gIoU 33.5 >= champion (version 7) 36.0 - 2"),
    ("one slice exactly the tolerance down", with_slice(BETTER, "multi_3plus", 34.0), CHAMPION, 0.0, 2.0, True, None),
    ("a wider tolerance lets the slice pass", with_slice(BETTER, "multi_3plus", 33.5), CHAMPION, 0.0, 3.0, True, None),
    ("no-target slice down", with_slice(BETTER, "no_target", 60.0), CHAMPION, 0.0, 2.0, False, "no_target gIoU 60.0"),
    ("a slice with 0 samples in the candidate is skipped", with_slice(BETTER, "multi_3plus", math.nan, 0), CHAMPION,
     0.0, 2.0, True, None),
    ("a slice with 0 samples in the champion is skipped", BETTER, with_slice(CHAMPION, "single", 99.0, 0), 0.0, 2.0,
     True, None),
    ("a slice NaN with samples fails", with_slice(BETTER, "single", math.nan), CHAMPION, 0.0, 2.0, False,
     "single gIoU nan"),
    ("a champion whose gIoU is NaN cannot be beaten", BETTER, dict(CHAMPION, gIoU=math.nan), 0.0, 2.0, False,
     "gIoU 55.0 > champion (version 7) nan"),
    ("slices not measured at all are skipped", {k: BETTER[k] for k in ("gIoU", "cIoU", "N_acc", "T_acc")},
     CHAMPION, 0.0, 2.0, True, None),
]


@pytest.mark.parametrize("candidate, champion, margin, tolerance, passes, failed",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_with_a_champion_each_clause_decides(candidate, champion, margin, tolerance, passes, failed):
    decision = decide(candidate, champion, BASELINES, margin, tolerance, champion_version=7)
    assert decision.passed is passes, decision.text
    assert "Compared with the champion (version 7)" in decision.text
    assert f"by more than {margin:g} points" in decision.text and f"more than {tolerance:g} points below" in decision.text
    if passes:
        assert decision.reason == "" and decision.text.endswith("promote to @champion.")
    else:
        assert decision.reason.startswith("failed: ") and failed in decision.reason, decision.reason
        assert decision.text.endswith("not promoted.")


def test_slices_without_samples_are_named_as_skipped():
    decision = decide(with_slice(BETTER, "multi_3plus", math.nan, 0), CHAMPION, BASELINES)
    assert "slices without samples, skipped: multi_3plus" in decision.text
    assert "multi_3plus gIoU" not in decision.text


@pytest.mark.parametrize("margin, tolerance", [(-1.0, 2.0), (0.0, -0.5), (math.nan, 2.0), (0.0, math.inf)])
def test_settings_must_be_finite_and_not_negative(margin, tolerance):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        decide(BETTER, CHAMPION, BASELINES, margin, tolerance)


def test_no_baselines_is_an_error_not_a_pass():
    with pytest.raises(ValueError, match="no trivial baselines"):
        decide(BETTER, None, {})


# --- the aliases, on a real sqlite registry ----------------------------------------------------

@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A sqlite registry and a maker of registered models with ``n`` versions (no model files)."""
    monkeypatch.setenv("INSTALIGN_CACHE", str(tmp_path / "cache"))  # the per-model lock files go here
    with tracking_store(tmp_path, "promote-tests"):
        from mlflow import MlflowClient

        client = MlflowClient()

        def make(name: str, versions: int, champion: str | None = None) -> str:
            client.create_registered_model(name)
            for _ in range(versions):
                client.create_model_version(name, source=str(tmp_path / "nothing"))
            if champion:
                client.set_registered_model_alias(name, "champion", champion)
            return name

        yield make


def test_two_concurrent_promotions_leave_exactly_one_decision(registry):
    """Both compared themselves with version 1: one moves @champion, the other is refused."""
    from pipelines.evaluation.promote import aliases, move_champion

    for round_ in range(4):
        name = registry(f"race-{round_}", versions=3, champion="1")
        start, results = threading.Barrier(2), {}

        def attempt(version: str) -> None:
            start.wait()
            results[version] = move_champion(name, version, expected="1")

        threads = [threading.Thread(target=attempt, args=(v,)) for v in ("2", "3")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        moved = [v for v, r in results.items() if r.moved]
        assert len(moved) == 1, results
        winner, loser = moved[0], ({"2", "3"} - set(moved)).pop()
        assert aliases(name) == {"champion": winner, "previous": "1"}  # the winner's decision, whole
        assert "@champion moved from version 1 to " + winner in results[loser].reason
        assert results[winner].previous == "1"


def test_a_stale_comparison_is_refused_and_changes_nothing(registry):
    from pipelines.evaluation.promote import aliases, move_champion

    name = registry("stale", versions=3, champion="2")
    move = move_champion(name, "3", expected="1")  # evaluated against version 1, but 2 serves now
    assert not move.moved and "moved from version 1 to 2" in move.reason
    assert aliases(name) == {"champion": "2"}
    first = registry("first", versions=1)
    assert not move_champion(first, "1", expected="1").moved  # a champion was expected and there is none
    assert move_champion(first, "1", expected=None).moved
    assert aliases(first) == {"champion": "1"}  # no predecessor: no @previous


def test_a_crash_between_the_two_moves_leaves_champion_where_it_was(registry, monkeypatch):
    """@previous is moved first: if the process dies before @champion moves, what serves is unchanged."""
    from pipelines.evaluation import promote
    from pipelines.evaluation.promote import aliases, move_champion

    name = registry("crash", versions=2, champion="1")
    real = promote.set_alias

    def dies_before_champion(model, version, alias):
        if alias == "champion":
            raise KeyboardInterrupt("killed between the two alias moves")
        return real(model, version, alias)

    monkeypatch.setattr(promote, "set_alias", dies_before_champion)
    with pytest.raises(KeyboardInterrupt):
        move_champion(name, "2", expected="1")
    assert aliases(name)["champion"] == "1"


# --- end to end: the verb on two registered random models (Ray) --------------------------------

def _recorded(client, version) -> dict[str, float]:
    """The exact numbers an evaluation recorded for ``version`` (its ``instalign.eval.val.run_id``)."""
    run = client.get_run(version.tags["instalign.eval.val.run_id"])
    return {k.removeprefix("val_"): v for k, v in run.data.metrics.items() if k.startswith("val_")}


@pytest.mark.ray
def test_promote_verb_decides_by_the_rule_and_moves_aliases_to_match(prepared_dataset, tmp_path, capsys):
    from mlflow import MlflowClient

    from pipelines.cli import main
    from pipelines.evaluation.evaluate import checkpoint_config
    from pipelines.evaluation.promote import aliases, baselines
    from pipelines.models.source import resolve_checkpoint
    from tests.support.tiny_checkpoint import make_checkpoint

    name = "instalign-test-promote"
    with tracking_store(tmp_path, "promote-e2e") as uri:
        for seed in (0, 1):  # versions 1 and 2: random tiny models that report instances and targets
            ckpt = make_checkpoint(tmp_path / f"ckpt{seed}", seed=seed, score_bias=3.0, no_target_bias=-1.0 + seed)
            assert main(["register", "--checkpoint", str(ckpt), "--name", name, "--alias", "candidate",
                         "--tracking-uri", uri]) == 0
        client = MlflowClient()
        cfg, text_cfg = checkpoint_config(resolve_checkpoint(f"models:/{name}/1"))
        base = baselines(str(prepared_dataset), "val", image_size=cfg.model.image_size, text_cfg=text_cfg)
        argv = ["promote", "--name", name, "--data", str(prepared_dataset), "--tracking-uri", uri,
                "--experiment", "promote-e2e", "--batch-size", "8"]

        # 1. No champion yet: the baseline clauses alone.
        capsys.readouterr()
        rc = main(argv + ["--version", "1"])
        out, err = capsys.readouterr()
        v1 = client.get_model_version(name, "1")
        expected = decide(_recorded(client, v1), None, base)
        assert rc == (0 if expected.passed else 1), (out, err)
        assert v1.description.endswith(expected.text) and v1.tags["instalign.promotion"] == expected.text
        assert ("champion" in v1.aliases) is expected.passed
        assert "previous" not in aliases(name)
        assert "single.gIoU" in v1.description and "| single.samples |" in v1.description  # the slices
        if not expected.passed:
            assert err.strip().splitlines()[-1] == f"instalign promote: models:/{name}/1 not promoted: {expected.reason}"

        # 2. Version 1 is champion: version 2 must beat it (and the baselines), measured the same way.
        client.set_registered_model_alias(name, "champion", "1")
        rc = main(argv + ["--alias", "candidate"])  # @candidate is version 2
        out, err = capsys.readouterr()
        v1, v2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
        cand, champ = _recorded(client, v2), _recorded(client, v1)
        assert cand["samples"] == champ["samples"] > 0  # the same split
        expected = decide(cand, champ, base, 0.0, 2.0, champion_version="1")
        assert rc == (0 if expected.passed else 1), (out, err)
        assert v2.description.endswith(expected.text) and v2.tags["instalign.promotion"] == expected.text
        assert "| metric | this version | champion (version 1) | always empty | always no-target |" in v2.description
        assert v2.tags["instalign.promotion.champion_version"] == "1"
        assert v2.tags["champion.metric.gIoU"] and v2.tags["metric.gIoU"]
        assert aliases(name) == ({"champion": "2", "previous": "1", "candidate": "2"} if expected.passed
                                 else {"champion": "1", "candidate": "2"})
        assert "champion v1" in out and "always no-target" in out  # the table printed side by side
        if not expected.passed:
            assert err.strip().splitlines()[-1] == f"instalign promote: models:/{name}/2 not promoted: {expected.reason}"

        # 3. Promoting the champion itself is nothing to do.
        champion_now = aliases(name)["champion"]
        assert main(argv + ["--version", champion_now]) == 0
        assert "already @champion" in capsys.readouterr().out
