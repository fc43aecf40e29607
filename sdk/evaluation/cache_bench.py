"""``milliwatt cache bench``: how often the cache's hits are wrong, and how many right ones it keeps.

A question-pair file (JSONL: ``text_a``, ``text_b``, ``label`` 1 duplicate / 0 not, e.g. Quora
Question Pairs) is replayed as one agent's first user turns: every ``text_a`` is stored in one
scope, every ``text_b`` is asked. A hit is judged by the question stored under the answer it
returned: right when that question is the query itself (after normalising case and
punctuation) or some pair of the file labels the two duplicates, wrong when some pair labels
them non-duplicates, otherwise unjudged (counted apart, left out of the wrong share).

The pairs are split at random (``--seed``) into a calibration half and a report half; each
half's cache holds only that half's ``text_a``. The calibrated gate is fitted on the
calibration half (``fit_half_gate``: scorer on one part of its questions, threshold certified
on the other) and every figure is measured on the report half, so nothing reported was seen
by the fit. Compared on the same report half:

1. milliwatt's calibrated gate at each ``--target`` share of wrong hits;
2. a plain cosine threshold sweep (with the literal guard), and for each gate the cosine
   threshold that, chosen in hindsight on the report half itself, gives the most recall at no
   more wrong hits than the gate: a baseline that favours cosine;
3. GPTCache 0.1.44's default semantic cache (``init_similar_cache``: sqlite + faiss,
   ``SearchDistanceEvaluation``, similarity_threshold 0.8) with its ONNX model swapped for the
   same MiniLM vectors, run through its own ``put``/``get``; skipped, with the pip command,
   when the package is not installed.

For speed the texts are embedded in batches and searched with a FAISS ``IndexFlatIP`` (what a
cache partition is), but the decision is the tier's (tier.py): of the ``SEARCH_K`` nearest
stored questions, those with the same literals (``literal_tokens``) are scored by
``HitGate.check`` (``gate.accepts(text_features(query, stored, cosine))``), and the
best-scored one is served if the gate accepts it. Lookup latency is measured on a sample of
real ``CacheTier.attempt`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from milliwatt.errors import ConfigError

DEFAULT_TARGETS = (0.02, 0.05, 0.10)
DEFAULT_REPEATS = 10  # other splits: one split's gate is one draw of the calibration data
# Of the calibration half's questions, the share that certifies the threshold (the rest fit the
# scorer). A 14-weight logistic model is fitted well on a few hundred examples, while the bound
# tightens with every certifying example, so most go to certifying. On 20 other splits of QQP
# (seeds 101-120) 0.7 served more than 0.5 at every target, calibrated cosine alike.
DEFAULT_CERTIFY_SHARE = 0.7
COSINE_GRID = tuple(round(0.80 + 0.01 * i, 2) for i in range(20)) + (0.995,)
GPTCACHE_VERSION = "0.1.44"
GPTCACHE_INSTALL = f"pip install 'gptcache=={GPTCACHE_VERSION}'  (or: pip install 'milliwatt[cache-bench]')"
CURVE_POINTS = 100  # points per recall / wrong-share curve: enough to plot, small enough to read
EMBED_BATCH = 512


# ---------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pairs", help="question pairs, JSONL: text_a, text_b, label (1 duplicate, 0 not)")
    p.add_argument("--limit", type=int, help="use only the first N pairs")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    p.add_argument("--target", type=float, nargs="+", default=list(DEFAULT_TARGETS),
                   help="shares of wrong hits to calibrate the gate for (default: 0.02 0.05 0.10)")  # fmt: skip
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of each gate's bound (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split into calibration and report halves")
    p.add_argument("--certify-share", type=float, default=DEFAULT_CERTIFY_SHARE,
                   help=f"share of the calibration half's questions that certify the threshold; the rest fit the scorer (default {DEFAULT_CERTIFY_SHARE})")  # fmt: skip
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help=f"also refit and report the gate on this many other splits (seeds after --seed), to show the spread (default {DEFAULT_REPEATS})")  # fmt: skip
    p.add_argument("--calibrate-half", action="store_true",
                   help="also save the gate fitted on the calibration half (first --target) to --gate-out")  # fmt: skip
    p.add_argument("--gate-out", default="qqp_text.json", help="where --calibrate-half writes the gate")
    p.add_argument("--skip-gptcache", action="store_true", help="do not run the GPTCache comparison")
    p.add_argument("--latency-sample", type=int, default=200, help="CacheTier.attempt calls to time (0: none)")


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 2:
        raise ConfigError("--limit", f"must be at least 2 (one pair per half), got {args.limit}")
    if not all(0 < t < 1 for t in args.target):
        raise ConfigError("--target", f"each target must be in (0, 1), got {args.target}")
    if not 0 < args.certify_share < 1:
        raise ConfigError("--certify-share", f"must be in (0, 1), got {args.certify_share}")
    if args.repeats < 0:
        raise ConfigError("--repeats", f"must be >= 0, got {args.repeats}")
    result = bench(
        args.pairs,
        limit=args.limit,
        targets=tuple(args.target),
        confidence=args.confidence,
        seed=args.seed,
        certify_share=args.certify_share,
        repeats=args.repeats,
        gate_out=args.gate_out if args.calibrate_half else None,
        gptcache=not args.skip_gptcache,
        latency_sample=args.latency_sample,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(format_result(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------- data


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    duplicate: bool


def load_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read the pairs file: {e.strerror or e}") from None
    pairs: list[Pair] = []
    for n, line in enumerate(lines, 1):
        if limit is not None and len(pairs) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append(Pair(str(row["text_a"]), str(row["text_b"]), int(row["label"]) == 1))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}:{n}", f"expected a JSON object with text_a, text_b and label: {e}") from None
    if len(pairs) < 2:
        raise ConfigError(str(path), f"need at least 2 pairs, found {len(pairs)}")
    return pairs


def split_halves(pairs: Sequence[Pair], seed: int) -> tuple[list[Pair], list[Pair]]:
    """(calibration half, report half): a seeded random split of the pairs."""
    perm = np.random.default_rng(seed).permutation(len(pairs))
    half = len(pairs) // 2
    return [pairs[i] for i in sorted(perm[:half])], [pairs[i] for i in sorted(perm[half:])]


class Judge:
    """Whether serving the answer stored under ``stored`` to ``query`` is right, by the file's labels."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        from milliwatt.cache.evidence import normalize_text

        self._norm = normalize_text
        self._labels: dict[tuple[str, str], set[bool]] = {}
        for p in pairs:
            a, b = normalize_text(p.a), normalize_text(p.b)
            self._labels.setdefault((a, b), set()).add(p.duplicate)
            self._labels.setdefault((b, a), set()).add(p.duplicate)

    def verdict(self, query: str, stored: str) -> bool | None:
        q, s = self._norm(query), self._norm(stored)
        if q == s:
            return True
        seen = self._labels.get((q, s))
        if not seen:
            return None
        return True in seen  # some pair says duplicates: right, even if another pair disagrees


