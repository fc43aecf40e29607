"""The load benchmark (benchmarks/load.py) small enough for CI: 64 concurrent agents through
rules -> the real cache -> a loopback remote, in one process and across 4 spawned processes,
all on one fresh PostgreSQL ledger (tests/conftest_pg.py): every step is answered, every tier
answers some, and the ledger holds each step exactly once. Without PostgreSQL or psycopg the
tests skip, saying why. Slow: every process loads MiniLM (~15-25 s a configuration on 2 cores)."""

from __future__ import annotations

import sys
from pathlib import Path

import conftest_pg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load

pg_cluster = conftest_pg.pg_cluster
pg_url = conftest_pg.pg_url

AGENTS, STEPS = 64, 5


@pytest.mark.slow
@pytest.mark.parametrize(("procs", "shared_cache"), [(1, False), (4, False), (4, True)], ids=["1", "4", "4-shared-cache"])
def test_64_agents_lose_and_duplicate_no_ledger_row(procs: int, shared_cache: bool, pg_url: str, tmp_path: Path) -> None:
    """With ``shared_cache`` the cache is kept on the same PostgreSQL, shared by the 4 workers."""
    r = load.run_config(pg_url, tmp_path, procs, AGENTS, STEPS, shared_cache=shared_cache)
    assert r["answered"] == AGENTS * STEPS
    assert {k for k, v in r["tiers"].items() if v > 0} == {"rules", "cache", "remote"}, r["tiers"]
    assert sum(r["tiers"].values()) == r["answered"]
    led = r["ledger"]
    assert led["warmup_steps"] == 3 * procs
    assert led["steps"] == led["distinct_ids"] == AGENTS * STEPS + led["warmup_steps"], led
    assert led["lost"] == 0 and led["duplicated"] == 0, led
    assert led["orphan_attempts"] == 0 and led["steps_without_attempt"] == 0, led
    assert led["dropped"] == 0 and not led["spool_left"], led
    assert r["loop_lag_ms"]["samples"] > 0 and r["step_latency_ms"]["p99"] > 0
    assert len(r["per_process"]) == procs and all(p["steps"] == STEPS * AGENTS // procs for p in r["per_process"])
