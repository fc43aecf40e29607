"""The ledger's named migrations: a new ledger is at head, an old one is upgraded with its rows
intact, a newer one is refused, and the migrations build exactly what the models describe."""

from __future__ import annotations

import io
import re
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from milliwatt.ledger import (
    MIGRATIONS,
    UNVERSIONED_REVISION,
    VERSION_TABLE,
    Base,
    Ledger,
    LedgerError,
    head_revision,
    make_engine,
    open_existing,
    to_url,
)
from milliwatt.reports.summary import summarize
from milliwatt.types import Quality

from test_ledger import T0, record

# The schema exactly as milliwatt 0.1 created it (Base.metadata.create_all), before migrations
# existed: no version table, schema_version 1 in milliwatt_meta.
UNVERSIONED_DDL = """
CREATE TABLE steps (
	id VARCHAR(26) NOT NULL, started_at TEXT NOT NULL, session_id TEXT, run_id TEXT, tenant TEXT,
	agent TEXT, tier TEXT NOT NULL, model TEXT, label TEXT, input_tokens_raw INTEGER NOT NULL,
	input_tokens_sent INTEGER NOT NULL, output_tokens INTEGER NOT NULL, latency_ms FLOAT NOT NULL,
	energy_method TEXT NOT NULL, energy_wh_low FLOAT NOT NULL, energy_wh_point FLOAT NOT NULL,
	energy_wh_high FLOAT NOT NULL, energy_basis TEXT NOT NULL, cost_usd FLOAT NOT NULL,
	baseline_model TEXT NOT NULL, baseline_energy_method TEXT NOT NULL, baseline_energy_wh_low FLOAT NOT NULL,
	baseline_energy_wh_point FLOAT NOT NULL, baseline_energy_wh_high FLOAT NOT NULL,
	baseline_energy_basis TEXT NOT NULL, baseline_cost_usd FLOAT NOT NULL, request_json TEXT NOT NULL,
	response_json TEXT NOT NULL, meta_json TEXT NOT NULL,
	PRIMARY KEY (id)
);
CREATE INDEX ix_steps_started_at ON steps (started_at);
CREATE INDEX ix_steps_session_id ON steps (session_id);
CREATE INDEX ix_steps_tier ON steps (tier);
CREATE TABLE milliwatt_meta ("key" TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE attempts (
	step_id VARCHAR(26) NOT NULL, ordinal INTEGER NOT NULL, tier TEXT NOT NULL, outcome TEXT NOT NULL,
	reason TEXT NOT NULL, signal FLOAT, model TEXT, label TEXT, input_tokens INTEGER NOT NULL,
	output_tokens INTEGER NOT NULL, latency_ms FLOAT NOT NULL, energy_method TEXT NOT NULL,
	energy_wh_low FLOAT NOT NULL, energy_wh_point FLOAT NOT NULL, energy_wh_high FLOAT NOT NULL,
	energy_basis TEXT NOT NULL, cost_usd FLOAT NOT NULL,
	PRIMARY KEY (step_id, ordinal),
	CONSTRAINT attempt_outcome CHECK (outcome IN ('answered', 'passed', 'skipped', 'error')),
	FOREIGN KEY(step_id) REFERENCES steps (id)
);
INSERT INTO milliwatt_meta VALUES ('schema_version', '1');
INSERT INTO steps VALUES (
	'01KDVA7EC0SD5Q8W3ZJ0R4A7QE', '2025-12-31T23:00:00.000000Z', 's-old', 'r1', 'acme', 'airline', 'local',
	'smollm2-135m', NULL, 4000, 1200, 12, 850.0, 'cpu-time', 0.0003, 0.0005, 0.0008,
	'cpu-time x 1.5/2.5/4.0 W per vCPU', 0.0, 'gpt-4o', 'estimate', 0.3, 0.5, 0.8,
	'ecologits openai/gpt-4o output + prefill mw-remote-2026.11', 0.0103,
	'{"messages":[{"role":"user","content":"hi"}]}', '{"role":"assistant","content":"hello"}', '{}'
);
INSERT INTO attempts VALUES
	('01KDVA7EC0SD5Q8W3ZJ0R4A7QE', 0, 'rules', 'passed', 'no rule matched', NULL, NULL, NULL, 0, 0, 0.1,
	 'cpu-time', 1e-9, 2e-9, 3e-9, 'cpu-time x 1.5/2.5/4.0 W per vCPU', 0.0),
	('01KDVA7EC0SD5Q8W3ZJ0R4A7QE', 1, 'local', 'answered', 'confidence 0.93 >= 0.9', 0.93, 'smollm2-135m', NULL,
	 1200, 12, 849.9, 'cpu-time', 0.0003, 0.0005, 0.0008, 'cpu-time x 1.5/2.5/4.0 W per vCPU', 0.0);
"""