@dataclass
class Query:
    """An asked question and the stored questions the tier would consider for it: the
    ``SEARCH_K`` nearest of its half by cosine that pass the literal guard, nearest first."""

    text: str
    options: list[tuple[str, float, dict[str, float]]]  # stored text, cosine, text_features
    nearest: tuple[str, float]  # before the guard, for the record


@dataclass
class Candidate:
    """The stored question whose answer a rule would serve for ``query``, and the file's verdict."""

    query: str
    stored: str
    cosine: float
    verdict: bool | None


def embed_all(texts: Sequence[str], embedder: Any, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    unique = list(dict.fromkeys(texts))
    out: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for i in range(0, len(unique), EMBED_BATCH):
        chunk = unique[i : i + EMBED_BATCH]
        vecs, _ = embedder.encode(chunk)
        out.update(zip(chunk, vecs, strict=True))
        log(f"embedded {len(out)}/{len(unique)} texts ({time.perf_counter() - t0:.0f} s)")
    return out


def neighbours(half: Sequence[Pair], vectors: dict[str, np.ndarray]) -> tuple[list[Query], list[str]]:
    """Every text_b of the half against the half's text_a in one index (one scope, one
    partition): its nearest, and the guarded ones among the tier's ``SEARCH_K``."""
    import faiss
    from milliwatt.cache import literal_tokens
    from milliwatt.cache.evidence import text_features
    from milliwatt.cache.tier import SEARCH_K

    stored = list(dict.fromkeys(p.a for p in half))  # a repeated question is one entry's text
    index = faiss.IndexFlatIP(len(next(iter(vectors.values()))))
    index.add(np.stack([vectors[t] for t in stored]))
    sims, ids = index.search(np.stack([vectors[p.b] for p in half]), min(SEARCH_K, len(stored)))
    lits = [literal_tokens(t.strip()) for t in stored]
    out = []
    for p, row_s, row_i in zip(half, sims, ids, strict=True):
        q_lits = literal_tokens(p.b.strip())
        options = [
            (stored[j], float(sim), text_features(p.b, stored[j], float(sim)))  # as tier.py computes them
            for sim, j in zip(row_s, row_i, strict=True)
            if j >= 0 and lits[j] == q_lits
        ]
        out.append(Query(p.b, options, (stored[int(row_i[0])], float(row_s[0]))))
    return out, stored


def cosine_choice(q: Query) -> tuple[str, float] | None:
    """What the cosine-threshold tier considered: the nearest guarded stored question."""
    return q.options[0][:2] if q.options else None


def gate_choice(gate: Any, q: Query) -> tuple[bool, float, str, float] | None:
    """What the gated tier serves (tier.py): every guarded option scored by
    ``gate.accepts(text_features(query, stored, cosine))``, the best score first (the nearest
    on ties), served if accepted. Returns (served, score, stored, cosine) of the best-scored."""
    best = None
    for stored, cos, features in q.options:
        ok, score = gate.accepts(features)
        if best is None or score > best[1]:
            best = (ok, score, stored, cos)
    return best


# ---------------------------------------------------------------------- metrics


def tally(cands: Sequence[Candidate | None], hits: Sequence[bool], duplicates: int) -> dict[str, Any]:
    served = [c for c, h in zip(cands, hits, strict=True) if h and c is not None]
    right = sum(1 for c in served if c.verdict is True)
    wrong = sum(1 for c in served if c.verdict is False)
    return {
        "hits": len(served),
        "right": right,
        "wrong": wrong,
        "unjudged_hits": len(served) - right - wrong,
        "recall": _r(right / duplicates) if duplicates else None,
        "false_hit_share": _r(wrong / (right + wrong)) if right + wrong else None,
    }


def full_curve(values: Sequence[float | None], cands: Sequence[Candidate | None], duplicates: int) -> list[dict[str, float]]:
    """Recall and share of wrong hits with each distinct value of ``values`` as the threshold,
    strictest first (judged candidates only: unjudged hits move neither)."""
    judged = sorted(
        ((v, c.verdict) for v, c in zip(values, cands, strict=True) if c is not None and v is not None and c.verdict is not None),
        key=lambda x: -x[0],
    )
    out, right, wrong = [], 0, 0
    for i, (v, ok) in enumerate(judged):
        right += ok
        wrong += not ok
        if i + 1 == len(judged) or judged[i + 1][0] != v:
            out.append({"threshold": v, "recall": right / max(duplicates, 1), "false_hit_share": wrong / (right + wrong)})
    return out


def thin(points: Sequence[dict[str, float]], n: int = CURVE_POINTS) -> list[dict[str, float]]:
    """About ``n`` evenly spaced points of a curve, rounded: enough to plot it."""
    keep = range(len(points)) if len(points) <= n else sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [{k: _r(points[i][k], 6 if k == "threshold" else 4) for k in points[i]} for i in keep]


def best_at(points: Sequence[dict[str, float]], max_share: float) -> dict[str, float] | None:
    """The point with the most recall whose share of wrong hits is <= ``max_share``."""
    ok = [p for p in points if p["false_hit_share"] <= max_share]
    return max(ok, key=lambda p: p["recall"]) if ok else None


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


def _ms(xs: Sequence[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50": _r(statistics.median(xs) * 1e3, 3), "p95": _r(xs[round(0.95 * (len(xs) - 1))] * 1e3, 3), "n": len(xs)}


# ---------------------------------------------------------------------- the run


def bench(
    path: str | Path,
    *,
    limit: int | None = None,
    targets: Sequence[float] = DEFAULT_TARGETS,
    confidence: float = 0.95,
    seed: int = 0,
    certify_share: float = DEFAULT_CERTIFY_SHARE,
    repeats: int = 0,
    gate_out: str | Path | None = None,
    gptcache: bool = True,
    latency_sample: int = 200,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Run the whole comparison; returns the JSON-ready result (see the module docstring)."""
    from milliwatt.cache import Embedder
    from milliwatt.cache.embedder import MODEL_NAME
    from milliwatt.cache.evidence import EVIDENCE_VERSION
    from milliwatt.cache.tier import SEARCH_K

    started = time.perf_counter()
    pairs = load_pairs(path, limit)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    cal, rep = split_halves(pairs, seed)
    judge = Judge(pairs)
    embedder = Embedder()
    vectors = embed_all([t for p in pairs for t in (p.a, p.b)], embedder, log)
    cal_q, _ = neighbours(cal, vectors)
    rep_q, rep_stored = neighbours(rep, vectors)
    duplicates = sum(p.duplicate for p in rep)
    fitted_on = (
        f"{Path(path).name} (sha256 {digest[:16]}, {len(pairs)} pairs{'' if limit is None else f', first {limit}'}): "
        f"calibration half of a seeded split (seed {seed}, {len(cal)} pairs), its text_a stored in one scope and "
        f"each text_b asked; its questions split (seed {seed}, {certify_share:g} to certify): the scorer fitted on "
        f"the nearest stored question passing the literal guard, the threshold certified on the best-scored of the "
        f"{SEARCH_K} nearest passing it (what the tier serves); judged by the file's labels; text features only "
        f"({EVIDENCE_VERSION})"
    )
    base = fit_half_gate(cal_q, judge, targets[0], confidence, seed, fitted_on, certify_share)
    gates = [_gate_result(base, t, rep_q, judge, duplicates) for t in targets]
    # The same procedure with cosine as the only feature: a cosine threshold certified alike.
    cos_base = fit_half_gate(cal_q, judge, targets[0], confidence, seed, "cosine only", certify_share, ("cosine",))
    cos_gates = [_gate_result(cos_base, t, rep_q, judge, duplicates) for t in targets]

    cos_cands = [_chosen(q, cosine_choice(q), judge) for q in rep_q]
    cos_values = [c.cosine if c else None for c in cos_cands]
    cos_points = full_curve(cos_values, cos_cands, duplicates)
    for g in gates:
        if g.get("false_hit_share") is not None:
            g["cosine_same_share"] = _rounded(best_at(cos_points, g["false_hit_share"]))
        if "not_fitted" not in g:
            g["cosine_at_target"] = _rounded(best_at(cos_points, g["target"]))
    fitted = gates[0] if "gate" in gates[0] else None
    if gate_out is not None and fitted is not None:
        fitted["gate"].save(gate_out)
        log(f"saved the gate for target {fitted['target']} to {gate_out}")

    result: dict[str, Any] = {
        "pairs": len(pairs),
        "calibration_pairs": len(cal),
        "report_pairs": len(rep),
        "report_duplicates": duplicates,
        "headline": f"milliwatt gate at target {targets[0]} on the report half",
        "recall": gates[0].get("recall"),
        "false_hit_share": gates[0].get("false_hit_share"),
        "unjudged_hits": gates[0].get("unjudged_hits"),
        "settings": {
            "file": str(path),
            "sha256": digest,
            "limit": limit,
            "seed": seed,
            "targets": list(targets),
            "confidence": confidence,
            "certify_share": certify_share,
            "repeats": repeats,
            "embedding": MODEL_NAME,
            "search": f"FAISS IndexFlatIP over one half's distinct text_a (one scope), {SEARCH_K} nearest",
            "literal_guard": True,
            "decision": (
                "gate: best gate score among the guarded nearest, served if gate.accepts (as tier.py); "
                "cosine: the nearest guarded, served if cosine >= threshold (as the former tier)"
            ),
            "judging": (
                "right: same text after normalising case/punctuation, or some pair labels them duplicates; "
                "wrong: some pair labels them non-duplicates; else unjudged (left out of false_hit_share)"
            ),
        },
        "milliwatt": [{k: v for k, v in g.items() if k not in ("gate", "scores", "cands")} for g in gates],
        "cosine_calibrated": [{k: v for k, v in g.items() if k not in ("gate", "scores", "cands")} for g in cos_gates],
        "default_gate": _default_gate_result(rep_q, judge, duplicates, targets, digest, seed, limit),
        "cosine": [
            {"threshold": t, **tally(cos_cands, [v is not None and v >= t for v in cos_values], duplicates)} for t in COSINE_GRID
        ],
        "curves": {
            "cosine": thin(cos_points),
            "gate_score": thin(full_curve(fitted["scores"], fitted["cands"], duplicates)) if fitted else [],
        },
        "report_questions": {
            "asked": len(rep_q),
            "no_guarded_option": sum(not q.options for q in rep_q),
            "nearest_unjudged": sum(judge.verdict(q.text, q.nearest[0]) is None for q in rep_q),
        },
    }
    if repeats:
        result["splits"] = _other_splits(pairs, vectors, judge, targets, confidence, seed, certify_share, repeats, log)
    if fitted is not None:
        result["gate_us"] = _gate_timing(fitted["gate"], rep_q)
    result["gptcache"] = _gptcache_runs(rep, rep_stored, vectors, embedder, judge, duplicates, log) if gptcache else {"skipped": "--skip-gptcache"}
    result["lookup_ms"] = asyncio.run(_lookup_latency(rep_stored, rep, vectors, embedder, latency_sample)) if latency_sample > 0 else None
    result["wall_s"] = round(time.perf_counter() - started, 1)
    embedder.close()
    return result


def fit_half_gate(
    queries: Sequence[Query],
    judge: Judge,
    target: float,
    confidence: float,
    seed: int,
    fitted_on: str,
    certify_share: float = 0.5,
    features: Sequence[str] | None = None,
) -> Any:
    """The gate fitted on the calibration half, or why it could not be (a small --limit).

    Not ``fit_gate`` as is: the tier serves the best-scored of several candidates, so which
    candidate a held-out question contributes depends on the scorer. The questions are split
    first; the scorer is fitted on one part's nearest guarded candidates, then each question of
    the other part contributes the candidate the tier would serve, and that is what is
    certified (``certify``)."""
    from milliwatt.cache.evidence import FEATURES, certify, split_indices
    from milliwatt.calibration import fit_logistic

    split = split_indices(len(queries), certify_share, seed)
    if split is None:
        return f"{len(queries)} questions cannot be split in two"
    rows, labels = [], []
    for i in split[0]:
        q = queries[i]
        verdict = judge.verdict(q.text, q.options[0][0]) if q.options else None
        if verdict is not None:
            rows.append(q.options[0][2])
            labels.append(verdict)
    try:
        scorer = fit_logistic(rows, labels, features=features or FEATURES)
    except ValueError as e:  # too few rows, or one label only
        return f"{len(rows)} labelled candidates to fit on: {e}"
    scores, correct = [], []
    probe = _Unthresholded(scorer)
    for i in split[1]:
        choice = gate_choice(probe, queries[i])
        verdict = None if choice is None else judge.verdict(queries[i].text, choice[2])
        if verdict is not None:
            scores.append(choice[1])
            correct.append(verdict)
    return certify(scorer, scores, correct, target_error=target, confidence=confidence, fitted_on=fitted_on)


class _Unthresholded:
    """A gate with no threshold yet: ``gate_choice`` needs only the scores to rank options."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def accepts(self, features: dict[str, float]) -> tuple[bool, float]:
        return False, self.scorer.score(features)


def _other_splits(pairs, vectors, judge, targets, confidence, seed, certify_share, repeats, log) -> dict[str, Any]:
    """The gate refitted and reported on ``repeats`` other seeded splits: how much one split's
    figures owe to the draw, and how often a report half's wrong share exceeds the target
    (the bound is on the rate at 95% confidence, so some excess on a finite half is expected)."""
    per_target: dict[float, list[dict[str, Any]]] = {t: [] for t in targets}
    for s in range(seed + 1, seed + 1 + repeats):
        cal, rep = split_halves(pairs, s)
        cal_q, _ = neighbours(cal, vectors)
        rep_q, _ = neighbours(rep, vectors)
        duplicates = sum(p.duplicate for p in rep)
        base = fit_half_gate(cal_q, judge, targets[0], confidence, s, "split study", certify_share)
        cos_base = fit_half_gate(cal_q, judge, targets[0], confidence, s, "split study", certify_share, ("cosine",))
        cos_cands = [_chosen(q, cosine_choice(q), judge) for q in rep_q]
        cos_points = full_curve([c.cosine if c else None for c in cos_cands], cos_cands, duplicates)
        for t in targets:
            g = _gate_result(base, t, rep_q, judge, duplicates)
            c = _gate_result(cos_base, t, rep_q, judge, duplicates)
            row = {"seed": s, **{k: g.get(k) for k in ("hits", "recall", "false_hit_share", "not_fitted") if k in g}}
            row["cosine_calibrated_recall"] = c.get("recall")
            row["cosine_calibrated_false_hit_share"] = c.get("false_hit_share")
            if g.get("false_hit_share") is not None:
                same = best_at(cos_points, g["false_hit_share"])
                row["cosine_same_share_recall"] = _r(same["recall"]) if same else 0.0
            per_target[t].append(row)
        log(f"split {s}: refitted and reported")
    out = []
    for t, rows in per_target.items():
        served = [r for r in rows if r.get("hits")]
        out.append({
            "target": t,
            "splits": len(rows),
            "splits_serving": len(served),
            "mean_recall": _r(statistics.mean(r.get("recall") or 0.0 for r in rows)),
            "max_false_hit_share": max((r["false_hit_share"] for r in served), default=None),
            "splits_over_target": sum(1 for r in served if r["false_hit_share"] > t),
            "mean_cosine_same_share_recall": _r(statistics.mean(r.get("cosine_same_share_recall", 0.0) for r in rows)),
            "mean_cosine_calibrated_recall": _r(statistics.mean(r.get("cosine_calibrated_recall") or 0.0 for r in rows)),
            "per_split": rows,
        })  # fmt: skip
    return {"seeds": list(range(seed + 1, seed + 1 + repeats)), "targets": out}


def _chosen(q: Query, choice: tuple | None, judge: Judge) -> Candidate | None:
    if choice is None:
        return None
    stored, cos = choice[-2], choice[-1]
    return Candidate(q.text, stored, cos, judge.verdict(q.text, stored))


def _gate_result(base: Any, target: float, queries: Sequence[Query], judge: Judge, duplicates: int) -> dict[str, Any]:
    if isinstance(base, str):
        return {"target": target, "not_fitted": base}
    # One scorer for every target; each target certifies its own threshold on the same held-out rows.
    gate = base if base.threshold.target_error == target else base.retarget(target)
    choices = [gate_choice(gate, q) for q in queries]
    cands = [_chosen(q, ch, judge) for q, ch in zip(queries, choices, strict=True)]
    hits = [ch is not None and ch[0] for ch in choices]
    return {
        "target": target,
        "threshold": gate.threshold.to_json(),
        **tally(cands, hits, duplicates),
        "gate": gate,
        "scores": [None if ch is None else ch[1] for ch in choices],
        "cands": cands,
    }


def _default_gate_result(queries, judge, duplicates, targets, digest, seed, limit) -> dict[str, Any]:
    """The shipped gate (``default_gate()``) on the report half, retargeted to each target."""
    from milliwatt.cache.evidence import DEFAULT_GATE, default_gate

    try:
        gate = default_gate()
    except ConfigError as e:
        return {"skipped": str(e)}
    # Held out only if the shipped gate was fitted on the other half of this very split.
    held_out = limit is None and f"sha256 {digest[:16]}" in gate.fitted_on and f"(seed {seed}," in gate.fitted_on
    out: dict[str, Any] = {"file": DEFAULT_GATE.name, "fitted_on": gate.fitted_on, "report_half_held_out": held_out, "targets": []}
    for t in targets:
        if gate.threshold.target_error != t and gate.calibration is None:
            continue
        g = gate if gate.threshold.target_error == t else gate.retarget(t)
        choices = [gate_choice(g, q) for q in queries]
        cands = [_chosen(q, ch, judge) for q, ch in zip(queries, choices, strict=True)]
        hits = [ch is not None and ch[0] for ch in choices]
        out["targets"].append({"target": t, "threshold": g.threshold.to_json(), **tally(cands, hits, duplicates)})
    return out


def _gate_timing(gate: Any, queries: Sequence[Query]) -> dict[str, float]:
    """Microseconds per candidate of the gate's whole decision: features and score."""
    times = []
    for q in queries[:2000]:
        for stored, cos, _ in q.options[:1]:
            t = time.perf_counter()
            gate.check(q.text, stored, cos)
            times.append(time.perf_counter() - t)
    ms = _ms(times)
    return {"p50": _r(ms["p50"] * 1e3, 1), "p95": _r(ms["p95"] * 1e3, 1), "n": ms["n"]}


def _rounded(point: dict[str, float] | None) -> dict[str, float] | None:
    return None if point is None else thin([point])[0]


# ---------------------------------------------------------------------- lookup latency


async def _lookup_latency(stored: Sequence[str], half: Sequence[Pair], vectors: dict[str, np.ndarray], embedder: Any, n: int) -> dict[str, Any]:
    """Median and p95 of real ``CacheTier.attempt`` calls (embedding, FAISS search, guards) on a
    cache holding the report half's questions; each asked text is embedded fresh."""
    from milliwatt.cache import CacheTier
    from milliwatt.cache.key import step_key
    from milliwatt.cache.store import Entry
    from milliwatt.types import Step, StepMeta

    def step(text: str) -> Step:
        return Step.create([{"role": "system", "content": "You answer questions."}, {"role": "user", "content": text}], meta=StepMeta(tenant="bench"))

    tier = CacheTier(ttl_s=None, max_entries=len(stored) + 1, embedder=embedder)
    answer = {"role": "assistant", "content": "stored answer"}
    for text in stored:  # filled with the vectors already computed: the same entries remember() makes
        k = step_key(step(text))
        entry = Entry(id=0, scope=k.scope, history=k.history, tail=k.tail, text=k.text, literals=k.literals, message=answer, source="bench", created_at=0.0)
        tier.store.add(entry, vectors[text])
    stored_set = set(stored)
    asked = [t for t in dict.fromkeys(p.b for p in half) if t not in stored_set and t.strip()]
    rng = np.random.default_rng(0)
    sample = [asked[i] for i in sorted(rng.choice(len(asked), size=min(n, len(asked)), replace=False))]
    await tier.attempt(step(sample[0] + " warm-up"))  # the first call pays for thread start-up
    times = []
    for text in sample:
        t = time.perf_counter()
        await tier.attempt(step(text))
        times.append(time.perf_counter() - t)
    return {**_ms(times), "entries": len(stored), "what": "CacheTier.attempt, one at a time (2 ms batching window included)"}


# ---------------------------------------------------------------------- GPTCache


class _GptcacheMiniLM:
    """GPTCache's embedding hook (``to_embeddings`` and ``dimension``) serving the MiniLM
    vectors milliwatt computed, so both caches compare the very same embeddings; a text not
    seen before is encoded by the same model."""

    def __init__(self, vectors: dict[str, np.ndarray], embedder: Any) -> None:
        self.vectors = vectors
        self.embedder = embedder
        self.dimension = len(next(iter(vectors.values())))

    def to_embeddings(self, data: str, **_: Any) -> np.ndarray:
        vec = self.vectors.get(data)
        return vec if vec is not None else self.embedder.encode([data])[0][0]


def _gptcache_runs(half, stored, vectors, embedder, judge, duplicates, log) -> dict[str, Any]:
    try:
        import gptcache
    except ImportError:
        return {"skipped": f"gptcache is not installed: {GPTCACHE_INSTALL}"}
    with warnings.catch_warnings():  # its SQLAlchemy 1.x idioms warn under 2.x; not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        return _gptcache_both(gptcache, half, stored, vectors, embedder, judge, duplicates, log)


def _gptcache_both(gptcache, half, stored, vectors, embedder, judge, duplicates, log) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": getattr(gptcache, "__version__", "?"),
        "what": (
            "gptcache.adapter.api.init_similar_cache() defaults (sqlite + faiss IndexFlatL2 data manager, "
            "SearchDistanceEvaluation(max_distance=4.0), Config(similarity_threshold=0.8), temperature 0, top_k 1, "
            "in-memory LRU eviction of 1000 entries) with embedding=MiniLM vectors instead of its ONNX "
            "paraphrase-albert model (which would download); put(text_a, answer) for every stored question, "
            "get(text_b) for every asked one. A hit needs squared L2 distance <= 0.8, i.e. cosine >= 0.6 on "
            "unit vectors. No literal guard."
        ),
    }
    out["default"] = _gptcache_run(half, stored, vectors, embedder, judge, duplicates, max_size=None, log=log)
    out["no_eviction"] = _gptcache_run(half, stored, vectors, embedder, judge, duplicates, max_size=len(stored) + 1, log=log)
    return out


def _gptcache_run(half, stored, vectors, embedder, judge, duplicates, *, max_size: int | None, log) -> dict[str, Any]:
    from gptcache import Cache
    from gptcache.adapter.api import get, init_similar_cache, put
    from gptcache.manager import manager_factory

    folder = tempfile.mkdtemp(prefix="mw-gptcache-")
    # GPTCache registers an atexit hook that flushes its index into this folder; registered
    # first, this removal runs after it (atexit is last in, first out).
    atexit.register(shutil.rmtree, folder, True)
    emb = _GptcacheMiniLM(vectors, embedder)
    manager = None
    if max_size is not None:  # the same manager init_similar_cache builds, with a larger LRU
        manager = manager_factory("sqlite,faiss", data_dir=folder, vector_params={"dimension": emb.dimension}, eviction_params={"max_size": max_size})
    cache = Cache()
    init_similar_cache(data_dir=folder, cache_obj=cache, embedding=emb, data_manager=manager)
    t0 = time.perf_counter()
    for text in stored:
        put(text, text, cache_obj=cache)  # the answer is the question it was stored for: that judges the hit
    put_s = time.perf_counter() - t0
    cands: list[Candidate | None] = []
    times = []
    for p in half:
        t = time.perf_counter()
        answer = get(p.b, cache_obj=cache)
        times.append(time.perf_counter() - t)
        cands.append(None if answer is None else Candidate(p.b, answer, 0.0, judge.verdict(p.b, answer)))
    kept = cache.data_manager.v.count()
    cache.data_manager.close()
    log(f"gptcache ({'default' if max_size is None else 'no eviction'}): {len(stored)} put in {put_s:.0f} s, {len(half)} get")
    return {
        "entries_kept": int(kept),
        **tally(cands, [c is not None for c in cands], duplicates),
        "get_ms": {**_ms(times), "note": "precomputed embeddings: search, sqlite and evaluation only"},
    }


# ---------------------------------------------------------------------- text output


def format_result(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "   -  " if x is None else f"{100 * x:5.1f}%"

    lines = [
        (
            f"{r['pairs']} pairs: calibration half {r['calibration_pairs']}, report half {r['report_pairs']} "
            f"({r['report_duplicates']} duplicates); seed {r['settings']['seed']}"
        ),
        "",
        "on the report half               hits  unjudged  recall  wrong share",
    ]
    for g in r["milliwatt"]:
        name = f"milliwatt gate, target {g['target']:.2f}"
        if "not_fitted" in g:
            lines.append(f"{name:32s} not fitted: {g['not_fitted']}")
            continue
        lines.append(f"{name:32s} {g['hits']:5d}  {g['unjudged_hits']:8d}  {pct(g['recall'])}  {pct(g['false_hit_share'])}")
        same = g.get("cosine_same_share")
        if same:
            lines.append(f"  cosine >= {same['threshold']:.4f} (hindsight, no more wrong)   {pct(same['recall'])}  {pct(same['false_hit_share'])}")
    for g in r["cosine_calibrated"]:
        name = f"cosine calibrated, target {g['target']:.2f}"
        if "not_fitted" not in g:
            lines.append(f"{name:32s} {g['hits']:5d}  {g['unjudged_hits']:8d}  {pct(g['recall'])}  {pct(g['false_hit_share'])}")
    dg = r["default_gate"]
    for g in dg.get("targets", []):
        name = f"shipped gate, target {g['target']:.2f}"
        note = "" if dg["report_half_held_out"] else "   (not held out in this run)"
        lines.append(f"{name:32s} {g['hits']:5d}  {g['unjudged_hits']:8d}  {pct(g['recall'])}  {pct(g['false_hit_share'])}{note}")
    for c in r["cosine"]:
        lines.append(f"{'cosine >= ' + format(c['threshold'], '.3f'):32s} {c['hits']:5d}  {c['unjudged_hits']:8d}  {pct(c['recall'])}  {pct(c['false_hit_share'])}")
    gc = r["gptcache"]
    if "skipped" in gc:
        lines.append(f"GPTCache: skipped ({gc['skipped']})")
    else:
        for name in ("default", "no_eviction"):
            g = gc[name]
            lines.append(f"{'GPTCache ' + gc['version'] + ' ' + name:32s} {g['hits']:5d}  {g['unjudged_hits']:8d}  {pct(g['recall'])}  {pct(g['false_hit_share'])}")
    if r.get("splits"):
        lines.append(f"\nthe gate on {len(r['splits']['seeds'])} other splits")
        lines.append("target  serving  mean recall  calibrated cosine  hindsight cosine  max wrong share  over target")
        for t in r["splits"]["targets"]:
            lines.append(
                f"  {t['target']:.2f}    {t['splits_serving']:2d}/{t['splits']}       {pct(t['mean_recall'])}             {pct(t['mean_cosine_calibrated_recall'])}"
                f"            {pct(t['mean_cosine_same_share_recall'])}           {pct(t['max_false_hit_share'])}           {t['splits_over_target']}"
            )
    if r.get("lookup_ms"):
        lines.append(f"\nlookup: p50 {r['lookup_ms']['p50']:.1f} ms, p95 {r['lookup_ms']['p95']:.1f} ms over {r['lookup_ms']['n']} CacheTier.attempt calls")
    if r.get("gate_us"):
        lines.append(f"gate (features + score): p50 {r['gate_us']['p50']:.0f} us, p95 {r['gate_us']['p95']:.0f} us")
    lines.append(f"wall time {r['wall_s']:.0f} s")
    return "\n".join(lines)
