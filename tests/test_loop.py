"""The event loop is never blocked nor the record changed under the caller: the request is a
snapshot taken at the call; ``Milliwatt.open`` builds the client in a worker thread; many agents
stepping at once through rules, the real cache and an HTTP remote all get answered and recorded."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time

import pytest

from milliwatt import Milliwatt
from milliwatt.testing import OpenAIStubServer, ScriptedTier
from milliwatt.testing import RecordingSink as Sink

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}




@pytest.mark.asyncio
async def test_changing_the_request_while_the_step_runs_changes_nothing_recorded():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "text", "text": "where is 42?"}]}]
    tools = [copy.deepcopy(TOOL)]
    metadata = {"ticket": ["t-1"]}
    sent = copy.deepcopy((messages, tools, metadata))
    slow = ScriptedTier("remote", lambda s: {"role": "assistant", "content": "on its way"}, delay_s=0.05)
    sink = Sink()
    async with Milliwatt([slow], ledger=sink) as mw:
        task = asyncio.create_task(mw.step(messages, tools=tools, metadata=metadata, stop=["\n"]))
        await asyncio.sleep(0.01)  # the step is in flight, waiting in the tier
        messages[1]["content"][0]["text"] = "CHANGED"
        messages.append({"role": "assistant", "content": "CHANGED"})
        tools[0]["function"]["name"] = "CHANGED"
        metadata["ticket"].append("CHANGED")
        result = await task
    seen = slow.seen[0]
    assert list(seen.messages) == sent[0] and list(seen.tools) == sent[1]
    req = result.record.request
    assert req["messages"] == sent[0] and req["tools"] == sent[1] and req["stop"] == ["\n"]
    assert result.record.meta.extra == sent[2]
    assert "CHANGED" not in json.dumps(req)


@pytest.mark.asyncio
async def test_the_returned_message_is_the_callers_own():
    answer = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
    sink = Sink()
    async with Milliwatt([ScriptedTier("remote", lambda s: answer)], ledger=sink) as mw:
        result = await mw.step([{"role": "user", "content": "look it up"}], tools=[TOOL])
    # The agent appends the answer to its history and goes on editing it, before the ledger's
    # writer thread has serialised the record.
    result.message["content"] = "edited"
    result.message["tool_calls"][0]["function"]["arguments"] = '{"id": "edited"}'
    rec = sink.records[0]
    assert rec.response == answer and rec.response is not result.message
    assert answer["tool_calls"][0]["function"]["arguments"] == "{}"  # nor the tier's own dict


@pytest.mark.asyncio
async def test_open_builds_the_client_in_a_worker_thread(monkeypatch):
    built_in: list[int] = []

    def slow_from_config(cls, config=None, *, wrap_ledger=None):
        built_in.append(threading.get_ident())
        time.sleep(0.3)  # settings, EcoLogits, prices, migrations, a saved cache: blocking work
        return cls([ScriptedTier("rules", lambda s: {"role": "assistant", "content": "hi"})])

    monkeypatch.setattr(Milliwatt, "from_config", classmethod(slow_from_config))
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    async with await Milliwatt.open({"tiers": ["rules"]}) as mw:
        result = await mw.step([{"role": "user", "content": "hello"}])
    t.cancel()
    assert result.content == "hi"
    assert built_in and built_in[0] != threading.get_ident()
    assert ticks >= 10  # the loop kept running while the client was built


@pytest.mark.asyncio
async def test_open_with_a_real_configuration(tmp_path):
    pack = tmp_path / "rules.yaml"
    pack.write_text("pack: t\nrules:\n  - id: hi\n    when:\n      regex: ^hello$\n    reply: Hi there.\n")
    config = {"tiers": ["rules"], "rules": {"packs": [str(pack)]}, "ledger": f"sqlite:///{tmp_path}/ledger.db"}
    async with await Milliwatt.open(config) as mw:
        result = await mw.step([{"role": "user", "content": "hello"}])
    assert result.tier == "rules" and result.content == "Hi there."


# ------------------------------------------------------------------ many agents, real tiers

RULES = """\
pack: loop
rules:
  - id: greeting
    when:
      regex: ^\\W*(?:hi|hello)\\W*$
      flags: [IGNORECASE]
    reply: Hello! How can I help?
"""
SYSTEM = {"role": "system", "content": "You are a support agent. " + "Be brief and polite. " * 100}
QUESTIONS = ["What is your return policy?", "Do you ship to Canada?"]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_concurrent_agents_are_all_answered_and_recorded(tmp_path):
    from milliwatt.adapters.litellm_backend import LiteLLMBackend
    from milliwatt.cache import CacheTier
    from milliwatt.model_tier import ModelTier
    from milliwatt.rules import RulesTier

    (tmp_path / "rules.yaml").write_text(RULES)
    sink = Sink()
    async with OpenAIStubServer("Returns are free within 30 days.") as stub:
        remote = LiteLLMBackend("openai/stub", api_base=stub.api_base, api_key="stand-in", label="stand-in", energy_model="openai/gpt-4o-mini", max_retries=0)
        tiers = [RulesTier([str(tmp_path / "rules.yaml")]), CacheTier(path=None), ModelTier("remote", remote)]
        async with Milliwatt(tiers, ledger=sink) as mw:

            async def agent(a: int) -> list[str]:
                answered = []
                # two questions (remote, or cache once another agent's answer is stored), a
                # greeting (rules), then the first question again (cache: its own write-back)
                for q in (QUESTIONS[a % 2], QUESTIONS[(a + 1) % 2], "hello", QUESTIONS[a % 2]):
                    r = await mw.step([SYSTEM, {"role": "user", "content": q}], tools=[TOOL], tenant="acme", session_id=f"a{a}")
                    assert r.content
                    answered.append(r.tier)
                return answered

            tiers_used = await asyncio.gather(*(agent(a) for a in range(8)))
        assert stub.requests >= 2
    assert len(sink.records) == 32
    assert all(rec.tier in ("rules", "cache", "remote") for rec in sink.records)
    assert all(t[2] == "rules" and t[3] == "cache" for t in tiers_used)
    assert {rec.tier for rec in sink.records} == {"rules", "cache", "remote"}
    remote_recs = [rec for rec in sink.records if rec.tier == "remote"]
    assert all(rec.label == "stand-in" and rec.attempts[-1].energy.method == "estimate" for rec in remote_recs)
