"""The savings factor before and after the symmetry fixes, one fix at a time (docs/benchmarks.md).

    .venv/bin/python benchmarks/symmetry.py LEDGER [--json symmetry.json]

LEDGER is a replay's ledger (e.g. the tau airline one). It is recomputed (``milliwatt report
--recompute``'s machinery; the ledger is only read) with the 0.6 coefficients
(``mw-2026.11``), then with each change of ``mw-2026.12`` added in turn, so each row's
difference from the one above is that change's effect alone:

  0.6 method                 mw-2026.11: facility factors on the remote side only, cached
                             tokens charged in full, the cascade's measured latency used
  + facility for own tiers   server overhead x site PUE on CPU time as on the remote side
  + latency for neither      no measured latency on either side
  + prompt cache both sides  cached input tokens at their weight, the baseline's prefix too
  = mw-2026.12               the current set (the rows above should end on it)

Background work is in every row (it is stored, not computed by a coefficient); the report's
"steps only" factor shows it apart. The baseline's tokenizer is the frontier model's own in
both sets (o200k_base for gpt-4o: no change on these replays).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from milliwatt import coefficients
from milliwatt.coefficients import Coefficients, Flag, Latency
from milliwatt.meters import hardware
from milliwatt.reports.recompute import recomputed
from milliwatt.reports.summary import summarize


def variants() -> list[tuple[str, Coefficients]]:
    old, new = coefficients.load("mw-2026.11"), coefficients.current()
    facility = old.model_copy(update={"facility": old.facility.model_copy(update={
        "own_tiers": Flag(value=True, source="symmetry step"), "site_pue": new.facility.site_pue})})  # fmt: skip
    latency = facility.model_copy(update={"remote": facility.remote.model_copy(update={
        "latency": Latency(use_measured=False, source="symmetry step")})})  # fmt: skip
    cache = latency.model_copy(update={"prompt_cache": new.prompt_cache})
    return [
        ("0.6 method (mw-2026.11)", old),
        ("+ facility factors for own tiers", facility),
        ("+ measured latency for neither side", latency),
        ("+ prompt cache on both sides", cache),
        ("= mw-2026.12", new),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ledger")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for name, c in variants():
        with recomputed(args.ledger, c) as r:
            s = summarize(r.path)
        e, f = s["energy_wh"], s["savings_factor"]
        rows.append({"variant": name, "cascade_wh": e["cascade"], "baseline_wh": e["baseline"], "background_wh": e["background"],
                     "savings_factor": f, "savings_factor_steps_only": s["savings_factor_steps_only"],
                     "cost_usd": s["cost_usd"]})  # fmt: skip
        print(f"{name:40s} cascade {e['cascade']['point']:8.2f} Wh  baseline {e['baseline']['point']:8.2f} Wh  "
              f"factor {f['low']:.3f}x / {f['point']:.3f}x / {f['high']:.2f}x  "
              f"cost ${s['cost_usd']['cascade']:.2f} vs ${s['cost_usd']['baseline']:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "ledger": args.ledger,
                                               "machine": f"{platform.platform()}, {hardware()}", "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
