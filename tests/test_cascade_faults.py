"""A tier failing below the last resort is logged, recorded and skipped; only the last resort's
failure reaches the caller, always as a ``MilliwattError``; secrets never reach the record or the log."""

from __future__ import annotations

import logging

import pytest

from milliwatt import (
    BackendError,
    Completion,
    Milliwatt,
    MilliwattError,
    ModelBackend,
    RemoteUnavailable,
    Step,
    Tier,
)
from milliwatt.gates import GateDecision
from milliwatt.model_tier import ModelTier
from milliwatt.testing import ScriptedTier

USER = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
KEY = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX0123"


def reply(text):
    return lambda step: {"role": "assistant", "content": text}


def never(step):
    return None


class Broken(Tier):
    def __init__(self, name: str, error: BaseException) -> None:
        self.name = name
        self.error = error
        self.calls = 0

    async def attempt(self, step):
        self.calls += 1
        raise self.error


class Sink:
    def __init__(self):
        self.records = []

    async def write(self, record):
        self.records.append(record)


class FailingSink:
    async def write(self, record):
        raise MilliwattError("ledger is gone")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("faiss: index is corrupted"),  # FAISS inside the cache
        OSError("MiniLM weights unreadable"),  # the embedding model
        ValueError("unexpected shape (384,) vs (768,)"),
        RemoteUnavailable("connection refused", backend="litellm", model="openai/gpt-4o-mini"),
        BackendError("llama.cpp failed", backend="llama.cpp", model="smol"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_failing_middle_tier_is_logged_recorded_and_skipped(error, caplog):
    sink = Sink()
    caplog.set_level(logging.WARNING, logger="milliwatt")
    tiers = [ScriptedTier("rules", never), Broken("cache", error), ScriptedTier("remote", reply("from remote"))]
    async with Milliwatt(tiers, ledger=sink) as mw:
        result = await mw.step(USER)
    assert result.tier == "remote" and result.content == "from remote"
    (rec,) = sink.records
    assert rec is result.record
    assert [(a.tier, a.outcome) for a in rec.attempts] == [("rules", "passed"), ("cache", "error"), ("remote", "answered")]
    assert rec.attempts[1].reason == f"{type(error).__name__}: {error}"
    warnings = [r for r in caplog.records if r.name == "milliwatt" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cache" in warnings[0].getMessage() and str(error) in warnings[0].getMessage()


@pytest.mark.asyncio
async def test_error_reasons_and_logs_carry_no_secrets(caplog):
    sink = Sink()
    caplog.set_level(logging.DEBUG, logger="milliwatt")
    error = RuntimeError(f"401 Incorrect API key provided: {KEY} (GET https://api.example/v1/models?api_key=hunter2secret)")
    async with Milliwatt([Broken("cache", error), ScriptedTier("remote", reply("ok"))], ledger=sink) as mw:
        await mw.step(USER)
    reason = sink.records[0].attempts[0].reason
    assert reason.startswith("RuntimeError: 401 Incorrect API key provided:")
    for secret in (KEY, "hunter2secret"):
        assert secret not in reason
        assert secret not in caplog.text  # the warning and the DEBUG traceback are redacted too
    assert "cache" in caplog.text


@pytest.mark.asyncio
async def test_a_non_milliwatt_failure_of_the_last_resort_is_wrapped_with_its_cause():
    sink = Sink()
    bug = KeyError("choices")
    async with Milliwatt([ScriptedTier("local", never), Broken("remote", bug)], ledger=sink) as mw:
        with pytest.raises(BackendError, match="remote failed: KeyError") as info:
            await mw.step(USER)
    assert info.value.__cause__ is bug
    (rec,) = sink.records
    assert rec.tier == "error"
    assert [(a.tier, a.outcome) for a in rec.attempts] == [("local", "passed"), ("remote", "error")]


@pytest.mark.asyncio
async def test_the_last_resort_error_is_raised_even_when_the_record_cannot_be_written():
    async with Milliwatt([Broken("remote", RemoteUnavailable("down", backend="litellm", model="m"))], ledger=FailingSink()) as mw:
        with pytest.raises(RemoteUnavailable, match="down"):
            await mw.step(USER)


@pytest.mark.asyncio
async def test_every_tier_failing_but_the_last_still_answers():
    tiers = [Broken("rules", ZeroDivisionError("x")), Broken("cache", MemoryError()), ScriptedTier("remote", reply("ok"))]
    async with Milliwatt(tiers) as mw:
        result = await mw.step(USER)
    assert result.content == "ok"
    assert [a.outcome for a in result.record.attempts] == ["error", "error", "answered"]


class LeakyBackend(ModelBackend):
    model = "smol"

    async def complete(self, step, *, abort=None) -> Completion:
        raise BackendError(f"server said: bad key {KEY}", backend="x", model="smol")


class Accept:
    def check(self, step, completion):
        return GateDecision(True, 1.0, "ok")


@pytest.mark.asyncio
async def test_a_gated_tier_passing_on_a_backend_failure_redacts_its_reason():
    result = await ModelTier("local", LeakyBackend(), gate=Accept()).attempt(Step.create(USER))
    assert not result.answered and "bad key" in result.reason and KEY not in result.reason
