"""Plot the cache's curves from the two benchmarks' JSON, for docs/benchmarks.md.

    .venv/bin/python benchmarks/plot_cache_curves.py --qqp qqp_bench.json --tau tau_cache_bound.json --out docs/images

* ``cache-qqp-curve.png``: recall against the share of wrong hits on the Quora report half,
  for the gate's score and for plain cosine swept over their thresholds, with the gate at each
  certified δ and GPTCache's default as points;
* ``cache-tau-curve.png``: agreeing answers against the share wrong on each held-out tau half,
  its steps served by the other half's scorer as the threshold loosens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def qqp(doc: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, label in (("gate_score", "gate score, swept"), ("cosine", "cosine, swept")):
        pts = doc["curves"][name]
        ax.plot([p["false_hit_share"] * 100 for p in pts], [p["recall"] * 100 for p in pts], label=label)
    certified = [m for m in doc["milliwatt"] if m["false_hit_share"] is not None]
    ax.scatter([m["false_hit_share"] * 100 for m in certified], [m["recall"] * 100 for m in certified], color="black", zorder=3, label="gate at δ 2 / 5 / 10%")
    g = doc["gptcache"].get("default") if isinstance(doc.get("gptcache"), dict) else None
    if g:
        ax.scatter([g["false_hit_share"] * 100], [g["recall"] * 100], marker="x", color="red", zorder=3, label="GPTCache 0.1.44 default")
    ax.set_xlabel("wrong hits, % of judged hits")
    ax.set_ylabel("recall, % of duplicate pairs")
    ax.set_xlim(0, 50)
    ax.set_title("Quora pairs, report half")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "cache-qqp-curve.png", dpi=110)


def tau(doc: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in doc["curve"].items():
        pts = [(a, w) for _, a, w in pts if a + w]
        ax.plot([w / (a + w) * 100 for a, w in pts], [a for a, _ in pts], marker=".", label=name)
    ax.set_xlabel("wrong, % of cache answers")
    ax.set_ylabel("agreeing cache answers")
    ax.set_title("tau airline, held-out half by the other half's scorer")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "cache-tau-curve.png", dpi=110)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--qqp", required=True, help="JSON of `milliwatt cache bench`")
    p.add_argument("--tau", required=True, help="JSON of benchmarks/tau_cache_bound.py")
    p.add_argument("--out", default="docs/images")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    qqp(json.loads(Path(args.qqp).read_text()), out)
    tau(json.loads(Path(args.tau).read_text()), out)
