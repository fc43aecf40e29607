"""Copy-constrained decoding (issue 9): tool arguments closed to the values the context holds."""

from __future__ import annotations

import json

import pytest
from conftest_models import local_backend  # noqa: F401 - session fixture

from milliwatt.adapters import LlamaCppBackend
from milliwatt.adapters.copy_values import Candidates, candidates, constrain
from milliwatt.adapters.tool_grammar import answer_schema
from milliwatt.types import Step


def tool(name: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties, "required": required}}}


FACTORIAL = tool("math.factorial", {"number": {"type": "integer", "description": "The number for which factorial needs to be calculated."}}, ["number"])
FACTORIAL["function"]["description"] = "Calculate the factorial of a given number."
AREA = tool(  # BFCL simple_python_8
    "geometry.area_circle",
    {
        "radius": {"type": "integer", "description": "The radius of the circle."},
        "units": {"type": "string", "description": "The units in which the radius is measured (defaults to 'meters')."},
    },
    ["radius"],
)
AREA["function"]["description"] = "Calculate the area of a circle given the radius."


def test_strings_are_word_runs_quoted_passages_and_tool_result_leaves() -> None:
    found = candidates(
        [
            {"role": "user", "content": "Book it for 'Mia Li' from Boston, MA to Washington D.C.?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "find", "arguments": '{"user_id": "mia_li_3668"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"reservations": ["NO6JO3"], "name": {"first": "Mia"}}'},
        ]
    )  # fmt: skip
    for value in ("Mia Li", "Boston, MA", "Washington D.C", "mia_li_3668", "NO6JO3", "Boston"):
        assert value in found.strings, value
    assert "MA to Washington D.C.?" not in found.strings  # the ends are stripped of punctuation
    assert "reservations" not in found.strings  # keys of a tool result are not values
    # newest message first: the tool result's values lead
    assert found.strings.index("NO6JO3") < found.strings.index("Mia Li")


def test_numbers_as_written_as_percent_fractions_scaled_and_in_words() -> None:
    found = candidates([{"role": "user", "content": "Invest $5,000 at 5% for three years; 213 million people; id DNA123; -2.5 m"}])
    assert set(found.numbers) == {5000, 5, 0.05, 3, 213, 213_000_000, -2.5}
    assert set(found.integers()) == {5000, 5, 3, 213, 213_000_000}
    assert all(isinstance(n, int) for n in found.integers())


def test_candidates_stop_at_the_limit_newest_first() -> None:
    old = {"role": "user", "content": " ".join(f"old{i}" for i in range(50))}
    new = {"role": "user", "content": "new value"}
    found = candidates([old, new], limit=3)
    assert found.strings == ("new", "new value", "value")


def test_constrain_closes_strings_and_numbers_and_keeps_the_schemas_own_choices() -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "format": "hostname"},
            "days": {"type": "integer"},
            "rate": {"type": "number", "description": "Default value is 9.81"},
            "mode": {"type": "string", "enum": ["fast", "slow"]},
            "flag": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "note": {"type": "object"},
        },
        "required": ["city"],
    }
    out = constrain(schema, Candidates(("Paris", "two days"), (2, 0.5)))
    props = out["properties"]
    assert props["city"] == {"type": "string", "enum": ["Paris", "two days"]}  # format cannot hold for a copy
    assert props["days"]["enum"] == [2]
    assert props["rate"]["enum"] == [9.81, 2, 0.5]  # the description's default is a candidate too
    assert props["mode"]["enum"] == ["fast", "slow"] and props["flag"] == {"type": "boolean"}
    assert props["tags"]["items"]["enum"] == ["Paris", "two days"] and props["note"] == {"type": "object"}
    assert schema["properties"]["city"] == {"type": "string", "format": "hostname"}  # not modified


def test_without_candidates_a_required_argument_is_free_and_an_optional_one_is_dropped() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "k": {"type": "integer"}}, "required": ["n"]}
    out = constrain(schema, Candidates(("word",), ()))
    assert out["properties"] == {"n": {"type": "integer"}}


