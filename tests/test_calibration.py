"""milliwatt.calibration: exact binomial bounds, the Learn-then-Test threshold, the logistic scorer.

The threshold's guarantee is checked the way it is stated: over many draws of calibration
data, the chosen threshold's true error rate exceeds the target in at most about
1 - confidence of them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from milliwatt.calibration import (
    LogisticScorer,
    Threshold,
    choose_threshold,
    clopper_pearson_upper,
    fit_logistic,
    min_accepted,
)


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


# ---------------------------------------------------------------------- Clopper-Pearson


def test_clopper_pearson_matches_known_values() -> None:
    # No errors: the bound has a closed form, 1 - (1 - confidence)^(1/n).
    assert clopper_pearson_upper(0, 10) == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-12)  # 0.2589
    assert clopper_pearson_upper(0, 10) == pytest.approx(0.258866, abs=1e-6)
    assert clopper_pearson_upper(0, 3000) == pytest.approx(0.000998, abs=1e-6)  # the "rule of three"
    assert clopper_pearson_upper(0, 100, confidence=0.99) == pytest.approx(1 - 0.01 ** (1 / 100), abs=1e-12)
    # One-sided 95% exact bounds as tabulated (and checked against the binomial tail below).
    assert clopper_pearson_upper(1, 20) == pytest.approx(0.2161, abs=1e-4)
    assert clopper_pearson_upper(5, 100) == pytest.approx(0.1023, abs=1e-4)


@pytest.mark.parametrize(("k", "n", "conf"), [(1, 20, 0.95), (5, 100, 0.95), (3, 50, 0.9), (12, 400, 0.99)])
def test_clopper_pearson_is_where_the_binomial_tail_is_one_minus_confidence(k: int, n: int, conf: float) -> None:
    upper = clopper_pearson_upper(k, n, conf)
    assert _binom_cdf(k, n, upper) == pytest.approx(1 - conf, abs=1e-9)


def test_clopper_pearson_edges() -> None:
    assert clopper_pearson_upper(0, 0) == 1.0  # nothing observed: nothing known
    assert clopper_pearson_upper(7, 7) == 1.0
    with pytest.raises(ValueError):
        clopper_pearson_upper(3, 2)
    with pytest.raises(ValueError):
        clopper_pearson_upper(0, 10, confidence=1.0)


def test_min_accepted_is_the_first_count_that_can_pass_with_zero_errors() -> None:
    assert (min_accepted(0.02), min_accepted(0.05), min_accepted(0.10)) == (149, 59, 29)
    for target in (0.02, 0.05, 0.10, 0.2):
        n = min_accepted(target)
        assert clopper_pearson_upper(0, n) <= target < clopper_pearson_upper(0, n - 1)


# ---------------------------------------------------------------------- choose_threshold


def test_nothing_certified_returns_none() -> None:
    scores = np.linspace(0, 1, 100)
    # 100 right answers cannot certify 2%: 149 are needed even with no error.
    t = choose_threshold(scores, [True] * 100, target_error=0.02)
    assert t.score is None and t.accepted == 0 and t.coverage == 0.0 and t.upper == 1.0
    assert choose_threshold(scores, [False] * 100, target_error=0.10).score is None
    assert choose_threshold([], [], target_error=0.10).score is None
    # The strictest scores are wrong: the first test fails and the scan ends there.
    wrong_top = [i < 190 for i in range(200)]  # scores ascend, so the top 10 are wrong
    assert choose_threshold(np.arange(200.0), wrong_top, target_error=0.05).score is None


def test_all_right_accepts_everything() -> None:
    t = choose_threshold(np.arange(200.0), [True] * 200, target_error=0.02)
    assert (t.score, t.accepted, t.errors, t.coverage) == (0.0, 200, 0, 1.0)
    assert t.upper == pytest.approx(clopper_pearson_upper(0, 200))


def test_the_first_failure_ends_the_scan() -> None:
    # 300 examples, strictest first; only the 160th is wrong. Testing starts at 149 accepted;
    # 149..159 pass with no error, 160 fails (1 error in 160 bounds to 2.9%). 300 with that one
    # error would pass (bound 1.6%), but fixed-sequence testing never gets there.
    scores = np.arange(300.0, 0.0, -1.0)
    correct = [i != 159 for i in range(300)]
    t = choose_threshold(scores, correct, target_error=0.02)
    assert clopper_pearson_upper(1, 300) <= 0.02  # the looser threshold alone would have passed
    assert t.accepted == 159 and t.errors == 0 and t.score == scores[158]


def test_tied_scores_are_accepted_together() -> None:
    scores = [1.0] * 100 + [0.5] * 100 + [0.1] * 100
    correct = [True] * 200 + [False] * 100
    t = choose_threshold(scores, correct, target_error=0.05)
    assert t.score == 0.5 and t.accepted == 200  # never half of a tie


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        choose_threshold([0.1, 0.2], [True], target_error=0.05)
    with pytest.raises(ValueError):
        choose_threshold([0.1, float("nan")], [True, True], target_error=0.05)
    with pytest.raises(ValueError):
        choose_threshold([0.1], [True], target_error=0.0)


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores uniform on [0, 1], wrong with probability 0.4 (1 - s): the error among s >= t is
    0.2 (1 - t), so a 5% target is met exactly by t >= 0.75 (25% coverage)."""
    s = rng.random(n)
    return s, rng.random(n) >= 0.4 * (1 - s)


