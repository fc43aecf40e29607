"""The ledger and its report: every step stored, attempts in order, readable with plain sqlite3,
the report's numbers checked against hand-computed values."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from ulid import ULID

from milliwatt.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    ledger_schema_markdown,
)
from milliwatt.ids import new_step_id
from milliwatt.reports.summary import format_summary, main, summarize
from milliwatt.types import Attempt, Energy, Quality, StepMeta, StepRecord

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ledger.md"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def cpu(low: float, point: float, high: float) -> Energy:
    return Energy("cpu-time", low, point, high, "cpu-time x 1.5/2.5/4.0 W per vCPU")


def remote(low: float, point: float, high: float) -> Energy:
    return Energy("estimate", low, point, high, "ecologits + prefill mw-remote-2026.11")


def attempt(tier: str, outcome: str, energy: Energy, **kw) -> Attempt:
    fields = dict(
        tier=tier, outcome=outcome, reason=f"{tier} {outcome}", signal=None, model=None,
        input_tokens=0, output_tokens=0, latency_s=0.001, energy=energy, cost_usd=0.0,
    )
    return Attempt(**(fields | kw))


def record(
    *,
    at: float = T0,
    tier: str = "rules",
    energy: Energy | None = None,
    baseline: Energy | None = None,
    attempts: tuple[Attempt, ...] | None = None,
    session: str | None = "s",
    step_id: str | None = None,
    **kw,
) -> StepRecord:
    energy = energy or cpu(1e-6, 2e-6, 3e-6)
    fields = dict(
        step_id=step_id or new_step_id(at),
        started_at=at,
        meta=StepMeta(session_id=session, run_id="run-1", tenant="acme", agent="airline", extra={"experiment": "e1"}),
        tier=tier,
        model=None,
        label=None,
        input_tokens_raw=100,
        input_tokens_sent=100,
        output_tokens=5,
        latency_s=0.002,
        energy=energy,
        cost_usd=0.0,
        baseline_energy=baseline or remote(0.2, 0.3, 0.5),
        baseline_cost_usd=0.01,
        baseline_model="gpt-4o",
        attempts=attempts if attempts is not None else (attempt(tier, "answered", energy),),
        request={"messages": [{"role": "user", "content": "what is my user id?"}]},
        response={"role": "assistant", "content": "mia_li_3668"},
    )
    return StepRecord(**(fields | kw))


def rows(db: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


# --------------------------------------------------------------------------- writing


@pytest.mark.asyncio
async def test_concurrent_writes_are_all_stored_on_close(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite:///{db}", batch_size=16)  # small batches: many transactions
    records = [record(at=T0 + i, session=f"s{i % 7}") for i in range(200)]
    await asyncio.gather(*(ledger.write(r) for r in records))
    await ledger.aclose()  # no flush: closing must drain the queue

    assert rows(db, "SELECT count(*) FROM steps") == [(200,)]
    assert rows(db, "SELECT count(*) FROM attempts") == [(200,)]
    assert {r[0] for r in rows(db, "SELECT id FROM steps")} == {r.step_id for r in records}
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.asyncio
async def test_write_returns_before_the_database_is_touched(tmp_path: Path) -> None:
    async with Ledger(tmp_path / "l.db") as ledger:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(500):
            await ledger.write(record(at=T0 + i))
        assert loop.time() - t0 < 0.5  # only queue puts on the event loop
        await ledger.flush()
        assert len(ledger.read_steps()) == 500


@pytest.mark.asyncio
async def test_attempts_are_stored_in_cascade_order(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    tries = (
        attempt("rules", "passed", cpu(1e-7, 2e-7, 3e-7), reason="no rule matched"),
        attempt("cache", "passed", cpu(1e-6, 2e-6, 3e-6), reason="nearest 0.81 < 0.92", signal=0.81),
        attempt("local", "answered", cpu(1e-3, 2e-3, 3e-3), model="smollm2-135m", signal=0.93, input_tokens=50),
    )
    r = record(tier="local", attempts=tries, model="smollm2-135m")
    async with Ledger(db) as ledger:
        await ledger.write(r)
        await ledger.flush()
        [step] = ledger.read_steps()

    assert [(a["ordinal"], a["tier"], a["outcome"]) for a in step["attempts"]] == [
        (0, "rules", "passed"), (1, "cache", "passed"), (2, "local", "answered"),
    ]
    assert step["attempts"][1]["signal"] == 0.81
    assert step["attempts"][2]["energy_wh_point"] == 2e-3
    assert step["request"] == r.request and step["meta"] == {"experiment": "e1"}
    assert rows(db, "SELECT tier, reason FROM attempts WHERE step_id = ? ORDER BY ordinal", r.step_id) == [
        ("rules", "no rule matched"), ("cache", "nearest 0.81 < 0.92"), ("local", "local answered"),
    ]


def test_step_ids_sort_by_time() -> None:
    times = [T0 + 0.0005 * k for k in range(50)] + [T0 + 3600, T0 + 86400]
    ids = [new_step_id(t) for t in times]
    assert sorted(ids) == ids  # monotonic within a millisecond too
    assert len(set(ids)) == len(ids)
    assert ULID.from_str(ids[-1]).timestamp == pytest.approx(T0 + 86400, abs=1e-3)
    assert len(ids[0]) == 26


@pytest.mark.asyncio
async def test_json_columns_read_with_plain_sqlite3(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    call = {"id": "c1", "type": "function", "function": {"name": "get_user_details", "arguments": '{"user_id":"mia_li_3668"}'}}
    r = record(response={"role": "assistant", "content": None, "tool_calls": [call]})
    async with Ledger(db) as ledger:
        await ledger.write(r)

    got = rows(
        db,
        "SELECT json_extract(request_json, '$.messages[0].content'),"
        " json_extract(response_json, '$.tool_calls[0].function.name'),"
        " json_extract(meta_json, '$.experiment'), date(started_at), started_at FROM steps",
    )
    assert got == [("what is my user id?", "get_user_details", "e1", "2026-01-01", "2026-01-01T00:00:00.000000Z")]


@pytest.mark.asyncio
async def test_in_memory_ledger(tmp_path: Path) -> None:
    async with Ledger("sqlite://") as ledger:
        await asyncio.gather(*(ledger.write(record(at=T0 + i)) for i in range(20)))
        await ledger.flush()
        assert len(ledger.read_steps(limit=5)) == 5
        assert len(ledger.read_steps(session_id="s")) == 20


@pytest.mark.asyncio
async def test_a_record_the_database_refuses_is_spooled_not_raised(tmp_path: Path) -> None:
    """Was: the writer's failure was raised by the next write/flush/close, and the ledger then
    refused every write. That cost the caller steps whose tier had already answered (and been
    paid); now the refused record goes to the spool, is counted, and nothing raises
    (docs/ledger.md, "Faults"; tests/test_ledger_faults.py has the other faults)."""
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    dup = record()
    await ledger.write(dup)
    await ledger.flush()

    good = [record(at=T0 + 1), record(at=T0 + 2)]
    for r in (good[0], dup, good[1]):  # the duplicate id fails inside the writer thread
        await ledger.write(r)
    await ledger.flush()  # no raise
    await ledger.write(record(at=T0 + 3))  # still accepted
    await ledger.aclose()  # no raise
    assert ledger.faults["spooled"] == 1
    # The good records of the failed batch were stored one by one; the bad one was spooled.
    assert rows(db, "SELECT count(*) FROM steps") == [(4,)]
    [line] = (tmp_path / "l.db.spool.jsonl").read_text().splitlines()
    assert json.loads(line)["step"]["id"] == dup.step_id
    assert rows(db, "SELECT kind, count, detail FROM ledger_faults") == [
        ("spooled", 1, "IntegrityError: UNIQUE constraint failed: steps.id"),
    ]
    # Reopening imports the spool: its step id is already stored, so nothing is inserted twice.
    Ledger(db).close()
    assert not (tmp_path / "l.db.spool.jsonl").exists()
    assert rows(db, "SELECT count(*) FROM steps") == [(4,)]


@pytest.mark.asyncio
async def test_write_after_close_is_spooled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Was: refused with LedgerError. A step answered after its ledger closed (a straggler at
    shutdown) is now kept in the spool, with a warning, and stored by the next open."""
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    await ledger.aclose()
    await ledger.aclose()  # idempotent
    late = record()
    with caplog.at_level("WARNING", logger="milliwatt.ledger"):
        await ledger.write(late)
    assert "ledger closed" in caplog.text
    assert ledger.faults["spooled"] == 1
    with Ledger(db) as reopened:
        assert [s["id"] for s in reopened.read_steps()] == [late.step_id]
        assert reopened.faults["imported"] == 1
    # The fault of the late write, spooled with it since the database was released, is stored too.
    assert sorted(rows(db, "SELECT kind, count, detail FROM ledger_faults")) == [
        ("imported", 1, f"from {db}.spool.jsonl"), ("spooled", 1, "ledger closed"),
    ]


