"""Precision and recall of cache hits at a few similarity thresholds, on Quora question pairs.

Not used to tune the default (the file is a check, not a training set): it reports how
often a hit at each threshold would be wrong, with and without the literal guard.

Two settings:

* ``pairwise``: each pair alone (text_a stored, text_b asked). A hit on a label-0 pair is a
  false hit.
* ``retrieval``: every text_a stored in one scope, each text_b asked against all of them, as a
  cache sees it. A hit is judged when the file says whether the nearest entry and the question
  are duplicates: the nearest is the question's own text_a (its label decides), the same
  string, or the other side of some labelled pair. Hits on unlabelled neighbours are counted
  apart (``unjudged``) and left out of precision.

Run: ``.venv/bin/python benchmarks/qqp_threshold.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from milliwatt.cache import Embedder, literal_tokens

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qqp" / "pairs.jsonl"
THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.95, 0.97)


def _table(sims: np.ndarray, correct: np.ndarray, judged: np.ndarray, guard: np.ndarray, positives: int) -> list[dict]:
    rows = []
    for t in THRESHOLDS:
        for guarded in (False, True):
            hit = sims >= t
            if guarded:
                hit &= guard
            n, good = int((hit & judged).sum()), int((hit & judged & correct).sum())
            rows.append(
                {
                    "threshold": t,
                    "literal_guard": guarded,
                    "hits": n,
                    "unjudged": int((hit & ~judged).sum()),
                    "precision": round(good / n, 4) if n else None,
                    "false_hit_rate": round(1 - good / n, 4) if n else None,
                    "recall": round(good / positives, 4),
                }
            )
    return rows


def run(limit: int | None = None) -> dict:
    with DATA.open() as f:
        pairs = [json.loads(line) for line in f][:limit]
    a = [p["text_a"] for p in pairs]
    b = [p["text_b"] for p in pairs]
    label = np.array([p["label"] == 1 for p in pairs])
    emb = Embedder()
    va = np.vstack([emb.encode(a[i : i + 64])[0] for i in range(0, len(a), 64)])
    vb = np.vstack([emb.encode(b[i : i + 64])[0] for i in range(0, len(b), 64)])
    lit_a = [literal_tokens(t) for t in a]
    lit_b = [literal_tokens(t) for t in b]

    pair_sims = np.einsum("ij,ij->i", va, vb)
    pair_guard = np.array([x == y for x, y in zip(lit_a, lit_b, strict=True)])

    import faiss

    index = faiss.IndexFlatIP(va.shape[1])
    index.add(va)
    sims, nn = index.search(vb, 1)
    nearest = nn[:, 0]
    labels = {}
    for p in pairs:
        labels[(p["text_a"], p["text_b"])] = labels[(p["text_b"], p["text_a"])] = p["label"] == 1
    verdict = []  # True / False where the file says, None where it does not
    for i, j in enumerate(nearest):
        if i == j:
            verdict.append(bool(label[i]))
        elif a[j] == b[i]:
            verdict.append(True)
        else:
            verdict.append(labels.get((b[i], a[j])))
    judged = np.array([v is not None for v in verdict])
    correct = np.array([bool(v) for v in verdict])
    retr_guard = np.array([lit_b[i] == lit_a[j] for i, j in enumerate(nearest)])

    return {
        "pairs": len(pairs),
        "duplicates": int(label.sum()),
        "pairwise": _table(pair_sims, label, np.ones(len(pairs), dtype=bool), pair_guard, int(label.sum())),
        "retrieval": _table(sims[:, 0], correct, judged, retr_guard, int(label.sum())),
    }


if __name__ == "__main__":
    result = run()
    print(f"{result['pairs']} pairs, {result['duplicates']} duplicates")
    for setting in ("pairwise", "retrieval"):
        print(f"\n{setting}\nthreshold guard  hits  unjudged  precision  false-hit  recall")
        for r in result[setting]:
            print(
                f"{r['threshold']:.2f}      {'yes' if r['literal_guard'] else 'no '}  {r['hits']:5d}  {r['unjudged']:8d}  "
                f"{r['precision'] or 0:9.3f}  {r['false_hit_rate'] or 0:9.3f}  {r['recall']:6.3f}"
            )
