"""Templated answers: made from what an answer copied, re-bound to a new step, refused when a
slot does not bind to exactly one value. Pure functions: no model loads."""

from __future__ import annotations

import json

import pytest

from milliwatt.cache.key import mask, situation
from milliwatt.cache.template import BindError, Context, Source, Template, make_template, shape
from milliwatt.types import Step

SYSTEM = {"role": "system", "content": "You are an airline agent."}
ASK_ID = {"role": "assistant", "content": "Could you give me your user id and the reservation id?"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def call(name: str, args: dict, id_: str = "c1") -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


def result(payload: object, id_: str = "c1") -> dict:
    return {"role": "tool", "tool_call_id": id_, "content": payload if isinstance(payload, str) else json.dumps(payload)}


def args_of(message: dict) -> tuple[str, dict]:
    fn = message["tool_calls"][0]["function"]
    return fn["name"], json.loads(fn["arguments"])


def test_a_tool_call_that_copies_an_id_from_the_user_is_rebound_to_the_new_users_id() -> None:
    first = [SYSTEM, user("Hi"), ASK_ID, user("Sure, my user id is mia_li_3668.")]
    template = make_template(first, call("get_user_details", {"user_id": "mia_li_3668"}))
    assert template is not None and template.slots == (Source("user", shape("mia_li_3668")),)

    later = [SYSTEM, user("Hello"), ASK_ID, user("It's omar_davis_3817, thanks")]
    assert args_of(template.bind(Context(later))) == ("get_user_details", {"user_id": "omar_davis_3817"})


def test_values_from_a_tool_result_bind_by_their_path_and_keep_their_type() -> None:
    profile = {"name": {"first_name": "Mia"}, "reservations": ["NO6JO3"], "membership": "gold"}
    first = [SYSTEM, user("cancel my trip, I'm mia_li_3668"), call("get_user_details", {"user_id": "mia_li_3668"}), result(profile)]
    answer = call("get_reservation_details", {"reservation_id": "NO6JO3"}, "c2")
    template = make_template(first, answer)
    assert template is not None and template.slots == (Source("result", "reservations[0]", "get_user_details"),)

    other = {"name": {"first_name": "Omar"}, "reservations": ["ZFA04Y"], "membership": "silver"}
    later = [SYSTEM, user("cancel my trip, I'm omar_davis_3817"), call("get_user_details", {"user_id": "omar_davis_3817"}), result(other)]
    assert args_of(template.bind(Context(later))) == ("get_reservation_details", {"reservation_id": "ZFA04Y"})

    amounts = [SYSTEM, user("how much is left to pay?"), call("calculate", {"expression": "305 - 250"}), result("55.0")]
    pay = make_template(amounts, call("send_certificate", {"user_id": "x", "amount": 55}, "c9"))
    assert pay is not None and pay.typed == ("int",)
    later_amounts = [SYSTEM, user("how much is left to pay?"), call("calculate", {"expression": "400 - 250"}), result("150.0")]
    assert args_of(pay.bind(Context(later_amounts)))[1]["amount"] == 150


def test_a_slot_that_binds_to_nothing_or_to_several_values_is_refused_with_the_reason() -> None:
    template = make_template([SYSTEM, ASK_ID, user("my reservation is ZFA04Y")], call("get_reservation_details", {"reservation_id": "ZFA04Y"}))
    assert template is not None

    with pytest.raises(BindError, match=r"slot 0 \(token shaped '9A' in the latest user message\) binds to nothing"):
        template.bind(Context([SYSTEM, ASK_ID, user("I don't remember it")]))
    with pytest.raises(BindError, match="binds to 2 values"):
        template.bind(Context([SYSTEM, ASK_ID, user("either 8JX2WO or NO6JO3")]))
    with pytest.raises(BindError, match="binds to nothing"):
        path_template = Template("tool_calls", [["f", {"x": {"$slot": 0}}]], (Source("result", "reservations[0]", "get_user_details"),), ("str",))
        path_template.bind(Context([SYSTEM, user("hi")]))


def test_text_answers_are_templated_only_when_every_number_came_from_the_context() -> None:
    ctx = [SYSTEM, user("status of HAT069?"), call("get_flight_status", {"flight": "HAT069"}), result({"status": "delayed", "gate": "B12"})]
    copied = make_template(ctx, {"role": "assistant", "content": "Flight HAT069 is delayed; it leaves from gate B12."})
    assert copied is not None and copied.kind == "text"
    later = [SYSTEM, user("status of HAT170?"), call("get_flight_status", {"flight": "HAT170"}), result({"status": "on time", "gate": "C3"})]
    assert copied.bind(Context(later))["content"] == "Flight HAT170 is delayed; it leaves from gate C3."

    computed = {"role": "assistant", "content": "Flight HAT069 costs $242 in all."}  # 242 is in no message: computed
    assert make_template(ctx, computed) is None
    assert make_template(ctx, {"role": "assistant", "content": "How can I help you today?"}) is None  # copies nothing


def test_templates_round_trip_through_json_and_refuse_unknown_kinds() -> None:
    template = make_template([SYSTEM, user("my id is mia_li_3668")], call("get_user_details", {"user_id": "mia_li_3668"}))
    assert template is not None
    assert Template.from_json(json.loads(json.dumps(template.to_json()))) == template
    with pytest.raises(ValueError, match="unknown template kind"):
        Template.from_json({**template.to_json(), "kind": "code"})
    with pytest.raises(ValueError, match="unknown slot source"):
        Template.from_json({**template.to_json(), "slots": [["system", "", "", 0]]})


def test_the_situation_is_the_shape_of_recent_turns_with_values_masked() -> None:
    a = Step.create([SYSTEM, user("Hi"), ASK_ID, user("my id is mia_li_3668")])
    b = Step.create([SYSTEM, user("Hello there"), ASK_ID, user("my id is omar_davis_3817")])
    after_call = Step.create([SYSTEM, user("Hi"), call("get_user_details", {"user_id": "x_1"}), result({}), user("my id is mia_li_3668")])
    assert situation(a).shape == situation(b).shape and situation(a).text == situation(b).text
    assert situation(a).shape != situation(after_call).shape  # the agent's previous move differs
    assert mask("reservation ZFA04Y for mia_li_3668") == "reservation <9A> for <9_a>"
