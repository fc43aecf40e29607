"""Calibrated accept gates: pick a score threshold whose error rate is certified, not guessed.

A cheap tier (the semantic cache, the local model) answers only when a score says its answer
is probably right. A fixed threshold on that score bounds nothing: how often an accepted
answer is wrong depends on the traffic (vCache, 2025, shows no single cosine threshold holds
an error rate across workloads). This module turns labelled examples (a score per example
and whether the answer was right) into a threshold with a stated guarantee:

    with probability at least ``confidence`` over the draw of the calibration examples, the
    error rate among accepted future examples (score >= threshold) is at most ``target_error``,

provided calibration and future examples are exchangeable (drawn from the same distribution,
e.g. a random split of the same traffic). The procedure is Learn-then-Test (Angelopoulos,
Bates, Candès, Jordan, Lei, 2021): each candidate threshold is a hypothesis test with an
exact binomial (Clopper-Pearson) p-value, and the thresholds are tested in an order fixed
before looking at the labels, so scanning many thresholds does not inflate the error.

Nothing here is specific to the cache: scores and correct flags in, a threshold out. The
scorer (``fit_logistic``) turns a row of named features into one score. scipy and sklearn
are imported inside the functions that fit, so ``import milliwatt`` and serving a fitted
gate stay light (pure Python at lookup time).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, MilliwattError

DEFAULT_CONFIDENCE = 0.95


class CalibrationError(MilliwattError, ValueError):
    """A ledger holds too little to calibrate on (the calibrate commands exit 2 with it)."""


def clopper_pearson_upper(errors: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Exact one-sided upper confidence bound on an error rate after ``errors`` in ``n`` trials.

    The smallest p with P(Binomial(n, p) <= errors) <= 1 - confidence, i.e. the
    ``confidence`` quantile of Beta(errors + 1, n - errors). With no trials nothing is known: 1.0.
    """
    if n < 0 or errors < 0 or errors > n:
        raise ValueError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0 or errors == n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, errors + 1, n - errors))