def test_sync_api(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.write_sync(record())
        ledger.flush_sync()
        assert len(ledger.read_steps()) == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    Ledger(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE milliwatt_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(LedgerError, match="upgrade milliwatt"):
        Ledger(db)
    with pytest.raises(LedgerError, match="upgrade milliwatt"):
        summarize(db)


@pytest.mark.asyncio
async def test_records_from_the_real_cascade(tmp_path: Path) -> None:
    """What the cascade actually emits (routing skips, step ids, summed energy) is stored."""
    from milliwatt import Milliwatt, TierResult
    from milliwatt.testing import ScriptedTier
    from milliwatt.tier import Tier

    class Router(Tier):
        name = "rules"

        async def attempt(self, step):
            return TierResult.passed(self.name, "route to remote", skip_to="remote")

    db = tmp_path / "l.db"
    tiers = [Router(), ScriptedTier("local", lambda s: None), ScriptedTier("remote", lambda s: {"role": "assistant", "content": "hi"})]
    async with Milliwatt(tiers, ledger=Ledger(db)) as mw:  # closing Milliwatt closes the ledger
        await asyncio.gather(*(mw.step([{"role": "user", "content": f"q{i}"}], session_id=f"s{i % 3}") for i in range(30)))

    assert rows(db, "SELECT count(*), count(DISTINCT session_id) FROM steps WHERE tier = 'remote'") == [(30, 3)]
    assert rows(db, "SELECT ordinal, tier, outcome, count(*) FROM attempts GROUP BY ordinal, tier, outcome") == [
        (0, "rules", "passed", 30), (1, "local", "skipped", 30), (2, "remote", "answered", 30),
    ]
    s = summarize(db)
    assert s["steps"] == 30 and s["attempts_by_tier"]["local"]["skipped"] == 30
    assert s["energy_wh"]["baseline"]["point"] > 0


def test_import_milliwatt_does_not_load_sqlalchemy() -> None:
    code = "import sys, milliwatt; assert 'sqlalchemy' not in sys.modules, 'sqlalchemy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- the report


def run_records() -> list[StepRecord]:
    """Four steps, one per tier, with round numbers to check the report by hand."""
    p_rules = attempt("rules", "passed", Energy.zero())
    p_cache = attempt("cache", "passed", Energy.zero())
    p_local = attempt("local", "passed", cpu(0.01, 0.02, 0.03))
    steps = [
        record(at=T0, tier="rules", energy=cpu(1e-6, 2e-6, 3e-6), session="a", latency_s=0.001,
               input_tokens_raw=1000, input_tokens_sent=1000, output_tokens=10),
        record(at=T0 + 60, tier="cache", energy=cpu(1e-5, 2e-5, 4e-5), session="a", latency_s=0.020,
               input_tokens_raw=2000, input_tokens_sent=2000, output_tokens=20,
               attempts=(p_rules, attempt("cache", "answered", cpu(1e-5, 2e-5, 4e-5)))),
        record(at=T0 + 120, tier="local", energy=cpu(0.001, 0.002, 0.003), session="b", latency_s=0.9,
               baseline=remote(0.3, 0.4, 0.6), input_tokens_raw=3000, input_tokens_sent=1500, output_tokens=30,
               attempts=(p_rules, p_cache, attempt("local", "answered", cpu(0.001, 0.002, 0.003)))),
        record(at=T0 + 86400, tier="remote", energy=remote(0.1, 0.2, 0.4), session="b", latency_s=3.0,
               baseline=remote(0.3, 0.45, 0.7), input_tokens_raw=4000, input_tokens_sent=2000, output_tokens=40,
               label="stand-in", model="smollm2-server", cost_usd=0.02, baseline_cost_usd=0.01,
               attempts=(p_rules, p_cache, p_local, attempt("remote", "answered", remote(0.09, 0.18, 0.37), label="stand-in"))),
    ]
    return steps


@pytest.fixture
def run_db(tmp_path: Path) -> Path:
    """``run_records`` in a SQLite ledger."""
    db = tmp_path / "run.db"
    with Ledger(db) as ledger:
        for r in run_records():
            ledger.write_sync(r)
    return db


def test_summarize_matches_hand_computed_values(run_db: Path) -> None:
    check_hand_computed(summarize(run_db))


def check_hand_computed(s: dict) -> None:
    """The report of ``run_records``, on any database (tests/test_ledger_pg.py: PostgreSQL)."""
    approx = pytest.approx
    assert s["steps"] == 4 and s["sessions"] == 2
    assert s["tiers"] == {"cache": 1, "local": 1, "remote": 1, "rules": 1}
    assert s["energy_wh"]["cascade"] == approx({"low": 0.101011, "point": 0.202022, "high": 0.403043})
    assert s["energy_wh"]["baseline"] == approx({"low": 1.0, "point": 1.45, "high": 2.3})
    assert s["tokens"] == {"input_raw": 10000, "input_sent": 6500, "output": 100}
    assert s["cost_usd"] == approx({"cascade": 0.02, "baseline": 0.04})
    # Nearest rank over [1, 20, 900, 3000] ms: p50 is the 2nd value, p95 the 4th.
    assert s["latency_ms"] == approx({"p50": 20.0, "p95": 3000.0, "mean": 980.25, "max": 3000.0})
    # by the answering tier: one step each here, so p50 = p95 = its latency
    assert s["latency_ms_by_tier"]["remote"] == approx({"p50": 3000.0, "p95": 3000.0, "mean": 3000.0, "total": 3000.0})
    assert s["latency_ms_by_tier"]["cache"]["p95"] == approx(20.0)
    # per workflow: sessions a (rules, cache) and b (local, remote), summed, then distributed
    w = s["workflows"]
    assert w["sessions"] == 2 and w["steps"] == approx({"p50": 2, "p95": 2, "mean": 2})
    assert w["energy_wh_cascade"] == approx({"p50": 2.2e-5, "p95": 0.202, "mean": (2.2e-5 + 0.202) / 2})
    assert w["energy_wh_baseline"]["mean"] == approx(1.45 / 2) and w["cost_usd_cascade"] == approx({"p50": 0.0, "p95": 0.02, "mean": 0.01})
    assert s["energy_by_tier"]["local"] == approx({"steps": 1, "low": 0.001, "point": 0.002, "high": 0.003})
    assert s["attempts_by_tier"]["rules"] == approx(
        {"attempts": 4, "answered": 1, "passed": 3, "skipped": 0, "error": 0, "cancelled": 0, "shadow": 0, "low": 1e-6, "point": 2e-6, "high": 3e-6}
    )
    assert s["attempts_by_tier"]["local"]["passed"] == 1
    assert s["attempts_by_tier"]["local"]["point"] == approx(0.022)
    assert s["labels"] == {"stand-in": {"remote": 1}}
    assert s["energy_method"]["cascade"]["methods"] == {"cpu-time": 3, "estimate": 1}
    assert s["energy_method"]["baseline"]["models"] == {"gpt-4o": 4}
    assert s["first_started_at"] == "2026-01-01T00:00:00.000000Z"
    assert s["last_started_at"] == "2026-01-02T00:00:00.000000Z"
    json.dumps(s)  # JSON-ready


def test_savings_factor_is_a_range(run_db: Path) -> None:
    f = summarize(run_db)["savings_factor"]
    assert f["low"] == pytest.approx(1.0 / 0.403043)  # baseline low / cascade high
    assert f["point"] == pytest.approx(1.45 / 0.202022)
    assert f["high"] == pytest.approx(2.3 / 0.101011)  # baseline high / cascade low
    assert f["low"] < f["point"] < f["high"]


def test_savings_factor_with_zero_energy_cascade(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    with Ledger(db) as ledger:
        ledger.write_sync(record(energy=Energy("cpu-time", 0.0, 1e-9, 2e-9), attempts=()))
    f = summarize(db)["savings_factor"]
    assert f["high"] is None  # cascade low is 0: no finite upper bound
    assert f["low"] == pytest.approx(0.2 / 2e-9)


def test_format_summary_states_methods_ranges_and_labels(run_db: Path) -> None:
    text = format_summary(summarize(run_db))
    for expected in (
        str(run_db), "steps: 4 in 2 session(s)", "cascade", "baseline (all frontier)", "savings factor",
        "cpu-time (3 steps)", "estimate (1 step)", "basis: cpu-time x 1.5/2.5/4.0 W per vCPU",
        "gpt-4o (4 steps)", "'stand-in'", "p50 20.0 ms", "35.0% trimmed",
    ):
        assert expected in text, expected
    assert re.search(r"cascade, steps\s+0\.101\s+0\.202\s+0\.403", text)
    assert re.search(r"cascade, total\s+0\.101\s+0\.202\s+0\.403", text) and "background work: none recorded" in text
    assert re.search(r"remote\s+3000\.0\s+3000\.0\s+3000\.0", text)  # latency by answering tier
    assert "Per workflow (2 sessions" in text and re.search(r"cost \$, cascade\s+0\.0000\s+0\.0200\s+0\.0100", text)


def test_empty_ledger_report(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    Ledger(db).close()
    s = summarize(db)
    assert s["steps"] == 0 and s["savings_factor"] == {"low": None, "point": None, "high": None}
    assert "no steps logged" in format_summary(s)


def test_missing_file_is_named_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(LedgerError, match=re.escape(str(missing))):
        summarize(missing)
    assert not missing.exists()


@pytest.mark.parametrize("content", [b"just some text, not a database\n" * 10, None])
def test_not_a_ledger_is_named(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "other.db"
    if content is None:  # a real SQLite database, but someone else's
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (x)")
    else:
        path.write_bytes(content)
    with pytest.raises(LedgerError, match=f"{re.escape(str(path))} is not a milliwatt ledger"):
        summarize(path)


def test_report_command_line(run_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    assert main([str(tmp_path / "missing.db")]) == 2
    assert "missing.db" in capsys.readouterr().err


# --------------------------------------------------------------------------- the docs


def test_docs_hold_the_generated_schema() -> None:
    text = DOCS.read_text()
    m = re.search(r"<!-- schema:start -->\n(.*)<!-- schema:end -->", text, re.S)
    assert m, "docs/ledger.md lacks the schema markers"
    assert m.group(1).strip() == ledger_schema_markdown().strip(), (
        "docs/ledger.md is out of date: paste the output of "
        "`python -c 'from milliwatt.ledger import ledger_schema_markdown as f; print(f())'` between the markers"
    )


def test_docs_queries_run(run_db: Path) -> None:
    queries = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)
    assert len(queries) >= 3
    for q in queries:
        rows(run_db, q)  # raises on any error
    per_day = rows(run_db, queries[0])
    assert {r[0] for r in per_day} == {"2026-01-01", "2026-01-02"}


def test_docs_quality_query(tmp_path: Path) -> None:
    [query] = [q for q in re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S) if "quality_kind" in q]
    db = tmp_path / "l.db"
    judged = [
        ("local", Quality("tool_call_match", "exact", True, 1.0)),
        ("local", Quality("tool_call_match", "exact", False, 0.0, "argument user_id differs")),
        ("remote", Quality("tool_call_match", "exact", True, 1.0)),
        ("cache", Quality("text_token_f1", "proxy", True, 0.9)),
        ("rules", None),  # no reference: not counted
    ]
    with Ledger(db) as ledger:
        for i, (tier, q) in enumerate(judged):
            ledger.write_sync(record(at=T0 + i, tier=tier, quality=q, energy=cpu(0.1, 0.2, 0.3)))
    assert rows(db, query) == [
        ("local", "exact", "tool_call_match", 2, 1, 0.5, 0.5, pytest.approx(0.4)),
        ("remote", "exact", "tool_call_match", 1, 1, 1.0, 1.0, pytest.approx(0.2)),
        ("cache", "proxy", "text_token_f1", 1, 1, 1.0, 0.9, pytest.approx(0.2)),
    ]


def test_step_ids_are_in_creation_order_even_with_ids_for_other_times_made_between() -> None:
    """Several ids in one millisecond, with a fault's or a record's id for another time made in
    between (as the writer does): id order is still creation order."""
    at = 1_800_000_000.123
    made = []
    for _ in range(500):
        made.append(new_step_id(at))
        new_step_id(at - 5.0)
        new_step_id()
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(i[:10] == made[0][:10] for i in made)  # each still encodes its own millisecond
