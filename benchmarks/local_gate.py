"""The local tier's calibrated gate on held-out traffic: precision and coverage of accepted answers.

    .venv/bin/milliwatt replay ../shared/data/bfcl/simple_python.jsonl \\
      --answers ../shared/data/bfcl/simple_python_answers.jsonl --config OBSERVE.yaml --ledger bfcl_observe.db
    .venv/bin/python benchmarks/local_gate.py bfcl_observe.db [--json out.json]

OBSERVE.yaml is benchmarks/bfcl.yaml plus ``local: {observe: true}``: the local model answers
every step and accepts none, so every answer is judged by the replay (``evidence.quality``).

The ledger's sessions are split in two halves (seeded). ``milliwatt calibrate``'s fit runs on
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

from milliwatt.calibration import clopper_pearson_lower, clopper_pearson_upper, split_sessions
from milliwatt.ledger import ledger_steps
from milliwatt.local_gate import LabelledAnswer, fit_local_gate, labelled_answers

TARGETS = (0.98, 0.95, 0.90, 0.80)


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
    p.add_argument("ledger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)

    steps = ledger_steps(args.ledger)
    answers, unlabelled = labelled_answers(steps)
    would = {}  # the fixed gate's verdict on each answer, as the observing replay recorded it
    for s in steps:
        for a in s["attempts"]:
            if a["tier"] == "local" and a.get("evidence") and "would_accept" in a["evidence"]:
                would[s["session_id"] or s["id"]] = a["evidence"]["would_accept"]
    report_half = split_sessions({a.session for a in answers}, 0.5, args.seed)
    fit_half = [a for a in answers if a.session not in report_half]
    report = [a for a in answers if a.session in report_half]
    rows = []
    fixed = [a for a in report if would.get(a.session)]
    rows.append({"gate": "fixed: q10 >= 0.5 (today)", "coverage": len(fixed) / len(report), **precision(fixed)})
    for target in TARGETS:
        gate = fit_local_gate(fit_half, precision=target, seed=args.seed, fitted_on=f"{Path(args.ledger).name}, first half")
        accepted = [a for a in report if gate.accepts(a.features)[0]]
        t = gate.threshold
        rows.append({
            "gate": f"calibrated, precision {target:.0%}", "target": target, "threshold": t.score,
            "certified_on": len(gate.calibration.scores), "certified_accepted": t.accepted, "certified_upper_error": t.upper,
            "coverage": len(accepted) / len(report), **precision(accepted),
        })  # fmt: skip
    for r in rows:
        prec = "-" if r["precision"] is None else f"{r['precision']:.1%} [{r['precision_low']:.1%}, {r['precision_high']:.1%}]"
        print(f"{r['gate']:34s} coverage {r['coverage']:6.1%}  accepted {r['accepted']:>4}  precision {prec}")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()} python {platform.python_version()}",
        "ledger": args.ledger, "seed": args.seed, "answers": len(answers), "unlabelled": unlabelled,
        "fit_half": len(fit_half), "report_half": len(report), "rows": rows,
    }  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
