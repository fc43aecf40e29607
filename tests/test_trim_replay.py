"""Trimming measured on recorded traffic: the replay's `trimming` report and the benchmark's
measure, on the test suite's small tau trace (the full-size run is benchmarks/trim_tau.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from milliwatt.cli import main
from milliwatt.config import TrimSettings
from milliwatt.evaluation.importers import load_trace
from milliwatt.evaluation.trim_bench import measure, pipeline
from milliwatt.tokens import TokenCounter
from milliwatt.trimming import DEFAULT_REMOTE, MaskObservations, Trimmer, build_trimmer

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_a_replay_reports_what_trimming_saved_repeated_and_lost(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"tiers": ["remote"]}))
    ledger, out = tmp_path / "t.db", tmp_path / "t.json"
    tau, tools = FIXTURES / "tau_mini.json", FIXTURES / "tau_tools.json"
    args = ["replay", str(tau), "--tools", str(tools), "--config", str(config), "--ledger", str(ledger), "--json", str(out), "--quiet"]
    assert main(args) == 0
    t = json.loads(out.read_text())["trimming"]
    assert t["tokens_sent"] < t["tokens_raw"] and t["saved_by_strategy"]["compact_json"] > 0
    assert t["audited_steps"] == 9 and t["lost_steps"] == 0 and t["lost_share"] == 0.0
    assert 0 < t["prefix_tokens"] < t["tokens_sent"]  # later steps of a session repeat the earlier ones
    db = sqlite3.connect(ledger)
    steps = db.execute("select input_tokens_sent, input_tokens_prefix from steps order by id").fetchall()
    assert steps[0][1] == 0 and steps[1][1] > 0  # a session's first step repeats nothing
    evidence = [json.loads(e) for (e,) in db.execute("select evidence_json from attempts where outcome = 'answered'")]
    assert len(evidence) == 9 and all(e["trim"]["lost"] == {} for e in evidence)
    assert any(e["trim"]["saved"] for e in evidence)


def test_the_trimming_measure_counts_tokens_prefix_and_losses():
    steps = load_trace(FIXTURES / "tau_mini.json", tools=FIXTURES / "tau_tools.json").steps
    counter = TokenCounter()
    raw = measure(steps, *pipeline(Trimmer(counter=counter)), counter=counter)
    assert raw["tokens_sent"] == raw["tokens_raw"] and raw["lost_steps"] == 0 and raw["prefix_tokens_sent"] == raw["prefix_tokens_raw"]
    default = measure(steps, *pipeline(build_trimmer(DEFAULT_REMOTE, TrimSettings(), counter)), counter=counter)
    assert default["tokens_raw"] == raw["tokens_raw"] and default["tokens_sent"] < raw["tokens_sent"]
    masked = measure(steps, *pipeline(Trimmer([MaskObservations(keep=0, block=1, keep_ids=False)], counter=counter)), counter=counter)
    assert masked["tokens_sent"] <= raw["tokens_sent"] and set(masked["lost_by_strategy"]) <= {"mask"}
    assert default["overhead_ms"]["p50"] is not None


@pytest.mark.skipif(not (SHARED / "tau_airline").is_dir(), reason="needs ../shared/data")
def test_the_trimming_benchmark_runs_on_a_slice_of_tau(tmp_path):
    import runpy
    import sys

    out = tmp_path / "b.json"
    argv = sys.argv
    sys.argv = ["trim_tau.py", "--limit", "60", "--no-langchain", "--json", str(out)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "trim_tau.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["milliwatt default"]["tokens_sent"] < rows["raw"]["tokens_sent"]
