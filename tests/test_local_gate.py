"""The local tier's calibration data (issue 9): a replay in observe mode records every local
answer with its features and the replay's verdict on it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from milliwatt.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.slow
def test_an_observing_replay_records_every_local_answer_with_its_verdict(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"tiers": ["local", "remote"], "local": {"observe": True, "tool_calls": "any"}}))
    ledger = tmp_path / "l.db"
    args = ["replay", str(FIXTURES / "bfcl_mini.jsonl"), "--config", str(config), "--ledger", str(ledger), "--quiet"]
    assert main(args) == 0
    db = sqlite3.connect(ledger)
    assert {t for (t,) in db.execute("select tier from steps")} == {"remote"}  # observing accepts nothing
    local = [json.loads(e) for (e,) in db.execute("select evidence_json from attempts where tier = 'local'")]
    steps = db.execute("select count(*) from steps").fetchone()[0]
    assert len(local) == steps > 0
    for e in local:
        assert e["features_version"] == "local-1" and isinstance(e["would_accept"], bool)
        assert e["quality"]["metric"] == "bfcl_ast" and isinstance(e["quality"]["agrees"], bool)
