"""``milliwatt cache calibrate LEDGER``: fit the cache's hit gate from the candidates a ledger holds.

Every cache attempt stores candidates in ``attempts.evidence_json`` (the best of each kind,
exact and templated; every one when the cache ran with ``observe: true``), with their
features and the answer each would have served. A candidate is labelled by what the step got
from the tier behind the cache:

* held back (the cache passed): right when it agrees with the answer of the reference tier
  (``reference_tier``, default ``remote``) under ``milliwatt.quality.agreement``, the measures
  the replay uses; steps another tier answered are left out;
* served: right when it agrees with the answer of a shadow check of the step (the next tier
  answered it off the critical path), else by the step's own judgement (``quality_agrees``,
  set by a replay); unlabelled otherwise.

The labelled steps are split **by session** (seeded; a conversation's steps are alike, so
they must not sit on both sides). The scorer is fitted on every labelled candidate of one
part; the threshold is certified on the other part with what the tier would serve there: per
step, the candidate the new scorer ranks first (``milliwatt.cache.evidence.certify``). The
gate is written as a versioned JSON file; ``cache.gate`` in the configuration reads it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milliwatt.calibration import CalibrationError, LogisticScorer, fit_logistic, split_sessions
from milliwatt.ledger import ledger_steps
from milliwatt.quality import agreement

from .evidence import ALL_FEATURES, HitGate, certify

DEFAULT_TARGET = 0.02


@dataclass
class LabelledStep:
    session: str
    candidates: list[tuple[dict[str, float], bool, bool]] = field(default_factory=list)  # (features, right, templated)


@dataclass
class Labelled:
    """The labelled cache candidates of a ledger, by step."""

    steps: list[LabelledStep] = field(default_factory=list)
    unlabelled: int = 0

    @property
    def candidates(self) -> list[tuple[dict[str, float], bool, bool]]:
        return [c for s in self.steps for c in s.candidates]

    @property
    def sessions(self) -> set[str]:
        return {s.session for s in self.steps}


def _reference(step: dict[str, Any], reference_tier: str) -> tuple[dict[str, Any] | None, bool]:
    """(the answer candidates are judged against, whether it comes from a shadow check)."""
    for attempt in step["attempts"]:
        if attempt["outcome"] == "shadow" and attempt.get("evidence") and "answer" in attempt["evidence"]:
            return attempt["evidence"]["answer"], True
    if step["tier"] == reference_tier and step.get("response"):
        return step["response"], False
    return None, False


def labelled_candidates(steps: Iterable[dict[str, Any]], *, reference_tier: str = "remote") -> Labelled:
    """The candidates of ``steps`` (``milliwatt.ledger.read_steps`` rows) with their verdicts."""
    out = Labelled()
    for step in steps:
        reference, shadowed = _reference(step, reference_tier)
        labelled = LabelledStep(step.get("session_id") or step["id"])
        for attempt in step["attempts"]:
            if attempt["tier"] != "cache" or attempt["outcome"] == "shadow" or not attempt.get("evidence"):
                continue
            for c in attempt["evidence"].get("candidates", []):
                verdict: bool | None
                if c.get("served") and not shadowed:
                    verdict = step.get("quality_agrees")
                else:
                    verdict = None if reference is None else agreement(c["answer"], reference).agrees
                if verdict is None:
                    out.unlabelled += 1
                else:
                    labelled.candidates.append((dict(c["features"]), bool(verdict), bool(c.get("templated"))))
        if labelled.candidates:
            out.steps.append(labelled)
    return out


def read_labelled(ledger: str | Path, *, reference_tier: str = "remote") -> Labelled:
    return labelled_candidates(ledger_steps(ledger), reference_tier=reference_tier)


def fit(labelled: Labelled, *, target: float, confidence: float = 0.95, seed: int = 0, certify_share: float = 0.5, fitted_on: str) -> HitGate:
    """Fit the scorer on one part of the sessions, certify the threshold on the other."""
    held_out = split_sessions(labelled.sessions, certify_share, seed)
    fit_rows = [c for s in labelled.steps if s.session not in held_out for c in s.candidates]
    if not fit_rows or not held_out:
        raise CalibrationError(
            f"{len(labelled.candidates)} labelled cache candidates in {len(labelled.sessions)} session(s): calibration needs "
            "candidates in two sessions or more (replay with cache.observe: true)"
        )
    outcomes = {right for _, right, _ in fit_rows}
    if len(outcomes) == 2:
        scorer = fit_logistic([f for f, _, _ in fit_rows], [r for _, r, _ in fit_rows], features=ALL_FEATURES)
    else:
        # Every candidate of the fit part was right (or every one wrong): nothing separates
        # them, so the score is that one outcome; the held-out part still decides whether
        # serving is certified.
        bias = 8.0 if outcomes == {True} else -8.0
        scorer = LogisticScorer(("templated",), (0.0,), bias, (0.0,), (1.0,))
    served = [max(((scorer.score(f), r) for f, r, _ in s.candidates), key=lambda x: x[0]) for s in labelled.steps if s.session in held_out]
    return certify(scorer, [sc for sc, _ in served], [r for _, r in served], target_error=target, confidence=confidence, fitted_on=fitted_on)


def calibrate(
    ledger: str | Path, *, target: float = DEFAULT_TARGET, confidence: float = 0.95, reference_tier: str = "remote", seed: int = 0
) -> tuple[HitGate, Labelled]:
    labelled = read_labelled(ledger, reference_tier=reference_tier)
    fitted_on = (
        f"{Path(ledger).name}: {len(labelled.candidates)} cache candidates of {len(labelled.steps)} steps in "
        f"{len(labelled.sessions)} sessions; scorer fitted on half the sessions (seed {seed}), threshold certified on the "
        "other half's best-scored candidate per step"
    )
    return fit(labelled, target=target, confidence=confidence, seed=seed, fitted_on=fitted_on), labelled


def run(args: argparse.Namespace) -> int:
    gate, labelled = calibrate(
        args.ledger, target=args.target, confidence=args.confidence, reference_tier=args.reference_tier, seed=args.seed
    )
    gate.save(args.out)
    t = gate.threshold
    candidates = labelled.candidates
    right = sum(r for _, r, _ in candidates)
    print(
        f"{len(candidates)} labelled candidates ({right} right, {len(candidates) - right} wrong, "
        f"{sum(t for _, _, t in candidates)} templated; {labelled.unlabelled} without a reference) "
        f"of {len(labelled.steps)} steps in {len(labelled.sessions)} sessions",
        file=sys.stdout,
    )
    if t.score is None:
        print(f"no threshold certifies {args.target:.1%} wrong at {args.confidence:.0%} confidence: the gate serves exact repeats only")
    else:
        print(
            f"threshold {t.score:.4f}: {t.accepted} of the held-out steps served, {t.errors} wrong, "
            f"upper bound {t.upper:.2%} <= {args.target:.1%} at {args.confidence:.0%} confidence"
        )
    print(f"wrote {args.out}")
    return 0
