"""A tier failing below the last resort is logged, recorded and skipped; only the last resort's
failure reaches the caller, always as a ``MilliwattError``; secrets never reach the record or the log."""

from __future__ import annotations

import logging
import os

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


# --------------------------------------------------------------------------- a local model that does not load


def _broken_local(tmp_path, monkeypatch=None, content=b"not a model at all\n"):
    from milliwatt.adapters.llama_cpp import LlamaCppBackend

    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    backend = LlamaCppBackend(str(path), meter="cpu-time")
    loads = []
    if monkeypatch is not None:  # the load fails as llama.cpp's does, without llama.cpp
        def load(self):
            loads.append(self.model_path)
            raise ValueError(f"Failed to load model from file: {self.model_path}")

        monkeypatch.setattr(LlamaCppBackend, "_load", load)
    return path, backend, loads


@pytest.mark.asyncio
async def test_a_local_model_that_fails_to_load_is_an_error_attempt_and_is_not_reloaded_every_step(tmp_path, monkeypatch, caplog):
    """A GGUF that exists but does not load: the step is answered by the next tier, the local
    attempt is ``error`` with the file and llama.cpp's reason, and later steps do not try the
    load again until its retry interval (doubling) has passed or the file changed."""
    from milliwatt.adapters import llama_cpp
    from milliwatt.adapters.llama_cpp import LlamaCppBackend

    path, backend, loads = _broken_local(tmp_path, monkeypatch)
    clock = [1000.0]
    monkeypatch.setattr(llama_cpp, "_clock", lambda: clock[0])
    sink = Sink()
    caplog.set_level(logging.WARNING, logger="milliwatt")
    tiers = [ModelTier("local", backend, gate=Accept()), ScriptedTier("remote", reply("from remote"))]
    async with Milliwatt(tiers, ledger=sink) as mw:
        first = await mw.step(USER)
        for _ in range(20):
            await mw.step(USER)
        assert len(loads) == 1  # twenty more steps, no second load
        clock[0] += LlamaCppBackend.LOAD_RETRY_S + 1
        await mw.step(USER)
        assert len(loads) == 2  # tried again once the interval passed; now it waits twice as long
        clock[0] += LlamaCppBackend.LOAD_RETRY_S + 1
        await mw.step(USER)
        assert len(loads) == 2
        path.write_bytes(b"another file\n")  # replaced: tried at once
        os.utime(path, ns=(1, 1))
        await mw.step(USER)
        assert len(loads) == 3
    assert first.tier == "remote" and first.content == "from remote"
    assert all(r.tier == "remote" for r in sink.records) and len(sink.records) == 24
    local = [r.attempts[0] for r in sink.records]
    assert all((a.tier, a.outcome) == ("local", "error") for a in local)
    assert local[0].reason == (
        f"ModelLoadError: cannot load the GGUF model {path}: ValueError: Failed to load model from file: {path}; "
        f"not tried again for 30 s"
    )
    assert local[1].reason.startswith(f"ModelLoadError: cannot load the GGUF model {path}: ValueError") and "next try in" in local[1].reason
    assert "not tried again for 60 s" in local[21].reason
    assert "tier local failed, going on to the next tier" in caplog.text


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("content", [b"not a model at all\n", b"GGUF\x03\x00\x00\x00" + b"\x00" * 20], ids=["foreign", "truncated"])
async def test_llama_cpp_refusing_a_file_is_an_error_attempt_then_the_next_tier(tmp_path, content):
    """The same through llama.cpp itself: a foreign file and a GGUF cut after its header."""
    path, backend, _ = _broken_local(tmp_path, content=content)
    sink = Sink()
    tiers = [ModelTier("local", backend, gate=Accept()), ScriptedTier("remote", reply("from remote"))]
    async with Milliwatt(tiers, ledger=sink) as mw:
        first, second = await mw.step(USER), await mw.step(USER)
    assert first.content == second.content == "from remote"
    a, b = (r.attempts[0] for r in sink.records)
    assert (a.tier, a.outcome) == (b.tier, b.outcome) == ("local", "error")
    assert a.reason.startswith(f"ModelLoadError: cannot load the GGUF model {path}: ") and "not tried again for 30 s" in a.reason
    assert "next try in" in b.reason
