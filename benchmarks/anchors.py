"""milliwatt's remote energy estimate beside published per-prompt anchors (docs/method.md).

    .venv/bin/python benchmarks/anchors.py [--json anchors.json]

Each row is ``RemoteEnergyModel().estimate(model, input_tokens, output_tokens)`` with no
measured latency (EcoLogits' own latency model applies), for the prompt shapes the anchors
describe. The anchors are quoted, not recomputed: their sources are listed in docs/method.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from milliwatt.energy import RemoteEnergyModel

MODEL = "openai/gpt-4o"
# (name, input tokens, output tokens, published figure in Wh or None, whose)
SHAPES = [
    ("short prompt (How Hungry is AI?: 100 in, 300 out)", 100, 300, 0.42, "Jegham et al. 2025, GPT-4o short prompt"),
    ("typical chat query (Epoch AI: ~500 out)", 100, 500, 0.3, "Epoch AI 2025, GPT-4o typical query"),
    ("long input (Epoch AI: 10k in)", 10_000, 500, 2.5, "Epoch AI 2025, GPT-4o with a 10k-token input"),
    ("agent step (tau airline mean: 4,791 in, 67 out)", 4_791, 67, None, "no published anchor"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    model = RemoteEnergyModel()
    rows = []
    for name, n_in, n_out, published, source in SHAPES:
        e = model.estimate(MODEL, n_in, n_out)
        out_only = model.estimate(MODEL, 0, n_out)
        rows.append({
            "shape": name, "input_tokens": n_in, "output_tokens": n_out,
            "low": e.low_wh, "point": e.point_wh, "high": e.high_wh,
            "prefill_point": e.point_wh - out_only.point_wh, "published": published, "source": source,
        })  # fmt: skip
    print(f"{MODEL}, coefficients {RemoteEnergyModel().version}")
    for r in rows:
        pub = f"{r['published']:.2f} Wh ({r['source']})" if r["published"] is not None else r["source"]
        print(
            f"{r['shape']:52s} {r['low']:.3f} / {r['point']:.3f} / {r['high']:.3f} Wh "
            f"(prefill {r['prefill_point']:.3f})   published: {pub}"
        )
    if args.json_out:
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} python {platform.python_version()}",
               "model": MODEL, "coefficients": RemoteEnergyModel().version, "rows": rows}  # fmt: skip
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
