"""The cache's bound on wrong hits, on the tau airline replay, held out by task.

    .venv/bin/python benchmarks/tau_cache_bound.py [--targets 0.02 0.10] [--json OUT] [--work DIR]

Protocol (docs/benchmarks.md, "Cache: bounded wrong hits"):

1. The 100 trajectories (tasks 0-24, four trials each) are split by task: even task ids are
   half A, odd ones half B. A task's trials are alike, so a task never sits on both sides.
2. Each half is replayed with ``cache.observe: true``: the cache records every candidate it
   finds (exact and templated) with its features, and serves none.
3. ``milliwatt cache calibrate`` fits a gate on A's ledger for each bound δ, and one on B's.
4. B is replayed with A's gate and A with B's, at each δ: the cache serves what the gate
   accepts, and each served answer is judged against the recorded GPT-4o answer (tool calls
   exactly, text with the stricter text proxy).
5. The two held-out halves are summed: every figure comes from a gate that never saw the
   task it answered. The curve (agreeing answers against the share wrong) scores each half's
   observed candidates with the other half's scorer at every threshold.

Tiers: cache then remote (the replayed GPT-4o answers); the local model is left out so the
figures are the cache's alone (it answers ~1 tau step, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from milliwatt.cache.calibrate import calibrate, read_labelled
from milliwatt.ledger import ledger_steps
from milliwatt.evaluation.importers import load_trace
from milliwatt.evaluation.replay import replay

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tau_airline" / "trajectories.json"
CONFIG = ROOT / "benchmarks" / "tau_airline.yaml"


def _config(cache: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(CONFIG.read_text())
    return {**data, "tiers": ["cache", "remote"], "cache": {"path": None, **cache}}


def served_figures(ledger: Path) -> dict[str, Any]:
    """The cache's answers of a gated replay, judged: by kind of answer and templated or not."""
    out = {"steps": 0, "answers": 0, "agree": 0, "wrong": 0, "templated": 0, "tool_call": [0, 0], "text": [0, 0]}
    for s in ledger_steps(ledger):
        out["steps"] += 1
        if s["tier"] != "cache":
            continue
        out["answers"] += 1
        ok = bool(s["quality_agrees"])
        out["agree" if ok else "wrong"] += 1
        kind = "tool_call" if s["response"].get("tool_calls") else "text"
        out[kind][0 if ok else 1] += 1
        cache = next(a for a in s["attempts"] if a["tier"] == "cache")
        out["templated"] += any(c["served"] and c["templated"] for c in (cache["evidence"] or {}).get("candidates", []))
    out["wrong_share"] = out["wrong"] / out["answers"] if out["answers"] else 0.0
    return out


def curve(gate_ledger: Path, held_out: Path) -> list[tuple[float, int, int]]:
    """(threshold, agreeing, wrong) of the held-out half's observed steps, each served by its
    best candidate under the scorer fitted on the other half, for a sweep of thresholds."""
    gate, _ = calibrate(gate_ledger, target=0.5)  # only the scorer is used here
    best = [
        max(((gate.scorer.score(f), right) for f, right, _ in s.candidates), key=lambda x: x[0])
        for s in read_labelled(held_out).steps
    ]
    scores = sorted({round(sc, 3) for sc, _ in best}, reverse=True)
    points = []
    for t in scores[:: max(1, len(scores) // 60)]:
        kept = [ok for sc, ok in best if sc >= t]
        points.append((t, sum(kept), len(kept) - sum(kept)))
    return points


async def main(args: argparse.Namespace) -> dict[str, Any]:
    trace = load_trace(DATA)
    halves = {
        "A": [s for s in trace.steps if int(s.session.rsplit("task", 1)[-1]) % 2 == 0],
        "B": [s for s in trace.steps if int(s.session.rsplit("task", 1)[-1]) % 2 == 1],
    }
    work = Path(args.work or tempfile.mkdtemp(prefix="tau-cache-bound-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"protocol": __doc__.split("Protocol")[1].strip() if __doc__ else "", "halves": {}, "targets": {}}
    t0 = time.perf_counter()
    for name, steps in halves.items():
        ledger = work / f"observe-{name}.db"
        if not ledger.exists() or args.fresh:
            await replay(replace(trace, steps=steps), ledger=ledger, config=_config({"observe": True}))
        labelled = read_labelled(ledger)
        candidates = labelled.candidates
        result["halves"][name] = {
            "steps": len(steps),
            "steps_with_candidates": len(labelled.steps),
            "steps_with_a_right_candidate": sum(any(r for _, r, _ in s.candidates) for s in labelled.steps),
            "labelled_candidates": len(candidates),
            "right": sum(r for _, r, _ in candidates),
            "templated": sum(t for _, _, t in candidates),
        }
    for target in args.targets:
        per_half = {}
        for name, other in (("A", "B"), ("B", "A")):
            gate, _ = calibrate(work / f"observe-{other}.db", target=target)
            gate_path = work / f"gate-{other}-{target}.json"
            gate.save(gate_path)
            ledger = work / f"gated-{name}-{target}.db"
            await replay(replace(trace, steps=halves[name]), ledger=ledger, config=_config({"gate": str(gate_path), "max_wrong": target}))
            per_half[name] = {"gate": gate.threshold.to_json(), **served_figures(ledger)}
        total = {k: per_half["A"][k] + per_half["B"][k] for k in ("steps", "answers", "agree", "wrong", "templated")}
        total["tool_call"] = [per_half["A"]["tool_call"][i] + per_half["B"]["tool_call"][i] for i in (0, 1)]
        total["text"] = [per_half["A"]["text"][i] + per_half["B"]["text"][i] for i in (0, 1)]
        total["wrong_share"] = total["wrong"] / total["answers"] if total["answers"] else 0.0
        result["targets"][str(target)] = {"total": total, "halves": per_half}
        print(f"δ={target}: {total['answers']} cache answers, {total['agree']} agree, {total['wrong']} wrong "
              f"({total['wrong_share']:.1%}); templated {total['templated']}", file=sys.stderr)  # fmt: skip
    result["curve"] = {
        "B by A's scorer": curve(work / "observe-A.db", work / "observe-B.db"),
        "A by B's scorer": curve(work / "observe-B.db", work / "observe-A.db"),
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["work"] = str(work)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--targets", type=float, nargs="+", default=[0.02, 0.10])
    p.add_argument("--json", help="write the result here")
    p.add_argument("--work", help="folder for the ledgers and gates (default: a fresh temporary one)")
    p.add_argument("--fresh", action="store_true", help="replay the observe halves even if their ledgers exist")
    args = p.parse_args()
    out = asyncio.run(main(args))
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(json.dumps({k: v["total"] for k, v in out["targets"].items()}, indent=2))