def unversioned_ledger(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.executescript(UNVERSIONED_DDL)
    conn.close()
    return path


def dump(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        out = conn.execute(sql).fetchall()
    conn.close()
    return out


def revision(path: Path) -> list[tuple]:
    return dump(path, f"SELECT version_num FROM {VERSION_TABLE}")


def schema_diff(path: Path | str) -> list:
    """What autogenerate would change to make the database match the models: nothing, if they
    agree (on PostgreSQL, column comments included). ``path`` is a SQLite file or any URL."""
    engine = make_engine(to_url(path))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def test_revision_ids_are_the_readable_names() -> None:
    assert head_revision() == "0006_observations"
    assert sorted(p.stem for p in (MIGRATIONS / "versions").glob("0*.py")) == [
        "0001_initial", "0002_step_quality", "0003_ledger_faults", "0004_attempt_evidence", "0005_prefix_tokens",
        "0006_observations",
    ]


def test_a_new_ledger_is_at_head_and_matches_the_models(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    Ledger(db).close()
    assert revision(db) == [(head_revision(),)]
    assert dump(db, "SELECT key, value FROM milliwatt_meta") == [("schema_version", "1")]
    assert schema_diff(db) == []
    Ledger(db).close()  # reopening a current ledger changes nothing
    assert revision(db) == [(head_revision(),)]


def test_migrations_give_postgresql_the_models_column_comments() -> None:
    """SQLite keeps no comments, so compare_metadata cannot see them; PostgreSQL clients show them."""
    sql = io.StringIO()
    config = Config(output_buffer=sql)
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", "postgresql://")
    command.upgrade(config, "head", sql=True)  # offline: renders the DDL, connects to nothing
    found = {
        (table, column): comment.replace("''", "'")
        for table, column, comment in re.findall(r"COMMENT ON COLUMN (\w+)\.(\w+) IS '((?:[^']|'')*)';", sql.getvalue())
    }
    assert found == {(t.name, c.name): c.comment for t in Base.metadata.sorted_tables for c in t.columns}


def test_0001_builds_exactly_the_unversioned_schema(tmp_path: Path) -> None:
    """Stamping an unversioned ledger as 0001 is only honest if 0001 builds the same tables."""
    migrated, legacy = tmp_path / "migrated.db", unversioned_ledger(tmp_path / "legacy.db")
    engine = make_engine(f"sqlite:///{migrated}")
    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        command.upgrade(config, UNVERSIONED_REVISION)
    engine.dispose()

    def columns(path: Path) -> dict[str, list[tuple]]:
        tables = [t for (t,) in dump(path, "SELECT name FROM sqlite_master WHERE type = 'table'") if t != VERSION_TABLE]
        return {
            t: dump(path, f"PRAGMA table_info({t})") + dump(path, f"PRAGMA foreign_key_list({t})")
            + sorted(dump(path, f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = '{t}'"))
            for t in tables
        }

    assert columns(migrated) == columns(legacy)
    check = "SELECT sql FROM sqlite_master WHERE name = 'attempts'"
    assert "CHECK (outcome IN" in dump(migrated, check)[0][0]
    assert dump(migrated, "SELECT * FROM milliwatt_meta") == dump(legacy, "SELECT * FROM milliwatt_meta")


@pytest.mark.asyncio
async def test_an_unversioned_ledger_is_upgraded_with_its_rows_intact(tmp_path: Path) -> None:
    db = unversioned_ledger(tmp_path / "old.db")
    before_steps = dump(db, "SELECT * FROM steps")
    before_attempts = dump(db, "SELECT * FROM attempts ORDER BY ordinal")

    async with Ledger(db) as ledger:
        await ledger.write(record(at=T0 + 60, quality=Quality("tool_call_match", "exact", True, 1.0)))
        await ledger.flush()
        old, new = ledger.read_steps()

    assert revision(db) == [(head_revision(),)]
    assert schema_diff(db) == []
    n = len(before_steps[0])
    assert [r[:n] for r in dump(db, "SELECT * FROM steps WHERE id = '01KDVA7EC0SD5Q8W3ZJ0R4A7QE'")] == before_steps
    m = len(before_attempts[0])
    old_attempts = dump(db, "SELECT * FROM attempts WHERE step_id = '01KDVA7EC0SD5Q8W3ZJ0R4A7QE' ORDER BY ordinal")
    assert [r[:m] for r in old_attempts] == before_attempts
    # evidence_json, prefix_tokens and 0006's observations: none recorded
    assert [r[m:] for r in old_attempts] == [(None,) * 8] * len(before_attempts)
    assert dump(db, "SELECT quality_metric, quality_kind, quality_agrees, quality_score, quality_detail FROM steps"
                    " WHERE id = '01KDVA7EC0SD5Q8W3ZJ0R4A7QE'") == [(None, None, None, None, None)]
    assert old["session_id"] == "s-old" and old["request"] == {"messages": [{"role": "user", "content": "hi"}]}
    assert [a["tier"] for a in old["attempts"]] == ["rules", "local"] and old["quality_metric"] is None
    assert new["quality_metric"] == "tool_call_match" and new["quality_agrees"] is True


def test_reading_an_unversioned_ledger_upgrades_it(tmp_path: Path) -> None:
    """The report opens ledgers through open_existing: it may query the quality columns."""
    db = unversioned_ledger(tmp_path / "old.db")
    engine, where = open_existing(db)
    engine.dispose()
    assert where == str(db) and revision(db) == [(head_revision(),)]
    assert summarize(db)["steps"] == 1


def test_concurrent_openers_upgrade_once(tmp_path: Path) -> None:
    db = unversioned_ledger(tmp_path / "old.db")
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            Ledger(db).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_and_close) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert revision(db) == [(head_revision(),)] and dump(db, "SELECT count(*) FROM steps") == [(1,)]


def test_a_ledger_from_a_newer_milliwatt_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    with Ledger(db) as ledger:
        ledger.write_sync(record())
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE {VERSION_TABLE} SET version_num = '0099_from_the_future'")
    conn.close()

    for opener in (Ledger, open_existing, summarize):
        with pytest.raises(LedgerError, match=rf"{db}.*'0099_from_the_future'.*upgrade milliwatt"):
            opener(db)
    assert revision(db) == [("0099_from_the_future",)]  # left as it was
    assert dump(db, "SELECT count(*) FROM steps") == [(1,)]


def test_an_unversioned_ledger_with_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    db = unversioned_ledger(tmp_path / "old.db")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE milliwatt_meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(LedgerError, match=rf"{db} has ledger schema version 2"):
        Ledger(db)
    assert "milliwatt_alembic_version" not in {t for (t,) in dump(db, "SELECT name FROM sqlite_master")}


@pytest.mark.asyncio
async def test_quality_round_trips(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    exact = Quality("bfcl_ast", "exact", False, 0.0, "argument 'unit': 'celsius' not in ['fahrenheit']")
    proxy = Quality("text_token_f1", "proxy", True, 0.87)
    async with Ledger(db) as ledger:
        for i, q in enumerate((exact, proxy, None)):
            await ledger.write(record(at=T0 + i, quality=q))
        await ledger.flush()
        steps = ledger.read_steps()

    got = [
        tuple(s[f"quality_{k}"] for k in ("metric", "kind", "agrees", "score", "detail"))
        for s in steps
    ]
    assert got == [
        ("bfcl_ast", "exact", False, 0.0, "argument 'unit': 'celsius' not in ['fahrenheit']"),
        ("text_token_f1", "proxy", True, 0.87, ""),
        (None, None, None, None, None),
    ]
    # Plain sqlite3 sees 0/1, so SUM(quality_agrees) counts agreeing steps.
    assert dump(db, "SELECT quality_agrees FROM steps ORDER BY id") == [(0,), (1,), (None,)]


@pytest.mark.asyncio
async def test_0003_adds_ledger_faults_and_user_id_to_a_0002_ledger(tmp_path: Path) -> None:
    """A ledger left at 0002 by milliwatt before the spool: upgraded on open, rows intact,
    ``user_id`` null on its old steps, an empty ``ledger_faults``."""
    db = unversioned_ledger(tmp_path / "l.db")  # with one step
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        command.stamp(config, UNVERSIONED_REVISION)
        command.upgrade(config, "0002_step_quality")
    engine.dispose()
    assert revision(db) == [("0002_step_quality",)]

    async with Ledger(db) as ledger:
        await ledger.write(record(at=T0 + 60))
        await ledger.flush()
        old, _new = ledger.read_steps()
    assert revision(db) == [(head_revision(),)] and schema_diff(db) == []
    assert old["id"] == "01KDVA7EC0SD5Q8W3ZJ0R4A7QE" and old["user_id"] is None and len(old["attempts"]) == 2
    assert dump(db, "SELECT count(*) FROM ledger_faults") == [(0,)]


@pytest.mark.asyncio
async def test_0003_lets_an_old_ledger_store_a_cancelled_step_and_a_downgrade_reads_it_as_error(tmp_path: Path) -> None:
    from test_ledger import attempt, cpu

    db = unversioned_ledger(tmp_path / "old.db")
    cancelled = record(at=T0 + 60, tier="cancelled", attempts=(attempt("local", "cancelled", cpu(1e-6, 2e-6, 3e-6)),))
    async with Ledger(db) as ledger:
        await ledger.write(cancelled)
        await ledger.flush()
        assert ledger.faults == {} or not any(ledger.faults.values())  # stored, not spooled
    assert dump(db, f"SELECT tier FROM steps WHERE id = '{cancelled.step_id}'") == [("cancelled",)]
    assert dump(db, f"SELECT outcome FROM attempts WHERE step_id = '{cancelled.step_id}'") == [("cancelled",)]
    # The old rows went through the table copy that replaces the CHECK unchanged.
    assert dump(db, "SELECT outcome FROM attempts WHERE step_id = '01KDVA7EC0SD5Q8W3ZJ0R4A7QE' ORDER BY ordinal") == [
        ("passed",), ("answered",)]

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002_step_quality")
    engine.dispose()
    assert dump(db, f"SELECT outcome FROM attempts WHERE step_id = '{cancelled.step_id}'") == [("error",)]
    with pytest.raises(sqlite3.IntegrityError):
        dump(db, f"UPDATE attempts SET outcome = 'cancelled' WHERE step_id = '{cancelled.step_id}'")
