"""Evidence beyond cosine that a stored question asks what the new one asks, and the hit gate.

Cosine similarity of sentence embeddings is blind to what changes an answer without changing
many words: an added qualifier ("ancient folk tales" / "the ten most ancient folk tales"), a
negation, a number, or the same words in another order ("flights from Paris to Rome" / "from
Rome to Paris", GPTCache issue #694: a question and its reverse). ``text_features`` measures
these from the two texts alone, with regular expressions and set arithmetic (microseconds, no
model), so it can run on every candidate the FAISS search returns.

``HitGate`` turns the features into a decision: a logistic score (``LogisticScorer``) and a
threshold certified by ``milliwatt.calibration.choose_threshold``, so the share of wrong hits
among served ones is bounded at a chosen rate (with the stated confidence, on traffic like the
calibration data) instead of being whatever a fixed cosine cut happens to give. ``fit_gate``
fits the scorer and certifies the threshold on disjoint parts of the labelled data: the bound
is computed on examples the scorer never saw. A gate keeps those held-out (score, right)
pairs, so ``load_gate``/``HitGate.retarget`` can certify a threshold for whatever share of
wrong hits is configured. The default gate (``default_gate``) ships as package data, fitted
on half of Quora Question Pairs (see its ``fitted_on``): on QQP, whose labels are noisy even
for near-identical questions, nothing certifies 2% wrong, so at that share it serves nothing
until it is refitted on the traffic it serves (``milliwatt cache bench`` shows the figures).

The gate file is JSON, written atomically; ``HitGate.load`` refuses a file it cannot trust
(missing, not JSON, another format or version, features this module does not compute) with a
``ConfigError`` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from milliwatt.calibration import (
    DEFAULT_CONFIDENCE,
    Calibration,
    LogisticScorer,
    Threshold,
    fit_logistic,
    read_gate_document,
    read_json_file,
)
from milliwatt.errors import ConfigError
from milliwatt.files import write_atomic

from .key import literal_tokens

GATE_FORMAT = "milliwatt-cache-gate"
GATE_FORMAT_VERSION = 1
# The definition of the features below. A gate's weights and threshold are only valid for the
# features it was fitted on, so a gate records this and a gate of another version is refused:
# bump it whenever a feature's definition changes (stopwords, stemming, a formula).
EVIDENCE_VERSION = "mw-evidence/1"
DEFAULT_GATE = Path(__file__).resolve().parent / "gates" / "qqp_text.json"

FEATURES = (
    "cosine",
    "same_text",
    "token_jaccard",
    "query_only",
    "stored_only",
    "number_mismatch",
    "negation_mismatch",
    "length_ratio",
    "order_mismatch",
    "bigram_overlap",
    "wh_mismatch",
    "frame_only",
    "entity_only",
    "cosine_gap",
)
# Evidence the cache tier adds from its own state, not from the texts (tier.py): whether the
# candidate is a re-bound template; whether it calls tools (text and tool-call answers are
# not equally reliable: an agent's wording varies more than its moves); how often the entry's
# answer agreed or disagreed with the next tier before; and for templates the slots re-bound,
# the stored templates that bind to the same answer (votes) and to other answers (rivals). A
# gate fitted on a ledger (``milliwatt cache calibrate``) may use them; the shipped gate uses
# text features only.
CONTEXT_FEATURES = ("templated", "tool_call", "agree", "disagree", "slots", "votes", "rivals")
ALL_FEATURES = FEATURES + CONTEXT_FEATURES

# ---------------------------------------------------------------------- tokens

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")

# Function words: they shape a sentence but rarely decide what answers it. Interrogatives are
# here too (they get their own feature, wh_mismatch), and negations are not: they have theirs.
_STOPWORDS = frozenset(
    """a an the and or but if then so than as of at by for with about against between into through
    during before after above below to from up down in out on off over under again further once
    here there all any both each few more most other some such only own same too very just also
    i me my myself we our ours you your yours he him his she her it its they them their theirs
    this that these those am is are was were be been being have has had having do does did doing
    will would shall should can could may might must what which who whom whose when where why how
    i'm i've i'd i'll you're it's that's there's what's let's get got one ones way ways thing things
    s t d ll m re ve""".split()
)
_NEGATIONS = frozenset("not no never without cannot nor none nobody nothing neither nowhere".split())
_INTERROGATIVES = ("what", "why", "how", "when", "where", "who", "whom", "whose", "which")
# Spelled-out numbers name quantities as digits do ("ten most ancient" / "most ancient");
# "one" is left out: it is far more often a pronoun ("which one", "one should").
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
    if w != "_"
} | {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
     "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000"}  # fmt: skip


def normalize_text(text: str) -> str:
    """Lower case, punctuation and runs of whitespace to one space: what ``same_text`` compares."""
    return _NON_ALNUM.sub(" ", text.lower().replace("’", "'").replace("'", "")).strip()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def _stem(word: str) -> str:
    """A light inflection strip ("tales"/"tale", "learning"/"learn"): enough to match word forms,
    not a full stemmer, since a wrong merge would hide a real difference."""
    word = word.removesuffix("'s")
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed"):
        return word[:-2]
    return word


def _is_negation(word: str) -> bool:
    return word in _NEGATIONS or word.endswith("n't")


def _content(words: list[str]) -> list[str]:
    """Stems of the content words, in order (numbers included: they are content)."""
    return [_stem(w) for w in words if w not in _STOPWORDS and not _is_negation(w)]


def _numbers(text: str, words: list[str]) -> frozenset[str]:
    digits = {t.lower().replace(",", "") for t in literal_tokens(text)}
    return frozenset(digits | {_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS})


def _question_type(words: list[str]) -> str:
    """The first interrogative word, or "polar" for a yes/no question or a statement."""
    for w in words:
        if w in _INTERROGATIVES:
            return "who" if w in ("whom", "whose") else w
    return "polar"


def _frame(words: list[str]) -> set[str]:
    """The function words of a question (its frame: "how can I", "why don't we"), negations apart."""
    return {w for w in words if w in _STOPWORDS}


def _entities(text: str) -> set[str]:
    """Capitalised words that are not sentence openers or function words ("Upson County",
    "Korean"), lower-cased: names, which change the answer as numbers do."""
    out: set[str] = set()
    for sentence in re.split(r"[.?!]+\s+", text):
        for t in re.findall(r"[A-Za-z][\w'-]*", sentence)[1:]:
            low = t.lower()
            if t[0].isupper() and low not in _STOPWORDS and not _is_negation(low) and not low.startswith("i'"):
                out.add(low)
    return out


def _order_mismatch(query: list[str], stored: list[str]) -> float:
    """Share of pairs of shared content words whose order differs (0: same order, 1: reversed).

    "from Paris to Rome" / "from Rome to Paris": the one pair (paris, rome) is reversed, 1.0;
    with "flights" in front of both, one pair of three, 1/3. Fewer than two shared words: 0.0.
    """
    first_s: dict[str, int] = {}
    for i, w in enumerate(stored):
        first_s.setdefault(w, i)
    seen: set[str] = set()
    ranks: list[int] = []
    for w in query:
        if w in first_s and w not in seen:
            seen.add(w)
            ranks.append(first_s[w])
    pairs = len(ranks) * (len(ranks) - 1) // 2
    if not pairs:
        return 0.0
    discordant = sum(1 for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i] > ranks[j])
    return discordant / pairs


def _bigram_overlap(query: list[str], stored: list[str]) -> float:
    """Dice overlap of adjacent word pairs, function words included: it sees roles ("from
    paris" vs "from rome") that sets of content words cannot. Two empty sides: 1.0."""
    bq = set(pairwise(query))
    bs = set(pairwise(stored))
    if not bq and not bs:
        return 1.0 if query == stored else 0.0
    return 2 * len(bq & bs) / (len(bq) + len(bs))


def text_features(query: str, stored: str, cosine: float) -> dict[str, float]:
    """Evidence that ``stored`` (a cached question) asks what ``query`` asks; see FEATURES.

    All values are floats; counts are counts, the rest are in [0, 1]. Pure Python, no model.
    """
    wq, ws = _words(query), _words(stored)
    cq, cs = _content(wq), _content(ws)
    set_q, set_s = set(cq), set(cs)
    union = set_q | set_s
    stem_q, stem_s = [_stem(w) for w in wq], [_stem(w) for w in ws]
    return {
        "cosine": float(cosine),
        "same_text": float(normalize_text(query) == normalize_text(stored)),
        "token_jaccard": len(set_q & set_s) / len(union) if union else 1.0,
        "query_only": float(len(set_q - set_s)),
        "stored_only": float(len(set_s - set_q)),
        "number_mismatch": float(_numbers(query, wq) != _numbers(stored, ws)),
        "negation_mismatch": float(any(map(_is_negation, wq)) != any(map(_is_negation, ws))),
        "length_ratio": min(len(wq), len(ws)) / max(len(wq), len(ws)) if wq or ws else 1.0,
        "order_mismatch": _order_mismatch(cq, cs),
        "bigram_overlap": _bigram_overlap(stem_q, stem_s),
        "wh_mismatch": float(_question_type(wq) != _question_type(ws)),
        "frame_only": float(len(_frame(wq) ^ _frame(ws))),
        "entity_only": float(len(_entities(query) - set(ws)) + len(_entities(stored) - set(wq))),
        # Logistic regression is linear in its inputs; the gap to 1 on a log scale lets it weigh
        # 0.99 -> 0.999 like 0.9 -> 0.99, which is where right and wrong hits part.
        "cosine_gap": -math.log10(max(1.0 - float(cosine), 1e-4)),
    }


# ---------------------------------------------------------------------- the gate


@dataclass
class HitGate:
    """Serve a candidate only when its evidence scores at or above a certified threshold.

    ``version`` is the evidence definition the scorer was fitted on (``EVIDENCE_VERSION``),
    ``fitted_on`` says on what data, ``created_at`` when (ISO 8601, UTC). ``calibration`` keeps
    the held-out (score, correct) pairs the threshold was certified on, so ``retarget`` can
    certify a threshold for another error rate without the original data.
    """

    scorer: LogisticScorer
    threshold: Threshold
    version: str
    fitted_on: str
    created_at: str
    calibration: Calibration | None = None

    def accepts(self, features: Mapping[str, float]) -> tuple[bool, float]:
        """(whether to serve, the score): the one decision of the tier and of the benchmark.

        * An **exact repeat** (``same_text`` of a candidate that is not a template: the same
          request, up to case and punctuation, in the same exact state) is served whatever the
          score, as any exact cache would: it is the answer already given to this very request.
        * A **templated** candidate only by a gate whose scorer knows templates (fitted on a
          ledger by ``milliwatt cache calibrate``): text evidence alone cannot vouch for one.
        * Anything else when its score reaches the certified threshold; a threshold of None
          serves nothing.
        """
        score = self.scorer.score(features)
        templated = features.get("templated", 0.0) > 0
        if not templated and features.get("same_text", 0.0) > 0:
            return True, score
        if templated and not self.knows_templates:
            return False, score
        return self.threshold.score is not None and score >= self.threshold.score, score

    @property
    def knows_templates(self) -> bool:
        return "templated" in self.scorer.features

    def retarget(self, target_error: float, confidence: float | None = None) -> HitGate:
        """The same scorer with the threshold certified for ``target_error`` on the stored
        calibration pairs (``choose_threshold``; imports scipy). Each target is its own test
        with its own guarantee. A gate saved without its calibration cannot be retargeted."""
        if self.calibration is None:
            raise ValueError("this gate carries no calibration pairs: refit it (fit_gate) for another target")
        conf = self.threshold.confidence if confidence is None else confidence
        return replace(self, threshold=self.calibration.threshold(target_error, conf))

    def check(self, query: str, stored: str, cosine: float) -> tuple[bool, float]:
        """``accepts(text_features(query, stored, cosine))``: the whole decision for one candidate."""
        return self.accepts(text_features(query, stored, cosine))

    def to_json(self) -> dict[str, Any]:
        doc = {
            "format": GATE_FORMAT,
            "format_version": GATE_FORMAT_VERSION,
            "version": self.version,
            "fitted_on": self.fitted_on,
            "created_at": self.created_at,
            "scorer": self.scorer.to_json(),
            "threshold": self.threshold.to_json(),
        }
        if self.calibration is not None:
            doc["calibration"] = self.calibration.to_json()
        return doc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the gate as JSON, atomically (``milliwatt.files.write_atomic``: a reader never sees half a file)."""
        write_atomic(Path(path), (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HitGate:
        """Read a gate file; anything untrustworthy raises ``ConfigError`` whose ``where`` is the path."""
        return cls.from_json(read_json_file(path, "cache gate"), where=str(path))

    @classmethod
    def from_json(cls, doc: Any, *, where: str = "cache gate") -> HitGate:
        scorer, threshold, calibration = read_gate_document(
            doc, where, what="cache gate", format=GATE_FORMAT, format_version=GATE_FORMAT_VERSION,
            version_key="version", version=EVIDENCE_VERSION,
        )  # fmt: skip
        unknown = [f for f in scorer.features if f not in ALL_FEATURES]
        if unknown:
            raise ConfigError(where, f"unknown features {', '.join(unknown)} (this milliwatt computes {', '.join(ALL_FEATURES)})")
        return cls(scorer, threshold, doc["version"], doc["fitted_on"], doc["created_at"], calibration)


def default_gate() -> HitGate:
    """The gate shipped with milliwatt (``cache/gates/qqp_text.json``); see its ``fitted_on``."""
    return HitGate.load(DEFAULT_GATE)


def load_gate(path: str | os.PathLike[str] | None, max_wrong: float) -> HitGate:
    """The gate of ``path`` (None: the shipped one) with its threshold certified for ``max_wrong``.

    A gate certified for another share is re-certified on the calibration pairs it carries
    (``HitGate.retarget``, which imports scipy); one without them cannot be, and is refused.
    """
    where = str(DEFAULT_GATE if path is None else path)
    gate = HitGate.load(where)
    if math.isclose(gate.threshold.target_error, max_wrong, rel_tol=0, abs_tol=1e-12):
        return gate
    if gate.calibration is None:
        raise ConfigError(
            where,
            f"the gate is certified for {gate.threshold.target_error:g} wrong hits, cache.max_wrong is {max_wrong:g}, "
            "and it carries no calibration pairs to re-certify: refit it with that target",
        )
    try:
        return gate.retarget(max_wrong)
    except ValueError as e:
        raise ConfigError("cache.max_wrong", str(e)) from None


def fit_gate(
    rows: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    *,
    target_error: float = 0.02,
    confidence: float = DEFAULT_CONFIDENCE,
    fitted_on: str,
    calibration_share: float = 0.5,
    seed: int = 0,
    features: Sequence[str] = FEATURES,
    split: tuple[Sequence[int], Sequence[int]] | None = None,
) -> HitGate:
    """Fit a gate on labelled candidates: ``rows`` of ``text_features``, ``labels`` True when
    serving the candidate would have been right.

    The rows are split at random (``seed``): ``1 - calibration_share`` fits the scorer, the
    rest certifies the threshold, so the threshold's bound is computed on rows the scorer never
    saw (the exchangeability the bound needs would not hold for rows it was fitted to). The
    rows should be the candidates the gate will judge in service (e.g. the nearest stored
    question that passed the exact guards), drawn like the traffic it will serve.

    ``split`` = (indices to fit on, indices to certify on) replaces the random split when rows
    are not independent one by one (e.g. candidates of one conversation, which must all sit on
    one side); ``calibration_share`` and ``seed`` are then unused.
    """
    if len(rows) != len(labels):
        raise ValueError(f"rows and labels differ in length: {len(rows)} vs {len(labels)}")
    if split is None:
        split = split_indices(len(rows), calibration_share, seed)
        if split is None:
            raise ValueError(f"calibration_share must leave rows on both sides, got {calibration_share} of {len(rows)} rows")
    fit_idx, cal_idx = [int(i) for i in split[0]], [int(i) for i in split[1]]
    if not fit_idx or not cal_idx or set(fit_idx) & set(cal_idx):
        raise ValueError("split must give two disjoint, non-empty sets of row indices")
    scorer = fit_logistic([rows[i] for i in fit_idx], [bool(labels[i]) for i in fit_idx], features=features)
    # Scored by the serving function itself, so a served score equals a calibration score at ties.
    scores = [scorer.score(rows[i]) for i in cal_idx]
    return certify(scorer, scores, [bool(labels[i]) for i in cal_idx], target_error=target_error, confidence=confidence, fitted_on=fitted_on)


def certify(
    scorer: LogisticScorer,
    scores: Sequence[float],
    correct: Sequence[bool],
    *,
    target_error: float,
    confidence: float = DEFAULT_CONFIDENCE,
    fitted_on: str,
) -> HitGate:
    """A gate of ``scorer`` whose threshold is certified on held-out ``scores`` (the scorer's
    own scores of examples it was not fitted on) and whether serving each was right.

    For callers whose served candidate depends on the scorer (the tier serves the best-scored
    of several candidates): score each held-out case's candidates, keep the one that would be
    served, and certify on those, so the bound is on the population the gate will face.
    """
    calibration = Calibration(tuple(float(s) for s in scores), tuple(bool(c) for c in correct))
    threshold = calibration.threshold(target_error, confidence)
    created = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    return HitGate(scorer, threshold, EVIDENCE_VERSION, fitted_on, created, calibration)


def split_indices(n: int, calibration_share: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit indices, calibration indices), a seeded random split; None if a side would be empty."""
    if n < 2 or not 0 < calibration_share < 1:
        return None
    n_cal = round(n * calibration_share)
    if not 0 < n_cal < n:
        return None
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])
