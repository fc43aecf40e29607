"""The local tier's calibrated gate on held-out traffic: precision and coverage of accepted answers.

    .venv/bin/milliwatt replay ../shared/data/bfcl/simple_python.jsonl \\
      --answers ../shared/data/bfcl/simple_python_answers.jsonl --config benchmarks/bfcl_observe.yaml --ledger simple.db
    .venv/bin/milliwatt replay ../shared/data/bfcl/multiple.jsonl \\
      --answers ../shared/data/bfcl/multiple_answers.jsonl --config benchmarks/bfcl_observe.yaml --ledger multiple.db
    .venv/bin/python benchmarks/local_gate.py simple.db multiple.db [--json out.json]

With benchmarks/bfcl_observe.yaml the local model answers every step and accepts none, so every
answer is judged by the replay (``evidence.quality``). Several ledgers are pooled.

The sessions are split in two halves (seeded). ``milliwatt calibrate``'s fit runs on
the first half only (it splits that half again: scorer on one part, threshold certified on
the other); the gate is then applied to the answers of the second half, which neither step
saw. Reported per precision target: the accepted share (coverage) and the share of accepted
answers that agree (precision), with the Clopper-Pearson interval of the latter; beside them,
the fixed gate of today (10th-percentile token probability >= 0.5) on the same half.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from milliwatt.calibration import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    split_sessions,
)
from milliwatt.ledger import ledger_steps
from milliwatt.local_features import FEATURES_VERSION
from milliwatt.local_gate import LabelledAnswer, fit_local_gate, labelled_answers

TARGETS = (0.98, 0.95, 0.90, 0.80, 0.70, 0.60)


def precision(accepted: list[LabelledAnswer]) -> dict[str, Any]:
    n, wrong = len(accepted), sum(not a.right for a in accepted)
    return {
        "accepted": n,
        "right": n - wrong,
        "precision": (n - wrong) / n if n else None,
        # 95% two-sided interval of the precision (each side one-sided at 97.5%)
        "precision_low": 1 - clopper_pearson_upper(wrong, n, 0.975) if n else None,
        "precision_high": 1 - clopper_pearson_lower(wrong, n, 0.975) if n else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ledger", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)

    steps = [s for ledger in args.ledger for s in ledger_steps(ledger)]
    answers, unlabelled = labelled_answers(steps)
    would = {}  # the fixed gate's verdict on each answer, as the observing replay recorded it
    source = {}  # the ledger each session came from
    for ledger in args.ledger:
        for s in ledger_steps(ledger):
            source[s["session_id"] or s["id"]] = Path(ledger).stem
            for a in s["attempts"]:
                if a["tier"] == "local" and a.get("evidence") and "would_accept" in a["evidence"]:
                    would[s["session_id"] or s["id"]] = a["evidence"]["would_accept"]
    if not answers:
        raise SystemExit(f"no labelled local answers of features {FEATURES_VERSION} in {', '.join(args.ledger)}: replay with benchmarks/bfcl_observe.yaml")
    report_half = split_sessions({a.session for a in answers}, 0.5, args.seed)
    fit_half = [a for a in answers if a.session not in report_half]
    report = [a for a in answers if a.session in report_half]
    rows = []
    fixed = [a for a in report if would.get(a.session)]
    rows.append({"gate": "fixed: q10 >= 0.5 (today)", "coverage": len(fixed) / len(report), **precision(fixed)})
    for target in TARGETS:
        gate = fit_local_gate(fit_half, precision=target, seed=args.seed, fitted_on=", ".join(Path(x).name for x in args.ledger) + ", first half")
        accepted = [a for a in report if gate.accepts(a.features)[0]]
        t = gate.threshold
        rows.append({
            "gate": f"calibrated, precision {target:.0%}", "target": target, "threshold": t.score,
            "certified_on": len(gate.calibration.scores), "certified_accepted": t.accepted, "certified_upper_error": t.upper,
            "coverage": len(accepted) / len(report), **precision(accepted),
            "by_ledger": {name: precision([a for a in accepted if source[a.session] == name]) for name in set(source.values())},
        })  # fmt: skip
    right = {name: [a.right for a in answers if source[a.session] == name] for name in dict.fromkeys(source.values())}
    for name, verdicts in right.items():
        print(f"{name}: {sum(verdicts)} of {len(verdicts)} local answers right ({sum(verdicts) / max(len(verdicts), 1):.1%})")
    for r in rows:
        prec = "-" if r["precision"] is None else f"{r['precision']:.1%} [{r['precision_low']:.1%}, {r['precision_high']:.1%}]"
        print(f"{r['gate']:34s} coverage {r['coverage']:6.1%}  accepted {r['accepted']:>4}  precision {prec}")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "ledgers": args.ledger, "seed": args.seed, "answers": len(answers), "unlabelled": unlabelled,
        "right_by_ledger": {name: {"right": sum(v), "answers": len(v)} for name, v in right.items()},
        "fit_half": len(fit_half), "report_half": len(report), "rows": rows,
    }  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
