"""The ledger on a real PostgreSQL: the same behaviour as on SQLite (the same helpers and
checks as tests/test_ledger.py and tests/test_migrations.py), several processes writing one
ledger with nothing lost or duplicated, and a server that is down at the start or goes down
during a run. Each test gets a fresh database on a throwaway cluster (tests/conftest_pg.py);
without PostgreSQL or psycopg they skip, saying why."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

import conftest_pg
from conftest_pg import Cluster, fresh_database, free_port, unavailable
from milliwatt.ledger import MIGRATIONS, VERSION_TABLE, Base, Ledger, LedgerError, head_revision, make_engine
from milliwatt.reports.summary import summarize
from milliwatt.types import Quality
from test_ledger import T0, attempt, check_hand_computed, cpu, record, run_records
from test_migrations import UNVERSIONED_DDL, schema_diff


# The throwaway cluster and a fresh database per test (tests/conftest_pg.py).
pg_cluster = conftest_pg.pg_cluster
pg_url = conftest_pg.pg_url


def query(url: str, sql: str, **params: object) -> list[tuple]:
    """Run one statement (or a script, without parameters) in its own transaction; a SELECT's rows."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if not sql.lstrip().upper().startswith("SELECT"):
                conn.exec_driver_sql(sql) if not params else conn.execute(text(sql), params)
                return []
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def write_all(url: str, records, spool: Path) -> Ledger:
    ledger = Ledger(url, spool=spool, batch_size=16)
    for r in records:
        ledger.write_sync(r)
    ledger.flush_sync()
    return ledger


# --------------------------------------------------------------------------- same as SQLite


@pytest.mark.asyncio
async def test_write_flush_read_back_as_on_sqlite(pg_url: str, tmp_path: Path) -> None:
    tries = (
        attempt("rules", "passed", cpu(1e-7, 2e-7, 3e-7), reason="no rule matched"),
        attempt("cache", "passed", cpu(1e-6, 2e-6, 3e-6), reason="nearest 0.81 < 0.92", signal=0.81),
        attempt("local", "answered", cpu(1e-3, 2e-3, 3e-3), model="smollm2-135m", signal=0.93, input_tokens=50),
    )
    records = [
        record(tier="local", attempts=tries, model="smollm2-135m", quality=Quality("bfcl_ast", "exact", False, 0.0, "it's 'x'")),
        *(record(at=T0 + i, session=f"s{i % 7}", quality=Quality("text_token_f1", "proxy", True, 0.87)) for i in range(1, 200)),
    ]
    got = {}
    for name, url in (("sqlite", f"sqlite:///{tmp_path / 'l.db'}"), ("postgresql", pg_url)):
        async with Ledger(url, spool=tmp_path / f"{name}.spool.jsonl", batch_size=16) as ledger:
            await asyncio.gather(*(ledger.write(r) for r in records))
            await ledger.flush()
            got[name] = ledger.read_steps()
            assert len(ledger.read_steps(session_id="s3")) == len([r for r in records if r.meta.session_id == "s3"])
            assert not any(ledger.faults.values())
    assert len(got["postgresql"]) == 200
    assert [a["tier"] for a in got["postgresql"][0]["attempts"]] == ["rules", "cache", "local"]
    assert got["postgresql"][0]["quality_agrees"] is False and got["postgresql"][1]["quality_agrees"] is True
    assert got["postgresql"] == got["sqlite"]  # the same dicts: no column reads back differently


def test_summarize_gives_the_sqlite_figures(pg_url: str, tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'run.db'}"
    for url in (sqlite_url, pg_url):
        write_all(url, run_records(), tmp_path / "spool.jsonl").close()
    pg, lite = summarize(pg_url), summarize(sqlite_url)
    check_hand_computed(pg)
    for s in (pg, lite):
        s.pop("ledger", None)
        s["ledger_faults"].pop("spool")  # where each spools: beside the file, or ./milliwatt-ledger.spool.jsonl
    assert _approx_equal(pg, lite)


