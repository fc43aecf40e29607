"""Isolation and secrets, under load (issue 13, part 5).

* 64 tenants, each with two end users, ask the same questions at once through one client whose
  cascade is the semantic cache in front of a remote provider (``OpenAIStubServer``) that
  answers each end user by name. After the first round writes back, a second round is
  answered from the cache, and the ledger shows every cached answer is its own tenant's and
  user's: zero cross-tenant and zero cross-user hits; a stranger (a new user of a tenant, a
  new tenant) never hits. Once with the real MiniLM embeddings and FAISS (slow), once with an
  embedder that puts every text at the same point, so only the scope keeps tenants apart.
* Fault scenarios with a live-looking credential (HTTP 401 and 500 quoting it, a timeout, a
  stream cut part-way, a cheap tier whose error quotes it, a request carrying it in a header)
  run concurrently through a client with a SQLite ledger, logging at DEBUG: afterwards the
  key is in no ledger byte (database, WAL, spool), no log line and no raised error.

See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import conftest_pg
from milliwatt import Milliwatt, MilliwattError
from milliwatt.adapters import LiteLLMBackend
from milliwatt.cache import CacheTier, Embedder
from milliwatt.errors import RemoteAuthError, RemoteError, RemoteStreamError, RemoteTimeout, RemoteUnavailable
from milliwatt.ledger import Ledger
from milliwatt.model_tier import ModelTier
from milliwatt.redaction import register_secret
from milliwatt.testing import OpenAIStubServer, Scripted, ScriptedTier, cosine_gate
from milliwatt.types import Step

aio = pytest.mark.asyncio(loop_scope="session")
pg_cluster = conftest_pg.pg_cluster  # the throwaway PostgreSQL (tests/conftest_pg.py)
pg_url = conftest_pg.pg_url
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")

TENANTS = [f"tenant-{i:02d}" for i in range(64)]
USERS = ("alice", "bob")
SYSTEM = {"role": "system", "content": "You are the support agent of an airline."}
QUESTIONS = ("How many bags can I check on an economy ticket?", "Can I change my flight online?")


def provider(request: dict[str, Any]) -> dict[str, Any]:
    """The remote stand-in answers each end user by name (OpenAI's ``user``, which the remote
    tier sends): an answer served to anyone else is visible in the ledger."""
    return {"role": "assistant", "content": f"Answer for {request.get('user')}: {request['messages'][-1]['content']}"}


def remote(stub: OpenAIStubServer, key: str = "sk-isolation-test-key-000000", **kw: Any) -> ModelTier:
    settings: dict[str, Any] = {"label": "stand-in", "energy_model": "openai/gpt-4o", "max_retries": 0, "timeout_s": 10, **kw}
    return ModelTier("remote", LiteLLMBackend("openai/gpt-4o", api_base=stub.api_base, api_key=key, **settings))


class OnePoint(Embedder):
    """Every text at the same point (cosine 1.0 to every other): nothing but the scope and the
    exact key parts keeps one tenant's entries from another's."""

    def __init__(self) -> None:
        super().__init__(max_batch=256)
        self.name = "one-point"

    def encode(self, texts: list[str]) -> tuple[np.ndarray, float]:
        vec = np.zeros((len(texts), 384), dtype=np.float32)
        vec[:, 0] = 1.0
        return vec, 0.0


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder()


async def ask_everyone(mw: Milliwatt, who: list[tuple[str, str]], questions: tuple[str, ...]) -> list[Any]:
    async def one(tenant: str, user: str, question: str) -> Any:
        asker = f"{tenant}/{user}"
        return await mw.step([SYSTEM, {"role": "user", "content": question}], tenant=tenant, user=asker,
                             session_id=asker, metadata={"asker": asker})  # fmt: skip

    return await asyncio.gather(*(one(t, u, q) for t, u in who for q in questions))


async def isolation(embedder: Embedder, db: Path, questions: tuple[str, ...], cache_path: str | None = None) -> None:
    everyone = [(t, u) for t in TENANTS for u in USERS]
    async with OpenAIStubServer(provider) as stub:
        # A permissive gate: it would serve any candidate it is shown, so only the scope decides.
        cache = CacheTier(embedder=embedder, gate=cosine_gate(0.5), shadow_share=0.0, path=cache_path)
        async with Milliwatt([cache, remote(stub)], ledger=Ledger(f"sqlite:///{db}")) as mw:
            first = await ask_everyone(mw, everyone, questions)
            assert {r.tier for r in first} == {"remote"}  # an empty cache answers nothing
            second = await ask_everyone(mw, everyone, questions)
            assert {r.tier for r in second} == {"cache"}, {r.tier for r in second}  # each asker's own entry
            strangers = [(t, "carol") for t in TENANTS[:8]] + [("tenant-new", "alice")]
            third = await ask_everyone(mw, strangers, questions)
            assert {r.tier for r in third} == {"remote"}  # no one else's entry serves a new user or tenant
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT tenant, tier, response_json, meta_json FROM steps").fetchall()
    n = len(everyone) * len(questions)
    assert len(rows) == 2 * n + len(strangers) * len(questions)
    cached = cross_tenant = cross_user = 0
    for tenant, tier, response, meta in rows:
        asker = json.loads(meta)["asker"]
        owner = json.loads(response)["content"].split(":", 1)[0].removeprefix("Answer for ")
        assert asker.split("/")[0] == tenant
        if tier == "cache":
            cached += 1
            cross_tenant += owner.split("/")[0] != tenant
            cross_user += owner != asker
        else:
            assert owner == asker
    assert cached == n
    assert (cross_tenant, cross_user) == (0, 0)


@aio
async def test_no_cache_hit_crosses_tenants_or_users_among_64_concurrent_tenants(tmp_path: Path) -> None:
    await isolation(OnePoint(), tmp_path / "ledger.db", QUESTIONS)


@aio
async def test_no_cache_hit_crosses_tenants_or_users_on_a_cache_shared_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    await isolation(OnePoint(), tmp_path / "ledger.db", QUESTIONS, cache_path=pg_url)


@pytest.mark.slow
@aio
async def test_no_cache_hit_crosses_tenants_or_users_with_the_real_embeddings(tmp_path: Path, minilm: Embedder) -> None:
    await isolation(minilm, tmp_path / "ledger.db", QUESTIONS[:1])


# --------------------------------------------------------------------------- secrets

KEY = "sk-live-Qw3rTy8uIo0pAs5dFg7hJk2L"  # must never be written anywhere


def cheap(step: Step) -> dict[str, Any] | None:
    """A cheap tier whose backend fails quoting the credential, for steps that start "boom"."""
    if step.last_user_text.startswith("boom"):
        raise RuntimeError(f"upstream refused key {KEY} (Authorization: Bearer {KEY})")
    return None


def ask(text: str) -> list[dict[str, Any]]:
    return [SYSTEM, {"role": "user", "content": text}]


async def collect(stream: Any) -> list[dict[str, Any]]:
    async with stream as s:
        return [chunk async for chunk in s]


@aio
async def test_no_credential_in_any_ledger_row_log_line_or_error_after_the_faults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    register_secret(KEY)
    caplog.set_level(logging.DEBUG)  # every logger, litellm's and httpx's included
    caplog.set_level(logging.DEBUG, logger="milliwatt")
    db = tmp_path / "ledger.db"
    faults = [
        (Scripted(status=401, message=f"Incorrect API key provided: {KEY}", echo_key=True), False, RemoteAuthError),
        (Scripted(status=500, message=f"internal error while checking {KEY}", echo_key=True), False, RemoteUnavailable),
        (Scripted(delay_s=1.0), False, RemoteTimeout),
        (Scripted(cut_after=2), True, RemoteStreamError),
        (Scripted(status=503, message=f"overloaded; key={KEY}", echo_key=True), True, RemoteUnavailable),
    ]
    errors: list[BaseException] = []
    async with OpenAIStubServer(provider) as stub:
        tiers = [ScriptedTier("cheap", cheap), remote(stub, KEY, timeout_s=0.5)]
        async with Milliwatt(tiers, ledger=Ledger(f"sqlite:///{db}")) as mw:
            for fault, streamed, expected in faults:  # each fault alone, so each meets its request
                stub.script(fault)
                with pytest.raises(expected) as err:
                    if streamed:
                        await collect(mw.stream(ask("Where is my order 48213? Tell me everything you know about it."),
                                                tenant="acme", user="u1"))  # fmt: skip
                    else:
                        await mw.step(ask("Where is my order 48213?"), tenant="acme", user="u1")
                errors.append(err.value)
            # Then under load: 64 tenants at once, a third of them failing with the key quoted,
            # some through a cheap tier that fails quoting it, some sending it in a header.
            stub.script(Scripted(status=500, message=f"bad gateway for {KEY}", echo_key=True, times=20))

            async def one(i: int) -> Any:
                text = ("boom " if i % 4 == 0 else "") + f"question {i}"
                headers = {"extra_headers": {"X-Api-Key": KEY}} if i % 3 == 0 else {}
                try:
                    return await mw.step(ask(text), tenant=f"tenant-{i}", user=f"u{i}", **headers)
                except MilliwattError as e:
                    return e

            results = await asyncio.gather(*(one(i) for i in range(64)))
    errors += [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, RemoteError) for e in errors) and len(errors) >= len(faults) + 10
    assert sum(not isinstance(r, BaseException) for r in results) >= 20
    for e in errors:
        assert KEY not in str(e) and KEY not in repr(e.__dict__) and KEY not in repr(getattr(e, "partial", None))
    assert "upstream refused key [REDACTED]" in caplog.text  # the cheap tier's failure was logged, redacted
    for record in caplog.records:
        assert KEY not in record.getMessage() and KEY not in (record.exc_text or "")
    assert KEY not in caplog.text
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM steps").fetchone()[0] == len(faults) + 64
        assert conn.execute("SELECT count(*) FROM attempts WHERE outcome = 'error'").fetchone()[0] >= len(errors)
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert db in files
    for path in files:  # the database, its WAL and shared memory if left, the spool if any
        assert KEY.encode() not in path.read_bytes(), path