def test_the_bound_holds_on_held_out_data_across_seeds() -> None:
    target, confidence, seeds = 0.05, 0.95, 200
    rate_violations = held_out_violations = 0
    coverages = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        t = choose_threshold(*_draw(rng, 3000), target_error=target, confidence=confidence)
        if t.score is None:
            coverages.append(0.0)
            continue
        coverages.append(1 - t.score)
        rate_violations += 0.2 * (1 - t.score) > target  # the true error rate among accepted
        s, ok = _draw(rng, 40_000)  # fresh data from the same distribution
        accepted = s >= t.score
        held_out_violations += (~ok[accepted]).mean() > target
    # At most about 1 - confidence of the draws may miss (10 of 200 expected at worst;
    # 18 is 2.5 standard deviations above that).
    assert rate_violations <= 18
    assert held_out_violations <= 18
    # Not bought by accepting nothing: a good part of what could be kept (25%) is kept. The
    # scan stops at its first failure, and near the top few errors are allowed (none in the
    # first 59 accepted for 5%), so some draws certify nothing: the price of the guarantee.
    assert np.mean(coverages) > 0.06


def test_a_target_well_above_the_error_accepts_nearly_everything() -> None:
    # Errors 0.1 (1 - s): 5% overall, far under a 10% target.
    kept = []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        s = rng.random(1000)
        t = choose_threshold(s, rng.random(1000) >= 0.1 * (1 - s), target_error=0.10)
        kept.append(t.coverage)
    assert np.median(kept) > 0.9


# ---------------------------------------------------------------------- Threshold JSON


def test_threshold_round_trips_through_json() -> None:
    t = choose_threshold(np.arange(200.0), [True] * 200, target_error=0.02)
    assert Threshold.from_json(json.loads(json.dumps(t.to_json()))) == t
    none = Threshold(None, 0, 0, 1.0, 0.0, 0.02, 0.95)
    assert Threshold.from_json(none.to_json()) == none


@pytest.mark.parametrize("field,value", [("score", "high"), ("accepted", -1), ("errors", 1.5), ("upper", 2.0), ("confidence", None)])
def test_threshold_from_json_refuses_bad_fields(field: str, value: object) -> None:
    doc = Threshold(0.5, 10, 0, 0.1, 0.5, 0.1, 0.95).to_json()
    doc[field] = value
    with pytest.raises(ValueError, match=field):
        Threshold.from_json(doc)


# ---------------------------------------------------------------------- the scorer


def _rows(rng: np.random.Generator, n: int) -> tuple[list[dict[str, float]], list[bool]]:
    x = rng.normal(size=(n, 2)) * [1.0, 3.0] + [0.5, -1.0]
    p = 1 / (1 + np.exp(-(2 * x[:, 0] - 0.5 * x[:, 1])))
    y = rng.random(n) < p
    return [{"a": float(a), "b": float(b), "ignored": 1.0} for a, b in x], [bool(v) for v in y]


def test_fit_logistic_scores_like_sklearn_on_standardised_features() -> None:
    from sklearn.linear_model import LogisticRegression

    rows, labels = _rows(np.random.default_rng(0), 500)
    scorer = fit_logistic(rows, labels, features=["a", "b"])
    x = np.array([[r["a"], r["b"]] for r in rows])
    model = LogisticRegression(C=1.0, max_iter=1000).fit((x - x.mean(0)) / x.std(0), labels)
    expected = model.predict_proba((x - x.mean(0)) / x.std(0))[:, 1]
    assert [scorer.score(r) for r in rows] == pytest.approx(expected, abs=1e-9)
    assert scorer.features == ("a", "b")
    assert scorer.weights[0] > 0 > scorer.weights[1]  # the signs of the generating model


def test_scorer_reads_a_missing_feature_as_zero_and_ignores_extra_ones() -> None:
    scorer = LogisticScorer(("a", "b"), (1.0, -2.0), 0.5, (0.0, 1.0), (1.0, 2.0))
    z = 0.5 + 1.0 * (0.3 - 0.0) / 1.0 + -2.0 * (0.0 - 1.0) / 2.0
    assert scorer.score({"a": 0.3, "zzz": 9.0}) == pytest.approx(1 / (1 + math.exp(-z)))
    assert scorer.score({"a": -1e6}) == 0.0  # far out: no OverflowError, just the limit
    assert scorer.score({"a": 1e6}) == 1.0


def test_fit_logistic_defaults_to_every_feature_seen_and_needs_both_labels() -> None:
    rows, labels = _rows(np.random.default_rng(1), 200)
    assert fit_logistic(rows, labels).features == ("a", "b", "ignored")  # a constant feature is kept, unscaled
    with pytest.raises(ValueError, match="both"):
        fit_logistic(rows, [True] * len(rows))
    with pytest.raises(ValueError, match="length"):
        fit_logistic(rows, labels[:-1])


def test_scorer_round_trips_through_json_and_refuses_bad_files() -> None:
    rows, labels = _rows(np.random.default_rng(2), 200)
    scorer = fit_logistic(rows, labels, features=["a", "b"])
    back = LogisticScorer.from_json(json.loads(json.dumps(scorer.to_json())))
    assert back == scorer and back.score(rows[0]) == scorer.score(rows[0])
    doc = scorer.to_json()
    for field, value in (("weights", [1.0]), ("scales", [1.0, 0.0]), ("features", "a"), ("bias", None), ("means", ["x", 1])):
        bad = {**doc, field: value}
        with pytest.raises(ValueError):
            LogisticScorer.from_json(bad)


def test_importing_calibration_loads_neither_scipy_nor_sklearn() -> None:
    probe = (
        "import sys, milliwatt.calibration, milliwatt.cache.evidence;"
        "print(','.join(m for m in ('scipy', 'sklearn', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