def _approx_equal(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        return all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        return all(_approx_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b), (a, b)
        return True
    assert a == b, (a, b)
    return True


def test_report_recompute_on_a_postgresql_ledger(pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from milliwatt.cli import main

    write_all(pg_url, run_records(), tmp_path / "spool.jsonl").close()
    assert main(["report", pg_url, "--recompute", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 4 and "the ledger itself was only read" in out["recomputed"]
    assert out["ledger"] == pg_url
    assert query(pg_url, "SELECT count(*) FROM steps") == [(4,)]  # only read


# --------------------------------------------------------------------------- migrations


def test_migrations_build_the_models_schema_with_comments(pg_url: str, tmp_path: Path) -> None:
    Ledger(pg_url, spool=tmp_path / "spool.jsonl").close()
    assert query(pg_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]
    assert schema_diff(pg_url) == []  # types, indexes, constraints and column comments
    engine = make_engine(pg_url)
    try:
        insp = inspect(engine)
        found = {(t, c["name"]): c.get("comment") for t in insp.get_table_names() if t != VERSION_TABLE for c in insp.get_columns(t)}
    finally:
        engine.dispose()
    assert found == {(t.name, c.name): c.comment for t in Base.metadata.sorted_tables for c in t.columns}
    Ledger(pg_url, spool=tmp_path / "spool.jsonl").close()  # reopening a current ledger changes nothing
    assert schema_diff(pg_url) == []


@pytest.mark.parametrize("start", ["unversioned", "0002_step_quality"])
@pytest.mark.asyncio
async def test_an_old_postgresql_ledger_is_upgraded_with_its_rows_intact(pg_url: str, tmp_path: Path, start: str) -> None:
    """``unversioned``: the tables as milliwatt 0.1 made them, without migrations (and here
    without column comments); ``0002_step_quality``: built by the migrations up to 0002. Each
    holds test_migrations' old step with its two attempts."""
    statements = [s for s in UNVERSIONED_DDL.split(";") if s.strip()]
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        if start == "unversioned":
            for statement in statements:
                conn.exec_driver_sql(statement)
        else:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = conn
            command.upgrade(config, start)
            for statement in statements:
                if statement.strip().startswith("INSERT INTO steps") or statement.strip().startswith("INSERT INTO attempts"):
                    conn.exec_driver_sql(statement)
    engine.dispose()
    before = query(pg_url, "SELECT id, session_id, tier, energy_wh_point, request_json FROM steps")

    async with Ledger(pg_url, spool=tmp_path / "spool.jsonl") as ledger:
        await ledger.write(record(at=T0 + 60, quality=Quality("tool_call_match", "exact", True, 1.0)))
        await ledger.flush()
        old, new = ledger.read_steps()
    assert query(pg_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]
    diff = [d for item in schema_diff(pg_url) for d in (item if isinstance(item, list) else [item])]
    if start == "unversioned":
        # The hand-written 0.1 tables carry no comments, and stamping them 0001 adds none: only
        # those columns' comments differ (the later migrations comment the columns they add).
        old_tables = {"steps", "attempts", "milliwatt_meta"}
        assert diff and all(d[0] == "modify_comment" and d[2] in old_tables for d in diff), diff
        assert not [d for d in diff if d[3] in {"quality_metric", "user_id", "evidence_json", "prefix_tokens"}]
    else:
        assert diff == []
    assert query(pg_url, "SELECT id, session_id, tier, energy_wh_point, request_json FROM steps WHERE id = :i", i=old["id"]) == before
    assert [a["tier"] for a in old["attempts"]] == ["rules", "local"] and old["quality_metric"] is None
    assert new["quality_agrees"] is True
    assert summarize(pg_url)["steps"] == 2


# --------------------------------------------------------------------------- faults


DISK_FULL = """
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$;
CREATE TRIGGER disk_full BEFORE INSERT ON steps FOR EACH ROW EXECUTE FUNCTION refuse();
"""


@pytest.mark.asyncio
async def test_rows_the_database_refuses_are_spooled_and_imported(pg_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    ledger = Ledger(pg_url, spool=spool)
    dup = record()
    await ledger.write(dup)
    await ledger.flush()
    query(pg_url, DISK_FULL)
    refused = [record(at=T0 + i) for i in range(1, 6)]
    for r in refused:
        await ledger.write(r)
    await ledger.flush()
    query(pg_url, "DROP TRIGGER disk_full ON steps")
    await ledger.write(dup)  # a duplicate id: refused by the primary key, spooled
    await ledger.write(record(at=T0 + 10))  # stored
    await ledger.aclose()
    assert ledger.faults["spooled"] == 6 and ledger.faults["dropped"] == 0
    assert query(pg_url, "SELECT count(*) FROM steps") == [(2,)]
    spooled = {e["step"]["id"] for e in ledger.spool.entries()}
    assert spooled == {r.step_id for r in refused} | {dup.step_id}
    kinds = dict(query(pg_url, "SELECT kind, sum(count) FROM ledger_faults GROUP BY kind"))
    assert kinds == {"spooled": 6}
    assert any("disk full" in d for (d,) in query(pg_url, "SELECT detail FROM ledger_faults"))

    with Ledger(pg_url, spool=spool) as reopened:  # imports: 5 new, the duplicate already there
        assert reopened.faults["imported"] == 6
        assert {r.step_id for r in refused} <= {s["id"] for s in reopened.read_steps()}
    assert not spool.exists()
    assert query(pg_url, "SELECT count(*), count(DISTINCT id) FROM steps") == [(7, 7)]


def test_a_server_that_is_down_at_the_start_is_a_clear_error(tmp_path: Path) -> None:
    if unavailable() is not None:
        pytest.skip(unavailable())
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"  # no one listens there
    with pytest.raises(LedgerError, match=re.escape("cannot open the ledger at postgresql+psycopg://postgres@127.0.0.1")):
        Ledger(url, spool=tmp_path / "spool.jsonl")
    assert not (tmp_path / "spool.jsonl").exists()


@pytest.mark.asyncio
async def test_a_server_that_goes_down_mid_run_loses_nothing(tmp_path: Path) -> None:
    """The server stops during a run: the writer retries (a connection failure is transient),
    then spools; the caller never sees an error; the next open, with the server back, imports."""
    if unavailable() is not None:
        pytest.skip(unavailable())
    cluster = Cluster()  # its own server, so stopping it touches no other test
    try:
        url = fresh_database(cluster.url)
        spool = tmp_path / "spool.jsonl"
        ledger = Ledger(url, spool=spool)
        before = [record(at=T0 + i) for i in range(50)]
        await asyncio.gather(*(ledger.write(r) for r in before))
        await ledger.flush()
        cluster.halt()
        during = [record(at=T0 + 100 + i) for i in range(50)]
        await asyncio.gather(*(ledger.write(r) for r in during))  # never raises
        await ledger.flush()  # after the retry budget: spooled
        await ledger.aclose()
        assert ledger.faults["spooled"] == 50 and ledger.faults["retried"] >= 1 and ledger.faults["dropped"] == 0
        assert {e["step"]["id"] for e in ledger.spool.entries() if "step" in e} == {r.step_id for r in during}

        cluster.start()
        with Ledger(url, spool=spool) as reopened:
            assert reopened.faults["imported"] == 50
            assert [s["id"] for s in reopened.read_steps()] == [r.step_id for r in before + during]
        assert not spool.exists()
        kinds = dict(query(url, "SELECT kind, sum(count) FROM ledger_faults GROUP BY kind"))
        assert kinds["spooled"] == 50 and kinds["imported"] == 50  # the outage's faults, stored once it was back
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- several processes

WORKERS, PER_WORKER = 4, 500


def _worker(url: str, spool: str, n: int, worker: int, go: multiprocessing.synchronize.Event) -> dict[str, int]:
    go.wait(30)  # every worker opens the (empty) database at once: they race to create the ledger

    async def main() -> dict[str, int]:
        async with Ledger(url, spool=spool, batch_size=50) as ledger:
            await asyncio.gather(*(ledger.write(record(at=T0 + i, session=f"w{worker}")) for i in range(n)))
            await ledger.flush()
            return dict(ledger.faults)

    return asyncio.run(main())


def test_four_processes_write_one_ledger_with_nothing_lost_or_duplicated(pg_url: str, tmp_path: Path) -> None:
    """4 spawned processes, each writing PER_WORKER steps to one fresh PostgreSQL ledger at
    once (all racing to create its schema too): every step and attempt row is there once."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Manager().Event()
    with ctx.Pool(WORKERS) as pool:
        results = [pool.apply_async(_worker, (pg_url, str(tmp_path / "spool.jsonl"), PER_WORKER, w, go)) for w in range(WORKERS)]
        go.set()
        faults = [r.get(timeout=240) for r in results]
    assert all(f.get("spooled", 0) == 0 and f.get("dropped", 0) == 0 for f in faults), faults
    total = WORKERS * PER_WORKER
    assert query(pg_url, "SELECT count(*), count(DISTINCT id) FROM steps") == [(total, total)]
    assert query(pg_url, "SELECT count(*), count(DISTINCT step_id) FROM attempts") == [(total, total)]
    assert query(pg_url, "SELECT count(*) FROM steps s LEFT JOIN attempts a ON a.step_id = s.id WHERE a.step_id IS NULL") == [(0,)]
    per_worker = dict(query(pg_url, "SELECT session_id, count(*) FROM steps GROUP BY session_id"))
    assert per_worker == {f"w{w}": PER_WORKER for w in range(WORKERS)}
    assert query(pg_url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]
    assert not (tmp_path / "spool.jsonl").exists()
