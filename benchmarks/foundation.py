"""Foundation benchmark: import time, rules tier per step, one cache lookup.

    .venv/bin/python benchmarks/foundation.py            # prints a markdown table
    .venv/bin/python benchmarks/foundation.py --json out.json

Medians over repeated runs in one process; the machines are shared and noisy, so read
the figures as orders of magnitude and compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HEAVY = ("torch", "litellm", "llama_cpp", "sentence_transformers", "faiss")


def bench_import(runs: int = 7) -> dict:
    probe = (
        "import time, sys; t = time.perf_counter(); import milliwatt; d = time.perf_counter() - t;"
        f"print(d, ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    times, heavy = [], set()
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        heavy.update(out[1].split(",") if len(out) > 1 else [])
    return {"import_s_median": statistics.median(times), "import_s_max": max(times), "heavy_modules_imported": sorted(heavy)}


def bench_rules(n: int = 5000) -> dict:
    from milliwatt import Step, StepMeta
    from milliwatt.examples.support_agent import SYSTEM_PROMPT, TOOLS
    from milliwatt.examples import SUPPORT_RULES
    from milliwatt.rules import RulesTier

    tier = RulesTier(SUPPORT_RULES)
    meta = StepMeta(session_id="b", agent="support", tenant="acme")
    cases = {
        "tool call (order status)": "Where is my order 48213?",
        "fixed reply (greeting)": "Hi!",
        "no rule matches": "I bought a kettle last week and the lid does not close properly, what can I do?",
    }
    out = {}
    for label, text in cases.items():
        step = Step.create([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}], tools=TOOLS, meta=meta)

        async def loop(step=step) -> list[float]:
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                await tier.attempt(step)
                samples.append(time.perf_counter() - t)
            return samples

        samples = asyncio.run(loop())
        out[label] = {"median_us": statistics.median(samples) * 1e6, "p95_us": sorted(samples)[int(0.95 * n)] * 1e6}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()
    import bench_cache

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} vCPU, Python {platform.python_version()}",
        "import": bench_import(),
        "rules": bench_rules(),
        "cache": bench_cache.run(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
