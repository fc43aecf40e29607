"""The local tier: SmolLM2 in-process through llama-cpp-python, and its gate."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from conftest_models import local_backend  # noqa: F401 - session fixture

from milliwatt.adapters import LlamaCppBackend
from milliwatt.adapters.tool_grammar import allowed_continuations, answer_schema, chat_messages, choice_spans, decision_mask
from milliwatt.gates import ConfidenceGate, ObservingGate, SideEffectGate, probability_quantile
from milliwatt.local_features import FEATURES, FEATURES_VERSION, answer_features
from milliwatt.model_tier import ModelTier
from milliwatt.side_effects import ReadOnlyTools
from milliwatt.tier import Completion
from milliwatt.types import Step

GET_USER = {
    "type": "function",
    "function": {
        "name": "get_user_details",
        "description": "Get the details of a user.",
        "parameters": {
            "type": "object",
            "properties": {"user_id": {"type": "string", "description": "The user id."}},
            "required": ["user_id"],
        },
    },
}


def call(name: str, args: dict | str) -> dict:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def completion(message: dict, logprobs: tuple[float, ...] = (-0.01,) * 5, finish: str = "stop") -> Completion:
    return Completion(message, "m", 10, 5, token_logprobs=logprobs, cpu_seconds=0.1, extra={"finish_reason": finish})


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_free_text_answer_has_logprobs_and_cpu_energy(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    step = Step.create([{"role": "user", "content": "Say hello in one short sentence."}])
    tier = ModelTier("local", local_backend, gate=ConfidenceGate())
    result = await tier.attempt(step)
    assert result.energy.method == "cpu-time" and result.energy.point_wh > 0
    assert result.input_tokens > 0 and result.output_tokens > 0
    assert 0.0 <= result.signal <= 1.0
    c = await local_backend.complete(step)
    assert c.message["content"].strip()
    assert c.cpu_seconds > 0
    assert c.token_logprobs and all(lp <= 0 for lp in c.token_logprobs)
    assert len(c.token_logprobs) == c.extra["generated_tokens"]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_grammar_constrained_tool_call(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    step = Step.create(
        [{"role": "system", "content": "You are an airline agent."}, {"role": "user", "content": "Look up user mia_li_3668"}],
        tools=[GET_USER],
    )
    t0 = time.perf_counter()
    c = await local_backend.complete(step)
    print(f"tool-call extraction {time.perf_counter() - t0:.2f}s, cpu {c.cpu_seconds:.2f}s")
    (tc,) = c.message["tool_calls"]
    assert tc["id"].startswith("call_") and tc["function"]["name"] == "get_user_details"
    assert json.loads(tc["function"]["arguments"]) == {"user_id": "mia_li_3668"}
    # Only the decision tokens (branch key, tool name, argument value) are judged.
    assert 0 < c.extra["decision_tokens"] == len(c.token_logprobs) < c.extra["generated_tokens"]
    decision = ConfidenceGate().check(step, c)
    assert "invalid" not in decision.reason


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_forced_tool_choice_has_no_reply_branch(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    step = Step.create(
        [{"role": "system", "content": "You are an airline agent."}, {"role": "user", "content": "Look up user mia_li_3668"}],
        tools=[GET_USER],
        tool_choice={"type": "function", "function": {"name": "get_user_details"}},
    )
    assert "reply" not in json.dumps(answer_schema(step))
    c = await local_backend.complete(step)
    assert json.loads(c.message["tool_calls"][0]["function"]["arguments"]) == {"user_id": "mia_li_3668"}
    # Without the reply branch there is no tool-or-text decision: the branch key is not judged.
    assert c.extra["decision_tokens"] < c.extra["generated_tokens"]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_concurrent_calls_are_serialised(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    steps = [Step.create([{"role": "user", "content": f"Count to {n}."}], options={"max_tokens": 8}) for n in (2, 3, 4)]
    results = await asyncio.gather(*(local_backend.complete(s) for s in steps))
    assert all(r.output_tokens > 0 and r.cpu_seconds > 0 for r in results)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_shared_prefix_is_reused(local_backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # Counted in tokens evaluated, not seconds: the second step re-reads only what follows the
    # shared prefix. (What reuse saves in time is a benchmark figure, docs/benchmarks.md.)
    policy = " ".join(f"Rule {i}: verify the user's identity before touching reservation {i}." for i in range(70))
    first = [{"role": "system", "content": f"You are a support agent. {policy}"}, {"role": "user", "content": "Hi."}]
    second = first + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Change my flight."}]
    c1 = await local_backend.complete(Step.create(first, options={"max_tokens": 4}))
    llama = local_backend._llama
    evaluated: list[int] = []
    real_eval = llama.eval
    monkeypatch.setattr(llama, "eval", lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1])
    c2 = await local_backend.complete(Step.create(second, options={"max_tokens": 4}))
    assert c1.input_tokens > 900
    prompt_evaluated = evaluated[0]  # the first eval is the prompt; each later one a generated token
    assert prompt_evaluated < c2.input_tokens - c1.input_tokens + 64


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_context_too_long_passes() -> None:
    backend = LlamaCppBackend(n_ctx=256, n_threads=1)
    tier = ModelTier("local", backend, gate=ConfidenceGate())
    result = await tier.attempt(Step.create([{"role": "user", "content": "word " * 400}]))
    await tier.aclose()
    assert not result.answered and "context too long for local window" in result.reason


# ------------------------------------------------------------------ the gate, with crafted completions

STEP = Step.create([{"role": "user", "content": "Look up mia"}], tools=[GET_USER])


def test_gate_accepts_valid_confident_call() -> None:
    d = ConfidenceGate().check(STEP, completion({"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "mia"})]}))
    assert d.accept and d.reason.startswith("confidence q10=0.99 >=")


def test_a_confident_call_to_a_tool_that_may_write_escalates() -> None:
    # The agent would execute it unverified: only a tool declared read-only (or annotated
    # readOnlyHint) may be called by the local model; the confidence does not matter.
    answer = completion({"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "mia"})]})
    d = SideEffectGate(ConfidenceGate(), ReadOnlyTools()).check(STEP, answer)
    assert not d.accept and d.reason == "calls get_user_details, which is not declared read-only" and d.signal > 0.9
    assert SideEffectGate(ConfidenceGate(), ReadOnlyTools({"get_user_details": "read_only"})).check(STEP, answer).accept
    assert not SideEffectGate(ConfidenceGate(), ReadOnlyTools({"get_user_details": "never"})).check(STEP, answer).accept
    annotated = {**GET_USER, "function": {**GET_USER["function"], "annotations": {"readOnlyHint": True}}}
    step = Step.create(STEP.messages, tools=[annotated])
    assert SideEffectGate(ConfidenceGate(), ReadOnlyTools()).check(step, answer).accept
    # A text answer has no side effect; a rejection by the inner gate keeps its own reason.
    assert SideEffectGate(ConfidenceGate(), ReadOnlyTools()).check(STEP, completion({"role": "assistant", "content": "Hi."})).accept
    unsure = completion(answer.message, logprobs=(-3.0,) * 5)
    assert SideEffectGate(ConfidenceGate(), ReadOnlyTools()).check(STEP, unsure).reason.startswith("confidence q10=")


def test_the_configured_local_tier_escalates_calls_to_tools_that_may_write_unless_told_otherwise() -> None:
    from milliwatt.config import load_settings
    from milliwatt.registry import build_tier

    guarded = build_tier("local", load_settings({"local": {"futility": False}}))
    assert isinstance(guarded.gate, SideEffectGate) and guarded.gate.tools.policy == {}
    declared = build_tier("local", load_settings({"local": {"futility": False}, "tools": {"get_user_details": {"cache": "read_only"}}}))
    assert declared.gate.tools.allows("get_user_details", STEP)
    judged_only = build_tier("local", load_settings({"local": {"futility": False, "tool_calls": "any"}}))
    assert isinstance(judged_only.gate, ConfidenceGate)


@pytest.mark.parametrize(
    ("tool_call", "reason"),
    [
        (call("get_user_details", {}), "tool call invalid: arguments.user_id missing"),
        (call("get_user_details", {"user_id": 7}), "tool call invalid: arguments.user_id: 7 is not of type 'string'"),
        (call("get_user_details", "{not json"), "tool call invalid: arguments of 'get_user_details' are not JSON"),
        (call("delete_user", {"user_id": "mia"}), "tool call invalid: 'delete_user' is not an offered tool"),
    ],
)
def test_gate_rejects_invalid_tool_calls(tool_call: dict, reason: str) -> None:
    d = ConfidenceGate().check(STEP, completion({"role": "assistant", "content": None, "tool_calls": [tool_call]}))
    assert not d.accept and d.reason.startswith(reason)


def test_gate_respects_tool_choice() -> None:
    text = completion({"role": "assistant", "content": "Sure."})
    required = Step.create(STEP.messages, tools=[GET_USER], tool_choice="required")
    assert ConfidenceGate().check(required, text).reason == "no tool call although tool_choice is 'required'"
    none = Step.create(STEP.messages, tools=[GET_USER], tool_choice="none")
    made = completion({"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "x"})]})
    assert not ConfidenceGate().check(none, made).accept


def test_gate_rejects_low_confidence_empty_and_cut_off() -> None:
    # Three unsure tokens in 22: the mean probability (0.88) would pass, the 10th percentile does not.
    unsure = (math.log(0.99),) * 19 + (math.log(0.2),) * 3
    d = ConfidenceGate(quantile=0.1, threshold=0.6).check(STEP, completion({"role": "assistant", "content": "ok"}, unsure))
    assert not d.accept and d.reason.startswith("confidence q10=0.") and d.reason.endswith("< 0.60")
    assert ConfidenceGate().check(STEP, completion({"role": "assistant", "content": "  "})).reason == "empty answer"
    cut = completion({"role": "assistant", "content": "and then"}, finish="length")
    assert ConfidenceGate().check(STEP, cut).reason == "hit max_tokens before finishing"


def test_probability_quantile_interpolates() -> None:
    lps = [math.log(p) for p in (0.1, 0.5, 0.9)]
    assert probability_quantile(lps, 0.5) == pytest.approx(0.5)
    assert probability_quantile(lps, 0.25) == pytest.approx(0.3)


# ------------------------------------------------------------------ prompt and grammar plumbing


def test_decision_mask_marks_values_and_branch_key() -> None:
    text = '{"name": "get_user_details", "arguments": {"user_id": "mia", "n": 12}}'
    chosen = "".join(c for c, m in zip(text, decision_mask(text, branch_key=True)) if m)
    assert chosen == "nameget_user_detailsmia12"
    assert "name" not in "".join(c for c, m in zip(text, decision_mask(text, branch_key=False)) if m)


def test_history_renders_for_chatml_templates() -> None:
    step = Step.create(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Look up mia"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "mia"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"name": "Mia"}'},
        ],
        tools=[GET_USER],
    )
    msgs = chat_messages(step)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"] == "Be brief.\n\nYou can call these tools:\n- get_user_details(user_id: string): Get the details of a user."
    assert json.loads(msgs[2]["content"]) == {"name": "get_user_details", "arguments": {"user_id": "mia"}}
    assert all(isinstance(m["content"], str) for m in msgs)


# ------------------------------------------------------------------ closed choices and loops


def test_an_unsure_closed_choice_is_rejected_however_sure_the_values() -> None:
    msg = {"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "mia"})]}
    coin_flip = Completion(msg, "m", 10, 5, token_logprobs=(-0.01,) * 5, choice_logprobs=(math.log(0.9), math.log(0.4)), cpu_seconds=0.1)
    d = ConfidenceGate().check(STEP, coin_flip)
    assert not d.accept and d.reason.startswith("choice p=0.40 < 0.50")
    sure = Completion(msg, "m", 10, 5, token_logprobs=(-0.01,) * 5, choice_logprobs=(math.log(0.9),), cpu_seconds=0.1)
    assert ConfidenceGate().check(STEP, sure).accept


def test_a_repeated_call_is_a_loop_and_escalates() -> None:
    earlier = call("get_user_details", {"user_id": "mia"})
    step = Step.create(
        [
            {"role": "user", "content": "Look up mia"},
            {"role": "assistant", "content": None, "tool_calls": [earlier]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"name": "Mia"}'},
        ],
        tools=[GET_USER],
    )
    again = completion({"role": "assistant", "content": None, "tool_calls": [call("get_user_details", '{"user_id":  "mia"}')]})
    d = ConfidenceGate().check(step, again)
    assert not d.accept and d.reason.startswith("repeats the earlier call get_user_details")


def test_choice_spans_cover_branch_key_tool_name_and_enum_values() -> None:
    cancel = {"name": "cancel", "parameters": {"type": "object", "properties": {"reason": {"type": "string", "enum": ["a", "bb"]}, "id": {"type": "string"}}}}
    other = {"name": "lookup", "parameters": {"type": "object", "properties": {}}}
    text = '{"name": "cancel", "arguments": {"id": "7", "reason": "bb"}}'
    spans = choice_spans(text, [cancel, other], branch_key=True)
    assert [(text[a:b], c) for a, b, c in spans] == [("name", ["name", "reply"]), ("cancel", ["cancel", "lookup"]), ("bb", ["a", "bb"])]
    assert choice_spans('{"reply": "hi"}', [cancel], branch_key=True) == [(2, 7, ["name", "reply"])]
    assert allowed_continuations("ca", ["cancel", "lookup"]) == ['ncel"']


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_tool_choice_is_judged_among_the_allowed_tools(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    step = Step.create(
        [{"role": "system", "content": "You are an airline agent."}, {"role": "user", "content": "Look up user mia_li_3668"}],
        tools=[GET_USER],
    )
    c = await local_backend.complete(step)
    # Branch key and tool name, each a probability among the grammar's options.
    assert len(c.choice_logprobs) == 2
    # With one tool the name is no choice at all: every allowed token continues it.
    assert c.choice_logprobs[1] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ stopping early


def test_hopeless_once_more_low_tokens_than_the_quantile_allows() -> None:
    gate = ConfidenceGate(quantile=0.1, threshold=0.5)
    low, high = math.log(0.1), math.log(0.9)
    assert not gate.hopeless([low] * 12 + [high] * 50, max_tokens=128)  # 12 <= 12.8: could still pass
    assert gate.hopeless([low] * 13, max_tokens=128)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_an_answer_that_cannot_pass_stops_early(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    gate = ConfidenceGate(quantile=0.1, threshold=0.9)  # strict: ordinary prose fails it fast
    step = Step.create([{"role": "user", "content": "Write a long story about a dragon who learns to cook."}])
    c = await local_backend.complete(step, abort=gate.hopeless)
    assert c.extra["aborted"] and c.output_tokens < local_backend.max_tokens
    decision = gate.check(step, c)
    assert not decision.accept and decision.reason.startswith("stopped early")
    # The context is still usable afterwards (the stream was closed cleanly).
    again = await local_backend.complete(Step.create([{"role": "user", "content": "Say hi."}]))
    assert again.message["content"]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_untyped_arguments_get_a_grammar_and_unbuildable_ones_pass(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    untyped = {"type": "function", "function": {"name": "fit", "parameters": {
        "type": "object", "properties": {"data": {"description": "anything"}}, "required": ["data"]}}}  # fmt: skip
    step = Step.create([{"role": "user", "content": "Fit the model on [1, 2, 3]."}], tools=[untyped], tool_choice="required")
    c = await local_backend.complete(step)
    assert c.message.get("tool_calls") or c.extra["finish_reason"] in ("length", "aborted")
    broken = {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/definitions/nowhere"}}}}}  # fmt: skip
    tier = ModelTier("local", local_backend, gate=ConfidenceGate())
    result = await tier.attempt(Step.create([{"role": "user", "content": "hi"}], tools=[broken]))
    assert not result.answered and "cannot be turned into a grammar" in result.reason


# ------------------------------------------------------------------ what a local answer looks like (issue 9)


def test_features_say_whether_the_values_were_copied_or_invented() -> None:
    copied = answer_features(STEP, completion({"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "mia"})]}))
    invented = answer_features(STEP, completion({"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "noah_7001"})]}))
    assert set(copied) == set(FEATURES) and copied["tool_call"] == 1.0 and copied["valid"] == 1.0
    assert copied["copied"] == 1.0 and copied["invented"] == 0.0
    assert invented["copied"] == 0.0 and invented["invented"] > 0
    cut = answer_features(STEP, completion({"role": "assistant", "content": "Mia is"}, logprobs=(-0.01, -2.0, -0.1), finish="length"))
    assert cut["finished"] == 0.0 and cut["tool_call"] == 0.0 and cut["p_q00"] < cut["p_q50"] and cut["choice_p"] == 1.0
    wrong_tool = answer_features(STEP, completion({"role": "assistant", "content": None, "tool_calls": [call("cancel", {})]}))
    assert wrong_tool["valid"] == 0.0


def test_an_observing_gate_judges_every_answer_and_accepts_none() -> None:
    answer = completion({"role": "assistant", "content": None, "tool_calls": [call("get_user_details", {"user_id": "mia"})]})
    d = ObservingGate(ConfidenceGate()).check(STEP, answer)
    assert not d.accept and d.evidence == {"would_accept": True} and d.reason.startswith("observe: would accept (confidence")
    unsure = ObservingGate(ConfidenceGate()).check(STEP, completion(answer.message, logprobs=(-3.0,) * 5))
    assert unsure.evidence == {"would_accept": False} and unsure.reason.startswith("observe: would pass")


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_every_local_answer_is_recorded_with_its_features(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    tier = ModelTier("local", local_backend, gate=ObservingGate(ConfidenceGate()))
    result = await tier.attempt(STEP)
    assert not result.answered and result.reason.startswith("observe: would")
    evidence = result.evidence
    assert evidence["answer"]["role"] == "assistant" and set(evidence["features"]) == set(FEATURES)
    assert evidence["features_version"] == FEATURES_VERSION and isinstance(evidence["would_accept"], bool)