def test_answer_schema_copies_only_when_asked() -> None:
    step = Step.create([{"role": "user", "content": "Calculate the factorial of 5."}], tools=[FACTORIAL])
    free = answer_schema(step)
    copied = answer_schema(step, copy=True)
    args = lambda s: s["anyOf"][0]["properties"]["arguments"]["properties"]  # noqa: E731
    assert "enum" not in args(free)["number"] and args(copied)["number"]["enum"] == [5]


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_the_real_model_copies_the_value_it_would_otherwise_invent(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    # BFCL simple_python_1: free, SmolLM2-135M asks for the factorial of 1.
    step = Step.create([{"role": "user", "content": "Calculate the factorial of 5 using math functions."}], tools=[FACTORIAL])
    local_backend.copy_values = False
    try:
        free = await local_backend.complete(step)
    finally:
        local_backend.copy_values = True
    copied = await local_backend.complete(step)
    assert json.loads(free.message["tool_calls"][0]["function"]["arguments"]) != {"number": 5}
    assert json.loads(copied.message["tool_calls"][0]["function"]["arguments"]) == {"number": 5}
    assert copied.extra["decoding"] == "copy" and free.extra["decoding"] == "free"


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_a_closed_value_may_end_the_call_without_a_guessed_optional_argument(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    # BFCL simple_python_8. Before the grammar let a space follow a closed value, the model's
    # " }" was forbidden after "10" and it went on to "units": "circle".
    step = Step.create([{"role": "user", "content": "What's the area of a circle with a radius of 10?"}], tools=[AREA])
    c = await local_backend.complete(step)
    assert json.loads(c.message["tool_calls"][0]["function"]["arguments"]) == {"radius": 10}


# ------------------------------------------------------------------ several calls in one answer

WEATHER = tool("get_weather", {"city": {"type": "string", "description": "The city."}}, ["city"])
WEATHER["function"]["description"] = "Get the current weather in a city."


def test_several_calls_only_where_the_request_or_the_configuration_allows_them() -> None:
    from milliwatt.adapters.tool_grammar import answer_shape

    ask = [{"role": "user", "content": "Weather in Paris and London?"}]
    assert answer_shape(Step.create(ask, tools=[WEATHER])).max_calls == 1
    assert answer_shape(Step.create(ask, tools=[WEATHER]), parallel=True).max_calls > 1
    assert answer_shape(Step.create(ask, tools=[WEATHER], options={"parallel_tool_calls": True})).max_calls > 1
    assert answer_shape(Step.create(ask, tools=[WEATHER], options={"parallel_tool_calls": False}), parallel=True).max_calls == 1


def test_an_answer_of_several_calls_parses_and_a_loop_is_cut() -> None:
    from milliwatt.adapters.tool_grammar import (
        parse_answer,
        repeats_a_call,
        without_repeats,
    )

    paris, london = '{"name": "get_weather", "arguments": {"city": "Paris"}}', '{"name": "get_weather", "arguments": {"city": "London"}}'
    message = parse_answer(f"{paris}\n{london}")
    assert [json.loads(c["function"]["arguments"])["city"] for c in message["tool_calls"]] == ["Paris", "London"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    assert repeats_a_call(f"{paris}\n{london}\n{paris}") and not repeats_a_call(f"{paris}\n{london}")
    assert without_repeats(f"{paris}\n{london}\n{paris}") == f"{paris}\n{london}"
    cut_off = f"{paris}\n{london[:45]}"  # at max_tokens: a repeat of Paris or a call for London?
    assert without_repeats(cut_off) == cut_off
    with pytest.raises(ValueError):
        parse_answer('{"reply": "hi"}\n' + paris)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_the_real_model_makes_two_calls_for_two_cities_and_one_for_one(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    def cities(c) -> list[str]:
        return [json.loads(t["function"]["arguments"])["city"] for t in c.message["tool_calls"]]

    options = {"parallel_tool_calls": True}
    # Room for the repeat that ends a looping answer (a cut-off one would fail the gate).
    local_backend.max_tokens, max_tokens = 128, local_backend.max_tokens
    try:
        two = await local_backend.complete(
            Step.create([{"role": "user", "content": "What's the weather in Paris and in London?"}], tools=[WEATHER], tool_choice="required", options=options)
        )
        # SmolLM2 repeats its one call; decoding stops at the repeat, which is cut.
        one = await local_backend.complete(
            Step.create([{"role": "user", "content": "What is the weather like in Berlin?"}], tools=[WEATHER], tool_choice="required", options=options)
        )
    finally:
        local_backend.max_tokens = max_tokens
    assert cities(two) == ["Paris", "London"]
    assert cities(one) == ["Berlin"] and one.extra["finish_reason"] == "stop"
    alone = await local_backend.complete(
        Step.create([{"role": "user", "content": "What's the weather in Paris and in London?"}], tools=[WEATHER], tool_choice="required")
    )
    assert cities(alone) == ["Paris"]


def test_the_system_prompt_and_the_assistants_prose_give_no_candidates() -> None:
    found = candidates(
        [
            {"role": "system", "content": "Policy 42 applies to Gold members"},
            {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "Order 77 is late"},
        ]
    )
    assert found.strings == ("ok",) and found.numbers == ()


# ------------------------------------------------------------------ grammars llama.cpp can parse


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_values_with_quotes_and_backslashes_decode(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    # llama-cpp-python's converter wrote such literals unescaped: llama.cpp could not parse
    # the grammar, and sampling from it crashed the process (the demo, before the fix).
    search = tool("search", {"query": {"type": "string"}}, ["query"])
    step = Step.create([{"role": "user", "content": 'Search for "Order Details" in C:\\temp\\orders'}], tools=[search], tool_choice="required")
    c = await local_backend.complete(step)
    query = json.loads(c.message["tool_calls"][0]["function"]["arguments"])["query"]
    assert query in candidates(step.messages).strings


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_a_grammar_llama_cpp_cannot_parse_is_refused_before_decoding(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    from llama_cpp import LlamaGrammar

    from milliwatt.adapters.llama_cpp import _check_grammar

    await local_backend.complete(Step.create([{"role": "user", "content": "hi"}]))  # loads the model
    _check_grammar(local_backend._llama, LlamaGrammar.from_string('root ::= "ok"'))
    with pytest.raises(ValueError, match="cannot parse"):
        _check_grammar(local_backend._llama, LlamaGrammar.from_string('root ::= "unterminated'))
