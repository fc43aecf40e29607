"""The whole loop of issue 7 on a replay: observe, calibrate, serve templated answers under the
certified bound, on held-out conversations. Real MiniLM, FAISS, ledger and replay provider."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from milliwatt.cache.calibrate import calibrate, read_labelled
from milliwatt.cli import main
from milliwatt.evaluation.importers import Trace, TraceStep
from milliwatt.evaluation.replay import replay

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "You are the support agent of an airline. Look the user up before anything else."}
TOOLS = [{"type": "function", "function": {"name": "get_user_details", "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}}}}]
OPENINGS = ["I need to change my flight.", "Hi, I want to cancel a trip.", "Can you add a bag to my booking?", "I have a question about my reservation."]
REPLIES = ["My user id is {u}.", "Sure, it's {u}", "user id: {u}", "It is {u}, thanks."]
ASK = {"role": "assistant", "content": "Could you please give me your user id?"}
CONFIG = {"tools": {"get_user_details": {"cache": "read_only"}}, "tiers": ["cache", "remote"]}


def trace(sessions: range, name: str) -> Trace:
    """One step per conversation: after the agent asked for the id, it looks the user up."""
    steps = []
    for i in sessions:
        user = f"user_{['mia', 'noah', 'ivan', 'omar', 'lea'][i % 5]}_{1000 + i}"
        messages = [SYSTEM, {"role": "user", "content": OPENINGS[i % 4]}, ASK, {"role": "user", "content": REPLIES[(i // 4) % 4].format(u=user)}]
        args = {"user_id": user}
        answer = {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": "get_user_details", "arguments": json.dumps(args)}}]}
        steps.append(TraceStep(f"{name}-{i}", f"{name}/s{i}", messages, TOOLS, None, answer, "gpt-4o", "recorded",
                               {"kind": "tool_call", "calls": [{"name": "get_user_details", "arguments": args}]}))  # fmt: skip
    return Trace(f"{name}.trace", "trace", steps)


def test_templated_answers_are_served_under_the_certified_bound_on_held_out_conversations(tmp_path: Path) -> None:
    observed = tmp_path / "observe.db"
    asyncio.run(replay(trace(range(0, 160), "fit"), ledger=observed, config={**CONFIG, "cache": {"observe": True}}))
    labelled = read_labelled(observed)
    assert len(labelled.steps) == 159 and all(t for s in labelled.steps for _, _, t in s.candidates)  # templated candidates

    gate, _ = calibrate(observed, target=0.10)
    assert gate.knows_templates and gate.threshold.score is not None and gate.threshold.upper <= 0.10
    gate_file = tmp_path / "gate.json"
    assert main(["cache", "calibrate", str(observed), "--target", "0.10", "--out", str(gate_file)]) == 0
    assert json.loads(gate_file.read_text())["threshold"] == gate.threshold.to_json()  # the CLI writes what calibrate fits

    # Other users, the same agent: every id is new, so only a re-bound template can answer.
    served = tmp_path / "served.db"
    summary = asyncio.run(replay(trace(range(500, 560), "held"), ledger=served, config={**CONFIG, "cache": {"gate": str(gate_file), "max_wrong": 0.10}}))
    judged = summary["cheap_tiers"]["exact"]  # tool calls, judged exactly against the recording
    assert summary["tiers"].get("cache", 0) >= 30, summary["tiers"]
    assert judged["judged"] == summary["tiers"]["cache"] and judged["agree"] == judged["judged"]  # every re-bound call right

    # At 2% the same evidence (79 held-out steps, all right) cannot certify: 149 are needed.
    # The bound is kept by serving less: no templated answer is served.
    strict, _ = calibrate(observed, target=0.02)
    assert strict.threshold.score is None
    strict.save(gate_file)
    summary = asyncio.run(replay(trace(range(500, 520), "held"), ledger=tmp_path / "strict.db", config={**CONFIG, "cache": {"gate": str(gate_file), "max_wrong": 0.02}}))
    assert summary["tiers"].get("cache", 0) == 0


def test_calibrating_a_ledger_without_candidates_says_what_is_missing(tmp_path: Path) -> None:
    ledger = tmp_path / "plain.db"
    asyncio.run(replay(trace(range(0, 4), "x"), ledger=ledger, config={**CONFIG, "tiers": ["remote"]}))
    with pytest.raises(ValueError, match=r"0 labelled cache candidates in 0 session\(s\): calibration needs candidates in two sessions or more \(replay with cache.observe: true\)"):
        calibrate(ledger)
    out = tmp_path / "gate.json"
    assert main(["cache", "calibrate", str(ledger), "--out", str(out)]) == 2 and not out.exists()
    assert main(["cache", "calibrate", str(tmp_path / "missing.db"), "--out", str(out)]) == 2
