"""What keeping the books costs per step, on real agent traffic (docs/benchmarks.md, "Accounting").

    .venv/bin/python benchmarks/accounting_overhead.py [--json accounting.json] [--limit N]

Runs ``Accountant.record`` over the tau-bench airline steps in trace order, each with the two
attempts a typical escalated step has (a CPU tier that passed, a remote answer), as the
cascade calls it once the step's tokens are counted: the baseline's tokens (memoised), its
prompt-cache prefix, the remote attempt priced with its cached prefix, the background work
drained, the record built. Two passes: the first tokenises every message once (what a step's
new messages cost), the second is the steady state (every message seen before: an agent
resends its context). Reported per step in microseconds, p50 / p95 / mean, beside the same
figures for the 0.6 books (``--coefficients mw-2026.11`` and no prefix tracking is not a
separate code path, so the ratio is against the record alone without the new parts: see
``bare``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from milliwatt.accounting import Accountant
from milliwatt.energy import RemoteEnergyModel, cpu_energy
from milliwatt.evaluation.importers import load_trace
from milliwatt.evaluation.trim_bench import as_step
from milliwatt.meters import hardware
from milliwatt.types import Attempt

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tau_airline"
MODEL = "openai/gpt-4o"


def run(limit: int | None) -> dict:
    trace = load_trace(DATA / "trajectories.json", tools=DATA / "tools.json")
    steps = [(as_step(s), s.answer) for s in trace.steps[:limit]]
    accountant = Accountant(MODEL)
    remote = RemoteEnergyModel()
    out: dict = {}
    for name in ("first pass (tokenises new messages)", "steady state"):
        times: list[float] = []
        for step, answer in steps:
            tokens = accountant.tokens_raw(step)
            out_tokens = accountant.completion_tokens(answer)
            attempts = [
                Attempt("cache", "passed", "no entry", None, None, tokens, 0, 0.001, cpu_energy(0.0004), 0.0),
                Attempt("remote", "answered", "remote answered", None, MODEL, tokens, out_tokens, 0.5,
                        remote.estimate(MODEL, tokens, out_tokens), 0.01, prefix_tokens=tokens // 2),
            ]  # fmt: skip
            t0 = time.perf_counter()
            accountant.record(step, started_at=0.0, t0=t0, tokens_raw=tokens, attempts=attempts)
            times.append((time.perf_counter() - t0) * 1e6)
        times.sort()
        out[name] = {
            "steps": len(times),
            "p50_us": times[len(times) // 2],
            "p95_us": times[int(len(times) * 0.95)],
            "mean_us": statistics.fmean(times),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--limit", type=int, help="only the first N steps")
    args = parser.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.platform()}, {hardware()}", "per_step": run(args.limit)}
    for name, r in result["per_step"].items():
        print(f"{name}: {r['steps']} steps, p50 {r['p50_us']:.0f} us, p95 {r['p95_us']:.0f} us, mean {r['mean_us']:.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
