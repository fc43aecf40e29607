"""`milliwatt demo`, end to end on the real parts: every tier answers, and the ledger agrees
with what was printed."""

import io
import re
import sqlite3

import pytest

from milliwatt.examples.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.mark.asyncio
async def test_demo_uses_all_four_tiers_and_the_ledger_matches_the_printout(tmp_path, monkeypatch):
    monkeypatch.delenv("MILLIWATT_REMOTE_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    ledger = tmp_path / "demo.db"
    summary = await run_demo(ledger=str(ledger), out=out)
    text = out.getvalue()

    rows = sqlite3.connect(ledger).execute(
        "select session_id, tier, label, input_tokens_raw, input_tokens_sent, energy_wh_point from steps order by id"
    ).fetchall()
    assert {r[1] for r in rows} == {"rules", "cache", "local", "remote"}
    assert all(r[2] == "stand-in" for r in rows if r[1] == "remote")

    printed = re.findall(r"^(demo-\d+)\s.*?\s(rules|cache|local|remote)\*?\s+(\d+)>(\d+)\s+(\S+) \(", text, re.M)
    assert len(printed) == len(rows) == summary["steps"]
    for (session, tier, raw, sent, energy), row in zip(printed, rows):
        assert (session, tier, int(raw), int(sent)) == row[:2] + row[3:5]
        assert float(energy) == pytest.approx(row[5], rel=0.01)

    assert summary["tiers"]["remote"] >= 1 and summary["tiers"]["cache"] >= 1 and summary["tiers"]["local"] >= 1
    assert summary["energy_wh"]["cascade"]["point"] < summary["energy_wh"]["baseline"]["point"]
    assert "stand-in" in text and "savings factor" in text
