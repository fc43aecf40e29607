"""Bad input gets an InvalidRequestError (a ValueError) naming the field."""

import pytest

from milliwatt import InvalidRequestError, Step

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}


def call(id_="c1", args='{"id": "x"}'):
    return {"id": id_, "type": "function", "function": {"name": "lookup", "arguments": args}}


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "messages[1].content"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call(args="{bad")]}], "messages[1].tool_calls[0].function.arguments"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {}}]}], "messages[1].tool_calls[0].function.name"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "{}"}], "messages[1].tool_call_id"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}], "messages[1].tool_call_id"),
    ],
)
def test_malformed_messages_name_the_field(messages, field):
    with pytest.raises(InvalidRequestError) as err:
        Step.create(messages)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    assert field in str(err.value)


@pytest.mark.parametrize(
    "tools, field",
    [
        ({"type": "function"}, "tools"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "a", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
        ([TOOL, TOOL], "tools[1].function.name"),
    ],
)
def test_malformed_tools_name_the_field(tools, field):
    with pytest.raises(InvalidRequestError) as err:
        Step.create([{"role": "user", "content": "hi"}], tools=tools)
    assert err.value.field == field


def test_tool_choice_must_name_an_offered_tool():
    with pytest.raises(InvalidRequestError) as err:
        Step.create([{"role": "user", "content": "hi"}], tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}})
    assert err.value.field == "tool_choice.function.name"
    with pytest.raises(InvalidRequestError):
        Step.create([{"role": "user", "content": "hi"}], tool_choice="required")


def test_unknown_sampling_option_is_named():
    with pytest.raises(InvalidRequestError) as err:
        Step.create([{"role": "user", "content": "hi"}], options={"temprature": 0})
    assert err.value.field == "options.temprature"


def test_a_full_tool_loop_validates_and_round_trips():
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "look up x"}]},
        {"role": "assistant", "content": None, "tool_calls": [call()]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'},
    ]
    step = Step.create(msgs, tools=[TOOL], tool_choice="auto", response_format={"type": "text"}, options={"temperature": 0})
    assert step.last_user_text == "look up x"
    assert step.system_text == "sys"
    req = step.to_openai()
    assert req["messages"] == msgs and req["tools"] == [TOOL] and req["tool_choice"] == "auto" and req["temperature"] == 0


@pytest.mark.parametrize(
    "options, field",
    [({"temperature": "0.7"}, "options.temperature"), ({"n": "2"}, "options.n"), ({"max_tokens": 1.5}, "options.max_tokens"),
     ({"stop": 3}, "options.stop"), ({"logprobs": 1}, "options.logprobs")],
)
def test_sampling_option_types_are_checked(options, field):
    with pytest.raises(InvalidRequestError) as err:
        Step.create([{"role": "user", "content": "hi"}], options=options)
    assert err.value.field == field
