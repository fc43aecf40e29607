"""The remote estimate against the published anchors docs/method.md compares it with: what the
documentation says of it must stay true when a coefficient changes."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from milliwatt.energy import RemoteEnergyModel

GPT_4O = "openai/gpt-4o"


def per_input_token_mwh(model: RemoteEnergyModel, n: int = 10_000, out: int = 500) -> tuple[float, float, float]:
    whole, outputs = model.estimate(GPT_4O, n, out), model.estimate(GPT_4O, 0, out)
    return tuple((a - b) / n * 1000 for a, b in ((whole.low_wh, outputs.low_wh), (whole.point_wh, outputs.point_wh), (whole.high_wh, outputs.high_wh)))  # type: ignore[return-value]


def test_the_input_token_weight_brackets_epochs_long_input_anchor():
    low, point, high = per_input_token_mwh(RemoteEnergyModel())
    implied = (2.5 - 0.3) / 10_000 * 1000  # Epoch AI: 2.5 Wh with a 10k-token input, 0.3 Wh without
    assert low < point < implied < high
    assert (low, point, high) == pytest.approx((0.039, 0.108, 0.270), abs=0.001)  # the figures docs/method.md states


def test_a_short_prompt_is_estimated_above_the_published_short_prompt_figures():
    e = RemoteEnergyModel().estimate(GPT_4O, 100, 300)
    # docs/method.md: the output side is high, 1.4-3x the published per-prompt figures
    assert e.low_wh >= 0.42 and e.point_wh <= 3 * 0.34


def test_the_benchmark_writes_its_rows(tmp_path, monkeypatch):
    out = tmp_path / "anchors.json"
    monkeypatch.setattr(sys, "argv", ["anchors.py", "--json", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "anchors.py"), run_name="__main__")
    assert done.value.code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["input_tokens"] for r in rows] == [100, 100, 10_000, 4_791]
    assert all(r["low"] <= r["point"] <= r["high"] for r in rows)
