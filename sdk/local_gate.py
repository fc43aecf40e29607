"""The local tier's calibrated gate, and ``milliwatt calibrate LEDGER`` that fits it (issue 9).

A fixed confidence threshold bounds nothing: how often an accepted local answer is wrong
depends on the model and the traffic. The calibrated gate scores each answer from its
features (``milliwatt.local_features``: token-probability quantiles, the choice margin,
validity, whether its values were copied from the context) with a logistic regression
fitted to predict agreement with the reference, and accepts at a threshold certified by
Learn-then-Test with Clopper-Pearson tests (``milliwatt.calibration``): with 95% confidence,
at most ``1 - precision`` of accepted answers disagree, on traffic exchangeable with the
calibration data.

Fitting reads a ledger whose local attempts recorded their answers (every replay does; with
``local.observe: true`` the local tier answers every step and accepts none, so every answer
has a reference). An answer is right by the replay's own verdict on it (``evidence.quality``,
e.g. BFCL's acceptable values), else when it agrees with the reference tier's answer
(``milliwatt.quality.agreement``). Steps are split by session, seeded: the scorer is fitted
on one part, the threshold certified on the other. The gate file keeps the certification
pairs, so ``local.precision`` can ask for another target without refitting.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .calibration import (
    DEFAULT_CONFIDENCE,
    Calibration,
    CalibrationError,
    LogisticScorer,
    Threshold,
    fit_logistic,
    read_gate_document,
    read_json_file,
    split_sessions,
)
from .errors import ConfigError
from .files import write_atomic
from .gates import GateDecision, answer_problem
from .local_features import FEATURES, FEATURES_VERSION, answer_features
from .tier import Completion
from .types import Step

GATE_FORMAT = "milliwatt-local-gate"
GATE_FORMAT_VERSION = 1
DEFAULT_PRECISION = 0.98
DECODINGS = ("copy", "free", None)


@dataclass(frozen=True)
class LocalGate:
    """A scorer over answer features and a certified threshold (``score`` None: accept none)."""

    scorer: LogisticScorer
    threshold: Threshold
    fitted_on: str
    created_at: str
    calibration: Calibration
    features_version: str = FEATURES_VERSION
    # How the answers it was fitted on were decoded ("copy" or "free" tool arguments; None:
    # text only or not recorded): the same features mean another thing under another grammar.
    decoding: str | None = None

    @functools.cached_property
    def id(self) -> str:
        """A short name of this exact gate (scorer and threshold), recorded with every decision."""
        doc = json.dumps({"scorer": self.scorer.to_json(), "threshold": self.threshold.to_json()}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:12]

    def accepts(self, features: Mapping[str, float]) -> tuple[bool, float]:
        score = self.scorer.score(features)
        return self.threshold.score is not None and score >= self.threshold.score, score

    def retarget(self, precision: float, confidence: float | None = None) -> LocalGate:
        conf = self.threshold.confidence if confidence is None else confidence
        return replace(self, threshold=self.calibration.threshold(1 - precision, conf))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": GATE_FORMAT,
            "format_version": GATE_FORMAT_VERSION,
            "features_version": self.features_version,
            "fitted_on": self.fitted_on,
            "created_at": self.created_at,
            "decoding": self.decoding,
            "scorer": self.scorer.to_json(),
            "threshold": self.threshold.to_json(),
            "calibration": self.calibration.to_json(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the gate as JSON, atomically (``milliwatt.files.write_atomic``)."""
        write_atomic(Path(path), (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalGate:
        """Read a gate file; anything untrustworthy is a ``ConfigError`` naming the path."""
        where, doc = str(path), read_json_file(path, "local gate")
        scorer, threshold, calibration = read_gate_document(
            doc, where, what="local gate", format=GATE_FORMAT, format_version=GATE_FORMAT_VERSION,
            version_key="features_version", version=FEATURES_VERSION,
        )  # fmt: skip
        if calibration is None:
            raise ConfigError(where, "invalid local gate: it carries no calibration pairs")
        unknown = [f for f in scorer.features if f not in FEATURES]
        if unknown:
            raise ConfigError(where, f"unknown features {', '.join(unknown)} (this milliwatt computes {', '.join(FEATURES)})")
        decoding = doc.get("decoding")
        if decoding not in DECODINGS:
            raise ConfigError(where, f"decoding must be one of {', '.join(map(repr, DECODINGS))}, got {decoding!r}")
        return cls(scorer, threshold, doc["fitted_on"], doc["created_at"], calibration, decoding=decoding)


def load_local_gate(path: str | os.PathLike[str], precision: float = DEFAULT_PRECISION, *, decoding: str | None = None) -> LocalGate:
    """The gate of ``path`` with its threshold certified for ``precision`` (re-certified on the
    pairs the file carries when it was fitted for another). ``decoding``: how the local tier
    will decode tool arguments; a gate fitted on answers decoded otherwise is refused."""
    gate = LocalGate.load(path)
    if decoding is not None and gate.decoding not in (None, decoding):
        raise ConfigError(
            str(path),
            f"the gate was calibrated on answers with {gate.decoding} tool arguments, but the local tier decodes "
            f"them {decoding} (local.copy_values): its threshold does not hold for them; recalibrate, or set "
            f"local.copy_values to {gate.decoding == 'copy'}",
        )
    if math.isclose(1 - gate.threshold.target_error, precision, rel_tol=0, abs_tol=1e-12):
        return gate
    try:
        return gate.retarget(precision)
    except ValueError as e:
        raise ConfigError("local.precision", str(e)) from None


class LiveChecks:
    """The verdicts of shadow checks on accepted answers: live precision, with its bound."""

    MIN_CHECKS = 20  # fewer verdicts suspend nothing: a bound on so few says little

    def __init__(self, target_precision: float, confidence: float = DEFAULT_CONFIDENCE) -> None:
        self.target = target_precision
        self.confidence = confidence
        self.checked = self.agreed = 0
        self.suspended = False
        self._lock = threading.Lock()

    def add(self, agrees: bool) -> None:
        from .calibration import clopper_pearson_lower

        with self._lock:
            self.checked += 1
            self.agreed += agrees
            wrong, n = self.checked - self.agreed, self.checked
        # Suspend when, with this confidence, live precision is below the target: the lower
        # bound of the error rate above what the target allows.
        below = n >= self.MIN_CHECKS and clopper_pearson_lower(wrong, n, self.confidence) > 1 - self.target
        with self._lock:
            self.suspended = self.suspended or below

    def describe(self) -> str:
        return f"{self.agreed} of {self.checked} shadow-checked answers agreed"


@dataclass(frozen=True)
class CalibratedGate:
    """The local tier's gate with a ``LocalGate``: what can never stand is refused first
    (``answer_problem``), then the answer stands when its score reaches the certified threshold.
    Every decision records the gate's id and the score (``attempts.evidence_json``).

    Live traffic may drift from the calibration data. The verdicts of shadow checks
    (``local.shadow_share`` of accepted answers, answered again by the next tier off the
    critical path) come back through ``observe_check``; once they show, with 95% confidence,
    a precision below the target, the gate accepts nothing more until it is recalibrated."""

    gate: LocalGate
    live: LiveChecks = field(default=None, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.live is None:
            object.__setattr__(self, "live", LiveChecks(1 - self.gate.threshold.target_error, self.gate.threshold.confidence))

    def observe_check(self, agrees: bool) -> None:
        self.live.add(agrees)

    def check(self, step: Step, completion: Completion) -> GateDecision:
        features = answer_features(step, completion)
        accept, score = self.gate.accepts(features)
        evidence = {"gate": self.gate.id, "score": score, "features": features}
        problem = answer_problem(step, completion)
        if problem:
            return GateDecision(False, score, problem, evidence)
        if self.live.suspended:
            reason = f"calibrated gate {self.gate.id} suspended: {self.live.describe()}, below {self.live.target:.0%}; recalibrate it"
            return GateDecision(False, score, reason, evidence)
        t = self.gate.threshold
        if t.score is None:
            reason = f"calibrated gate {self.gate.id} accepts nothing at {1 - t.target_error:.0%} precision"
        else:
            reason = (
                f"calibrated gate {self.gate.id}: score {score:.3f} {'>=' if accept else '<'} {t.score:.3f} "
                f"(at least {1 - t.target_error:.0%} precision, {t.confidence:.0%} confidence)"
            )
        return GateDecision(accept, score, reason, evidence)


# ---------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class LabelledAnswer:
    session: str
    features: dict[str, float]
    right: bool
    decoding: str | None = None


def labelled_answers(steps: Iterable[Mapping[str, Any]], *, tier: str = "local", reference_tier: str = "remote") -> tuple[list[LabelledAnswer], int]:
    """(the labelled answers of ``tier`` in a ledger's steps, how many had no label)."""
    from .quality import agreement

    out: list[LabelledAnswer] = []
    unlabelled = 0
    for step in steps:
        for a in step["attempts"]:
            e = a.get("evidence") or {}
            if a["tier"] != tier or e.get("features_version") != FEATURES_VERSION or not e.get("answer"):
                continue
            verdict = (e.get("quality") or {}).get("agrees")
            if verdict is None and step["tier"] == reference_tier and step.get("response"):
                verdict = agreement(e["answer"], step["response"]).agrees
            if verdict is None:
                unlabelled += 1
                continue
            out.append(LabelledAnswer(step["session_id"] or step["id"], dict(e["features"]), bool(verdict), e.get("decoding")))
    return out, unlabelled


def fit_local_gate(
    answers: list[LabelledAnswer], *, precision: float = DEFAULT_PRECISION, confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0, certify_share: float = 0.5, fitted_on: str,
) -> LocalGate:  # fmt: skip
    """Fit the scorer on one part of the sessions, certify the threshold on the other."""
    decodings = sorted({a.decoding for a in answers if a.decoding})
    if len(decodings) > 1:
        raise CalibrationError(
            f"the local answers were decoded {' and '.join(decodings)} (local.copy_values changed between runs): "
            "a gate holds for one; calibrate on a ledger of one"
        )
    held_out = split_sessions({a.session for a in answers}, certify_share, seed)
    fit_rows = [a for a in answers if a.session not in held_out]
    cert_rows = [a for a in answers if a.session in held_out]
    if not fit_rows or not cert_rows:
        raise CalibrationError(
            f"{len(answers)} labelled local answers: calibration needs answers in two sessions or more "
            "(replay with local.observe: true)"
        )
    outcomes = {a.right for a in fit_rows}
    if len(outcomes) == 2:
        scorer = fit_logistic([a.features for a in fit_rows], [a.right for a in fit_rows], features=FEATURES)
    else:  # nothing separates right from wrong in the fit part: one score for all
        scorer = LogisticScorer(("valid",), (0.0,), 8.0 if outcomes == {True} else -8.0, (0.0,), (1.0,))
    calibration = Calibration(tuple(scorer.score(a.features) for a in cert_rows), tuple(a.right for a in cert_rows))
    created = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    threshold = calibration.threshold(1 - precision, confidence)
    return LocalGate(scorer, threshold, fitted_on, created, calibration, decoding=decodings[0] if decodings else None)


def calibrate(
    ledgers: str | os.PathLike[str] | list[str | os.PathLike[str]], *, precision: float = DEFAULT_PRECISION,
    confidence: float = DEFAULT_CONFIDENCE, reference_tier: str = "remote", seed: int = 0,
) -> tuple[LocalGate, list[LabelledAnswer], int]:  # fmt: skip
    """Fit a gate on the local answers of one ledger or several pooled (the more answers, the
    higher the precision a threshold can be certified for: 98% at 95% confidence needs at
    least 149 accepted answers, all right, in the certification part)."""
    from .ledger import ledger_steps

    paths = [ledgers] if isinstance(ledgers, (str, os.PathLike)) else list(ledgers)
    answers: list[LabelledAnswer] = []
    unlabelled = 0
    for path in paths:
        found, missing = labelled_answers(ledger_steps(path), reference_tier=reference_tier)
        answers += found
        unlabelled += missing
    sessions = len({a.session for a in answers})
    fitted_on = (
        f"{', '.join(Path(p).name for p in paths)}: {len(answers)} labelled local answers in {sessions} sessions; "
        f"scorer fitted on half the sessions (seed {seed}), threshold certified on the other half"
    )
    gate = fit_local_gate(answers, precision=precision, confidence=confidence, seed=seed, fitted_on=fitted_on)
    return gate, answers, unlabelled


# ---------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ledger", nargs="+", help="ledgers whose local attempts recorded their answers (replays; best with local.observe: true), pooled")
    p.add_argument("--target", type=float, default=DEFAULT_PRECISION, help="precision: the share of accepted local answers that must agree (default 0.98)")
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE, help="confidence of the bound (default 0.95)")
    p.add_argument("--reference-tier", default="remote", help="the tier whose answers are the reference (default remote)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by session")
    p.add_argument("--out", default="local-gate.json", help="gate file to write (default local-gate.json)")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.target < 1:
        raise CalibrationError(f"--target is a precision in (0, 1), got {args.target}")
    gate, answers, unlabelled = calibrate(
        args.ledger, precision=args.target, confidence=args.confidence, reference_tier=args.reference_tier, seed=args.seed
    )
    gate.save(args.out)
    right = sum(a.right for a in answers)
    print(f"{len(answers)} labelled local answers ({right} right, {len(answers) - right} wrong; {unlabelled} without a reference)")
    t = gate.threshold
    if t.score is None:
        print(
            f"no threshold certifies {args.target:.0%} precision at {args.confidence:.0%} confidence on the "
            f"{len(gate.calibration.scores)} held-out answers: the gate accepts nothing"
        )
    else:
        print(
            f"threshold {t.score:.4f}: {t.accepted} of {len(gate.calibration.scores)} held-out answers accepted, {t.errors} wrong, "
            f"error upper bound {t.upper:.2%} <= {1 - args.target:.0%} at {args.confidence:.0%} confidence"
        )
    print(f"wrote {args.out} (gate {gate.id})")
    return 0