def clopper_pearson_lower(errors: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Exact one-sided lower confidence bound on an error rate after ``errors`` in ``n`` trials:
    the error rate is at least this, with probability ``confidence``. No errors: 0.0."""
    if n < 0 or errors < 0 or errors > n:
        raise ValueError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if errors == 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(1 - confidence, errors, n - errors + 1))


def min_accepted(target_error: float, confidence: float = DEFAULT_CONFIDENCE) -> int:
    """The fewest accepted examples whose bound can reach ``target_error`` at all (zero errors).

    With zero errors the bound is 1 - (1 - confidence)^(1/n); e.g. 149 examples for 2% at 95%.
    """
    _check_target(target_error, confidence)
    n = max(1, math.ceil(math.log(1 - confidence) / math.log(1 - target_error)))
    # Floating point can land one off either way; settle it with the exact bound.
    while n > 1 and clopper_pearson_upper(0, n - 1, confidence) <= target_error:
        n -= 1
    while clopper_pearson_upper(0, n, confidence) > target_error:
        n += 1
    return n


@dataclass(frozen=True)
class Threshold:
    """A certified threshold: accept when score >= ``score``; ``score`` None accepts nothing.

    ``accepted``/``errors`` are the calibration examples at or above it and the wrong ones among
    them, ``upper`` their Clopper-Pearson bound, ``coverage`` the share of calibration examples
    accepted.
    """

    score: float | None
    accepted: int
    errors: int
    upper: float
    coverage: float
    target_error: float
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Threshold:
        """Read ``to_json``'s output back; a missing or mistyped field raises ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"threshold must be an object, got {type(data).__name__}")
        score = data.get("score")
        if score is not None and not _is_number(score):
            raise ValueError(f"threshold.score must be a number or null, got {score!r}")
        for name in ("accepted", "errors"):
            if not isinstance(data.get(name), int) or isinstance(data.get(name), bool) or data[name] < 0:
                raise ValueError(f"threshold.{name} must be an integer >= 0, got {data.get(name)!r}")
        for name in ("upper", "coverage", "target_error", "confidence"):
            if not _is_number(data.get(name)) or not 0 <= data[name] <= 1:
                raise ValueError(f"threshold.{name} must be a number in [0, 1], got {data.get(name)!r}")
        return cls(
            score=None if score is None else float(score),
            accepted=data["accepted"],
            errors=data["errors"],
            upper=float(data["upper"]),
            coverage=float(data["coverage"]),
            target_error=float(data["target_error"]),
            confidence=float(data["confidence"]),
        )


def choose_threshold(
    scores: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    *,
    target_error: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Threshold:
    """The loosest threshold (most accepted) whose error among accepted is certified.

    Guarantee: if the calibration examples and future examples are exchangeable (e.g. i.i.d.
    from the same traffic), then with probability >= ``confidence`` over the calibration draw,
    the chosen threshold's true error rate among accepted examples, P(wrong | score >= t), is
    <= ``target_error``. It bounds the rate, not each finite sample's share: a held-out sample
    of accepted examples scatters around a rate that is usually well below the target.

    Procedure (Learn-then-Test with fixed-sequence testing): the candidates are the distinct
    calibration scores, strictest first. Their order depends on the scores only, never on the
    labels, which is what makes testing them in sequence valid without a multiplicity
    correction. For candidate t the null hypothesis "error rate among score >= t exceeds
    target_error" is rejected when the Clopper-Pearson upper bound of its errors is
    <= target_error (the exact binomial test at level 1 - confidence). Testing starts at the
    strictest candidate that accepts at least ``min_accepted`` examples (fewer could not pass
    even with zero errors; skipping them is also decided by counts alone) and stops at the first
    candidate that fails; the loosest rejected one is returned. The family-wise error of the
    whole scan is then <= 1 - confidence.

    Stopping at the first failure is what pays for the guarantee: a noisy stretch of errors
    can end the scan early and cost coverage, never validity. Returns ``score=None`` (accept
    nothing) when not even the first candidate passes or there are too few examples.
    """
    _check_target(target_error, confidence)
    s = np.asarray(scores, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    if s.shape != ok.shape or s.ndim != 1:
        raise ValueError(f"scores and correct must be 1-D and of one length, got {s.shape} and {ok.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_total = len(s)
    order = np.argsort(-s, kind="stable")
    s_sorted, wrong_sorted = s[order], ~ok[order]
    wrong_cum = np.cumsum(wrong_sorted)
    # Each distinct score is a candidate; it accepts everything up to its last tie.
    last_of_tie = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True]) if n_total else np.array([], dtype=int)
    need = min_accepted(target_error, confidence)
    ends = last_of_tie[last_of_tie + 1 >= need]  # fewer accepted could not pass even with zero errors
    if not len(ends):
        return Threshold(None, 0, 0, 1.0, 0.0, target_error, confidence)
    accepted = ends + 1
    errors = wrong_cum[ends]
    uppers = _clopper_pearson_uppers(errors, accepted, confidence)
    failed = np.flatnonzero(uppers > target_error)
    passed = int(failed[0]) if len(failed) else len(ends)  # fixed-sequence: the first failure ends the scan
    if passed == 0:
        return Threshold(None, 0, 0, 1.0, 0.0, target_error, confidence)
    i = passed - 1
    return Threshold(
        float(s_sorted[ends[i]]), int(accepted[i]), int(errors[i]), float(uppers[i]), int(accepted[i]) / n_total, target_error, confidence
    )


def _clopper_pearson_uppers(errors: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """``clopper_pearson_upper`` over arrays (one scipy call for the whole scan)."""
    from scipy.stats import beta

    errors, n = np.asarray(errors, dtype=float), np.asarray(n, dtype=float)
    all_wrong = errors >= n
    out = beta.ppf(confidence, errors + 1, np.where(all_wrong, 1.0, n - errors))
    return np.where(all_wrong | (n == 0), 1.0, out)


def _check_target(target_error: float, confidence: float) -> None:
    if not 0 < target_error < 1:
        raise ValueError(f"target_error must be in (0, 1), got {target_error}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


# ---------------------------------------------------------------------- the scorer


@dataclass
class LogisticScorer:
    """P(correct | features) from a logistic regression on standardised features.

    Scoring is plain Python (a dozen multiply-adds, microseconds): no numpy call overhead,
    no sklearn at serving time. A feature missing from a row reads as 0.0.
    """

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float
    means: tuple[float, ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        self.weights = tuple(float(w) for w in self.weights)
        self.means = tuple(float(m) for m in self.means)
        self.scales = tuple(float(s) for s in self.scales)
        self.bias = float(self.bias)
        n = len(self.features)
        if not (len(self.weights) == len(self.means) == len(self.scales) == n):
            raise ValueError(
                f"features, weights, means and scales must have one length, got {n}, "
                f"{len(self.weights)}, {len(self.means)}, {len(self.scales)}"
            )
        if len(set(self.features)) != n:
            raise ValueError(f"features repeat: {self.features}")
        if any(not s > 0 or not math.isfinite(s) for s in self.scales):
            raise ValueError(f"scales must be finite and > 0, got {self.scales}")
        if not all(math.isfinite(x) for x in (*self.weights, *self.means, self.bias)):
            raise ValueError("weights, means and bias must be finite")

    def score(self, row: Mapping[str, float]) -> float:
        z = self.bias
        for name, w, m, s in zip(self.features, self.weights, self.means, self.scales, strict=True):
            z += w * (float(row.get(name, 0.0)) - m) / s
        return _sigmoid(z)

    def to_json(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "weights": list(self.weights),
            "bias": self.bias,
            "means": list(self.means),
            "scales": list(self.scales),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LogisticScorer:
        """Read ``to_json``'s output back; a missing or mistyped field raises ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"scorer must be an object, got {type(data).__name__}")
        feats = data.get("features")
        if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
            raise ValueError(f"scorer.features must be a list of names, got {feats!r}")
        for name in ("weights", "means", "scales"):
            vals = data.get(name)
            if not isinstance(vals, list) or not all(_is_number(v) for v in vals):
                raise ValueError(f"scorer.{name} must be a list of numbers, got {vals!r}")
        if not _is_number(data.get("bias")):
            raise ValueError(f"scorer.bias must be a number, got {data.get('bias')!r}")
        return cls(tuple(feats), tuple(data["weights"]), data["bias"], tuple(data["means"]), tuple(data["scales"]))


def fit_logistic(
    rows: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    *,
    features: Sequence[str] | None = None,
) -> LogisticScorer:
    """Fit P(label | features) by L2-regularised logistic regression (C=1) on standardised features.

    ``features`` defaults to every name seen in ``rows``, in order of first appearance. Both
    labels must occur. Kept deliberately simple: a linear score is easy to read off its weights,
    and the calibration step, not the model, is what carries the guarantee.
    """
    from sklearn.linear_model import LogisticRegression

    if len(rows) != len(labels):
        raise ValueError(f"rows and labels differ in length: {len(rows)} vs {len(labels)}")
    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("fit_logistic needs both correct and wrong examples")
    names = tuple(features) if features is not None else tuple(dict.fromkeys(k for r in rows for k in r))
    if not names:
        raise ValueError("no features to fit on")
    x = np.array([[float(r.get(f, 0.0)) for f in names] for r in rows], dtype=float)
    means = x.mean(axis=0)
    scales = x.std(axis=0)
    scales[scales == 0] = 1.0  # a constant feature: leave it unscaled (its weight ends near 0)
    model = LogisticRegression(C=1.0, max_iter=1000)
    model.fit((x - means) / scales, y)
    return LogisticScorer(names, tuple(model.coef_[0]), float(model.intercept_[0]), tuple(means), tuple(scales))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # no overflow for very negative z
    return e / (1.0 + e)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------- what a gate file keeps


@dataclass(frozen=True)
class Calibration:
    """The held-out examples a gate's threshold was certified on: the scorer's score of each
    and whether accepting it was right. Kept in the gate file, so the threshold can be
    certified again for another target (``choose_threshold``) without the original data."""

    scores: tuple[float, ...]
    correct: tuple[bool, ...]

    def threshold(self, target_error: float, confidence: float = DEFAULT_CONFIDENCE) -> Threshold:
        return choose_threshold(self.scores, self.correct, target_error=target_error, confidence=confidence)

    def to_json(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "correct": [int(c) for c in self.correct]}

    @classmethod
    def from_json(cls, data: Any) -> Calibration:
        if not isinstance(data, dict):
            raise ValueError(f"calibration must be an object, got {type(data).__name__}")
        scores, correct = data.get("scores"), data.get("correct")
        if not isinstance(scores, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
            raise ValueError("calibration.scores must be a list of finite numbers")
        if not isinstance(correct, list) or not all(c in (0, 1) and not isinstance(c, float) for c in correct):
            raise ValueError("calibration.correct must be a list of 0 and 1")
        if len(scores) != len(correct):
            raise ValueError(f"calibration has {len(scores)} scores but {len(correct)} correct flags")
        return cls(tuple(float(x) for x in scores), tuple(bool(c) for c in correct))


def split_sessions(sessions: set[str], share: float, seed: int) -> set[str]:
    """The sessions that certify (about ``share`` of them, seeded); the others fit the scorer.
    A conversation's steps are alike, so a split is by session, never by step."""
    names = sorted(sessions)
    random.Random(seed).shuffle(names)
    return set(names[: round(len(names) * share)])


def read_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """A gate file's JSON; a missing, unreadable or invalid file is a ``ConfigError`` whose
    ``where`` is the path (a gate is read at start-up, never inside a step)."""
    where = str(path)
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(where, f"{what} file not found") from None
    except OSError as e:
        raise ConfigError(where, f"cannot read the {what} file: {e.strerror or e}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(where, f"{what} file is not valid JSON: {e.msg} at line {e.lineno}") from None


def read_gate_document(
    doc: Any, where: str, *, what: str, format: str, format_version: int, version_key: str, version: str
) -> tuple[LogisticScorer, Threshold, Calibration | None]:
    """The parts of a gate file (a scorer, its certified threshold, the certification pairs),
    after checking what every gate file must say: its format and format version, the version of
    the features its scorer was fitted on (``version_key``: a threshold is valid only for the
    features it was certified with), when and on what it was fitted. A ``ConfigError`` naming
    ``where`` otherwise."""
    if not isinstance(doc, dict) or doc.get("format") != format:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(where, f"not a milliwatt {what} (format {got!r}, expected {format!r})")
    if doc.get("format_version") != format_version:
        raise ConfigError(where, f"{what} format_version {doc.get('format_version')!r} is not supported (this milliwatt reads {format_version})")
    if doc.get(version_key) != version:
        raise ConfigError(
            where, f"{what} fitted on features {doc.get(version_key)!r}, but this milliwatt computes {version!r}: its threshold is not valid for them; refit it"
        )
    for name in ("fitted_on", "created_at"):
        if not isinstance(doc.get(name), str):
            raise ConfigError(where, f"{name} must be a string, got {doc.get(name)!r}")
    try:
        scorer = LogisticScorer.from_json(doc.get("scorer"))
        threshold = Threshold.from_json(doc.get("threshold"))
        calibration = None if doc.get("calibration") is None else Calibration.from_json(doc["calibration"])
    except ValueError as e:
        raise ConfigError(where, f"invalid {what}: {e}") from None
    return scorer, threshold, calibration
