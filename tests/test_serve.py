"""``milliwatt serve``: the OpenAI-compatible endpoint (``milliwatt.serve``).

Most tests talk to the ASGI app in process (httpx.ASGITransport); one runs a real uvicorn server on
a loopback port and talks to it with the real ``openai`` client. Tiers are scripted: no model loads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from milliwatt import Milliwatt
from milliwatt.errors import RemoteAuthError, RemoteBadRequest, RemoteRateLimited, RemoteTimeout, RemoteUnavailable
from milliwatt.ledger import Ledger
from milliwatt.serve import create_app
from milliwatt.testing import ScriptedTier
from milliwatt.tier import Tier, TierStream
from milliwatt.types import Energy, TierResult

KEY = "mwk-client-7f3a9c1e5b2d4f60"  # a client key with no recognisable shape: redacted because registered
OTHER_KEY = "mwk-second-0c8e2a4b6d1f3e57"
WRONG_KEY = "mwk-wrong-key-99887766554433"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_user_details",
            "description": "Look a user up",
            "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]},
        },
    }
]


def answer(step):
    text = step.last_user_text
    if "look up" in text:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc123", "type": "function", "function": {"name": "get_user_details", "arguments": '{"user_id": "mia_li_3668"}'}}
        ]}  # fmt: skip
    if "hi" in text:
        return {"role": "assistant", "content": "Hello! How can I help?"}
    return None


def last_resort(step):
    return {"role": "assistant", "content": "The frontier stand-in answers."}


class Drip(Tier):
    """Streams its answer a word at a time, with a pause between words (a local decode)."""

    def __init__(self, name: str = "local", words: int = 40, pause_s: float = 0.02) -> None:
        self.name = name
        self.words = words
        self.pause_s = pause_s
        self.produced = 0
        self.closed = asyncio.Event()

    async def attempt(self, step):
        text = " ".join(f"w{i}" for i in range(self.words))
        return TierResult(self.name, {"role": "assistant", "content": text}, "drip", Energy.zero(), model="drip")

    async def stream(self, step):
        return _DripStream(self)


class _DripStream(TierStream):
    def __init__(self, owner: Drip) -> None:
        self.owner = owner
        self.tier = owner.name
        self.parts: list[str] = []

    async def __anext__(self):
        o = self.owner
        if len(self.parts) >= o.words:
            raise StopAsyncIteration
        await asyncio.sleep(o.pause_s)
        i = len(self.parts)
        self.parts.append(f"w{i} ")
        o.produced += 1
        delta = {"content": f"w{i} "} if i else {"role": "assistant", "content": f"w{i} "}
        return {"id": "x", "object": "chat.completion.chunk", "model": "drip",
                "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if i == o.words - 1 else None}]}  # fmt: skip

    def _result(self, reason: str) -> TierResult:
        message = {"role": "assistant", "content": "".join(self.parts)}
        return TierResult(self.tier, message, reason, Energy("cpu-time", 0.0, 1e-6, 2e-6), model="drip", output_tokens=len(self.parts))

    async def result(self):
        return self._result("drip answered")

    async def partial(self):
        return self._result("drip cut off")

    async def aclose(self):
        self.owner.closed.set()


class Failing(Tier):
    def __init__(self, error: Exception) -> None:
        self.name = "remote"
        self.error = error

    async def attempt(self, step):
        raise self.error


@pytest.fixture(scope="module", autouse=True)
def _tokenizer_loaded():
    from milliwatt.tokens import encoding

    encoding()


def make_mw(tmp_path: Path, *tiers: Tier) -> Milliwatt:
    tiers = tiers or (ScriptedTier("rules", answer), ScriptedTier("remote", last_resort))
    return Milliwatt(list(tiers), ledger=Ledger(tmp_path / "ledger.db"))


def client(app, key: str | None = None, **headers: str) -> httpx.AsyncClient:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://milliwatt", headers=headers)


def steps(tmp_path: Path) -> list[dict]:
    con = sqlite3.connect(tmp_path / "ledger.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM steps ORDER BY started_at")]
    finally:
        con.close()


def attempts(tmp_path: Path) -> list[dict]:
    con = sqlite3.connect(tmp_path / "ledger.db")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM attempts ORDER BY step_id, ordinal")]
    finally:
        con.close()


def sse(text: str) -> list:
    """The events of a text/event-stream body: JSON objects, and "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(r: httpx.Response, status: int, *, param=..., code=..., type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_
    if param is not ...:
        assert err["param"] == param
    if code is not ...:
        assert err["code"] == code
    return err


HI = [{"role": "user", "content": "hi there"}]


# --------------------------------------------------------------------------- answers


@pytest.mark.asyncio(loop_scope="session")
async def test_completion_has_openai_shape_and_the_tier_in_a_header(tmp_path):
    mw = make_mw(tmp_path)
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HI})
    await mw.aclose()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o"  # the request's, echoed
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hello! How can I help?"
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert r.headers["x-milliwatt-tier"] == "rules"
    [row] = steps(tmp_path)
    assert r.headers["x-milliwatt-step"] == row["id"]
    assert row["tier"] == "rules"


@pytest.mark.asyncio(loop_scope="session")
async def test_tools_tool_choice_and_response_format_pass_through(tmp_path):
    rules = ScriptedTier("rules", answer)
    mw = make_mw(tmp_path, rules, ScriptedTier("remote", last_resort))
    choice = {"type": "function", "function": {"name": "get_user_details"}}
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "please look up mia"}], "tools": TOOLS,
            "tool_choice": choice, "temperature": 0.2, "max_completion_tokens": 64, "seed": 7,
        })  # fmt: skip
        r2 = await c.post("/v1/chat/completions", json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "what now?"}],
            "response_format": {"type": "json_object"}, "store": False,
        })  # fmt: skip
    await mw.aclose()
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    [call] = message["message"]["tool_calls"]
    assert call == {"id": "call_abc123", "type": "function",
                    "function": {"name": "get_user_details", "arguments": '{"user_id": "mia_li_3668"}'}}  # fmt: skip
    seen = rules.seen[0]
    assert [t["function"]["name"] for t in seen.tools] == ["get_user_details"]
    assert seen.tool_choice == choice
    assert seen.options == {"temperature": 0.2, "max_tokens": 64, "seed": 7}
    assert r2.status_code == 200, r2.text
    assert rules.seen[1].response_format == {"type": "json_object"}
    assert r2.headers["x-milliwatt-tier"] == "remote"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_whole_answer_streams_as_server_sent_events_with_usage(tmp_path):
    mw = make_mw(tmp_path)
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "please look up mia"}], "tools": TOOLS,
            "stream": True, "stream_options": {"include_usage": True},
        })  # fmt: skip
    await mw.aclose()
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-milliwatt-tier"] == "rules"  # a whole answer: its tier is known before the first byte
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gpt-4o-mini" for c in chunks)
    *body, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in body)
    calls = [tc for c in body for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"] == "call_abc123" and calls[0]["index"] == 0
    assert body[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_streaming_tier_streams_chunk_by_chunk(tmp_path):
    drip = Drip(words=5, pause_s=0.0)
    mw = make_mw(tmp_path, ScriptedTier("rules", lambda s: None), drip)
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": HI, "stream": True})
    await mw.aclose()
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert text == "w0 w1 w2 w3 w4 "
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in events[0]  # not asked for
    [row] = steps(tmp_path)
    assert row["tier"] == "local" and row["output_tokens"] == 5


@pytest.mark.asyncio(loop_scope="session")
async def test_models_lists_milliwatt_and_the_frontier_model(tmp_path):
    mw = make_mw(tmp_path)
    app = create_app(mw)
    async with client(app) as c:
        r = await c.get("/v1/models")
        one = await c.get("/v1/models/milliwatt")
        missing = await c.get("/v1/models/nope")
    await mw.aclose()
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == "milliwatt" and "openai/gpt-4o" in ids
    assert all(m["object"] == "model" and set(m) == {"id", "object", "created", "owned_by"} for m in body["data"])
    assert one.json()["id"] == "milliwatt"
    assert_openai_error(missing, 404, code="model_not_found")


# --------------------------------------------------------------------------- identity


@pytest.mark.asyncio(loop_scope="session")
async def test_identity_from_headers_and_metadata_lands_in_the_ledger(tmp_path):
    mw = make_mw(tmp_path)
    async with client(create_app(mw)) as c:
        r1 = await c.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": HI, "user": "body-user",
                  "metadata": {"session_id": "meta-session", "tenant": "meta-tenant", "topic": "billing"}},
            headers={"X-Milliwatt-Session": "hdr-session", "X-Milliwatt-Agent": "support", "X-Milliwatt-Run": "run-9"},
        )  # fmt: skip
        r2 = await c.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": HI, "user": "body-user",
                  "metadata": {"session_id": "s2", "tenant": "acme", "agent": "triage", "run_id": "r2"}},
            headers={"X-Milliwatt-User": "hdr-user"},
        )  # fmt: skip
    await mw.aclose()
    assert r1.status_code == r2.status_code == 200
    first, second = steps(tmp_path)
    # Headers win over metadata; metadata fills what the headers leave out.
    assert (first["session_id"], first["tenant"], first["agent"], first["run_id"], first["user_id"]) == (
        "hdr-session", "meta-tenant", "support", "run-9", "body-user")  # fmt: skip
    assert json.loads(first["meta_json"]) == {"topic": "billing"}
    assert (second["session_id"], second["tenant"], second["agent"], second["run_id"], second["user_id"]) == (
        "s2", "acme", "triage", "r2", "hdr-user")  # fmt: skip


# --------------------------------------------------------------------------- bad input

BAD_BODIES = [
    # (body, status, param, code)
    ({"messages": HI}, 400, None, None),  # no model
    ({"model": "m"}, 400, "messages", "missing_required_parameter"),
    ({"model": "m", "messages": []}, 400, "messages", "empty_array"),
    ({"model": "m", "messages": "hi"}, 400, "messages", "invalid_type"),
    ({"model": "m", "messages": HI, "frobnicate": 1}, 400, None, None),  # OpenAI: "Unrecognized request argument supplied"
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", ...),
    ({"model": "m", "messages": [{"role": "user"}]}, 400, "messages[0].content", ...),
    ({"model": "m", "messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}]}, 400, "messages[0].tool_call_id", ...),
    ({"model": "m", "messages": HI, "temperature": 3}, 400, "temperature", "decimal_above_max_value"),
    ({"model": "m", "messages": HI, "temperature": "hot"}, 400, "temperature", ...),
    ({"model": "m", "messages": HI, "top_p": -0.5}, 400, "top_p", "decimal_below_min_value"),
    ({"model": "m", "messages": HI, "max_tokens": 0}, 400, "max_tokens", "integer_below_min_value"),
    ({"model": "m", "messages": HI, "n": 3}, 400, "n", ...),
    ({"model": "m", "messages": HI, "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"model": "m", "messages": HI, "stream_options": {"include_usage": True}}, 400, "stream_options", ...),
    ({"model": "m", "messages": HI, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "tool_choice.function.name", ...),
    ({"model": "m", "messages": HI, "tool_choice": "required"}, 400, "tool_choice", ...),
    ({"model": "m", "messages": HI, "tools": [{"type": "function", "function": {}}]}, 400, "tools[0].function.name", ...),
    ({"model": "m", "messages": HI, "response_format": {"type": "yaml"}}, 400, "response_format.type", "invalid_value"),
    ({"model": "m", "messages": HI, "metadata": {"k": 1}}, 400, "metadata.k", "invalid_type"),
    ({"model": "m", "messages": HI, "user": 42}, 400, "user", "invalid_type"),
    ([{"model": "m"}], 400, None, None),  # not an object
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("body,status,param,code", BAD_BODIES)
async def test_a_request_openai_would_reject_gets_its_status_and_error_shape(tmp_path, body, status, param, code):
    mw = make_mw(tmp_path)
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json=body)
        streamed = await c.post("/v1/chat/completions", json=body | {"stream": True}) if isinstance(body, dict) and "stream" not in body and "stream_options" not in body else None
    await mw.aclose()
    assert_openai_error(r, status, param=param, code=code)
    if streamed is not None:  # a streamed request is refused the same way, before any event
        assert_openai_error(streamed, status, param=param)
    assert steps(tmp_path) == []  # nothing asked of the tiers, nothing recorded


@pytest.mark.asyncio(loop_scope="session")
async def test_malformed_json_oversized_bodies_unknown_paths_and_methods(tmp_path):
    mw = make_mw(tmp_path)
    async with client(create_app(mw, max_body_bytes=1000)) as c:
        bad_json = await c.post("/v1/chat/completions", content=b'{"model": "m", "messages": [', headers={"content-type": "application/json"})
        not_utf8 = await c.post("/v1/chat/completions", content=b"\xff\xfe{}")
        big = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]})
        async def parts():
            for _ in range(3):
                yield b"x" * 600

        chunked = await c.post("/v1/chat/completions", content=parts())  # no Content-Length
        unknown = await c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        wrong_method = await c.get("/v1/chat/completions")
    await mw.aclose()
    assert_openai_error(bad_json, 400, param=None)
    assert "JSON" in bad_json.json()["error"]["message"]
    assert_openai_error(not_utf8, 400, param=None)
    assert_openai_error(big, 413, code="request_too_large")
    assert_openai_error(chunked, 413, code="request_too_large")
    err = assert_openai_error(unknown, 404)
    assert err["message"] == "Invalid URL (POST /v1/completions)"
    assert_openai_error(wrong_method, 405)
    assert "POST" in wrong_method.headers["allow"]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    "error,status,type_,code",
    [
        (RemoteRateLimited("slow down", status_code=429), 429, "requests", "rate_limit_exceeded"),
        (RemoteTimeout("no answer in 60 s"), 504, "server_error", "upstream_timeout"),
        (RemoteAuthError("Incorrect API key provided: sk-proj-abcdefghijklmnop1234", status_code=401), 502, "server_error", "upstream_auth_error"),
        (RemoteUnavailable("connection refused"), 502, "server_error", "upstream_error"),
        (RemoteBadRequest("context too long", status_code=400), 400, "invalid_request_error", "upstream_bad_request"),
        (RemoteBadRequest("model not found", status_code=404), 502, "server_error", "upstream_error"),
        (RuntimeError("boom sk-proj-abcdefghijklmnop1234"), 502, "server_error", "upstream_error"),  # a tier crashing
    ],
)
async def test_remote_failures_map_to_gateway_errors(tmp_path, caplog, error, status, type_, code):
    mw = make_mw(tmp_path, ScriptedTier("rules", lambda s: None), Failing(error))
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": HI})
        s = await c.post("/v1/chat/completions", json={"model": "m", "messages": HI, "stream": True})
    await mw.aclose()
    assert_openai_error(r, status, type_=type_, code=code)
    assert_openai_error(s, status, type_=type_, code=code)  # failed before the first chunk: an ordinary error
    assert "sk-proj-abcdefghijklmnop1234" not in r.text + s.text + caplog.text


@pytest.mark.asyncio(loop_scope="session")
async def test_an_internal_failure_is_a_500_server_error_logged_redacted(tmp_path, caplog):
    mw = make_mw(tmp_path)

    async def broken_step(*args, **kwargs):
        raise RuntimeError("ledger exploded at sk-proj-abcdefghijklmnop1234")

    def broken_stream(*args, **kwargs):
        raise RuntimeError("ledger exploded at sk-proj-abcdefghijklmnop1234")

    mw.step, mw.stream = broken_step, broken_stream
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": HI})
        s = await c.post("/v1/chat/completions", json={"model": "m", "messages": HI, "stream": True})
    await mw.aclose()
    for resp in (r, s):
        err = assert_openai_error(resp, 500, type_="server_error", code=None, param=None)
        assert "exploded" not in err["message"]  # the details go to the log, not to the client
    assert "ledger exploded at [REDACTED]" in caplog.text
    assert "sk-proj-abcdefghijklmnop1234" not in caplog.text


# --------------------------------------------------------------------------- keys


@pytest.mark.asyncio(loop_scope="session")
async def test_client_keys_are_checked_and_never_written_anywhere(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    mw = make_mw(tmp_path)
    app = create_app(mw, api_keys=[KEY, OTHER_KEY])
    async with client(app) as anon, client(app, WRONG_KEY) as wrong, client(app, KEY) as good, client(app, OTHER_KEY) as other:
        missing = await anon.post("/v1/chat/completions", json={"model": "m", "messages": HI})
        basic = await anon.post("/v1/chat/completions", json={"model": "m", "messages": HI}, headers={"Authorization": f"Basic {KEY}"})
        bad = await wrong.post("/v1/chat/completions", json={"model": "m", "messages": HI})
        bad_models = await wrong.get("/v1/models")
        ok = await good.post("/v1/chat/completions", json={"model": "m", "messages": HI}, headers={"X-Milliwatt-Session": "s1"})
        ok_stream = await other.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "why?"}], "stream": True})
        ok_models = await good.get("/v1/models")
        health = await anon.get("/health")
        invalid = await good.post("/v1/chat/completions", json={"model": "m", "messages": HI, "temperature": 9})
        failing = await good.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": "nope"})
    await mw.aclose()
    assert_openai_error(missing, 401, code=None)
    assert_openai_error(basic, 401)
    assert_openai_error(bad, 401, code="invalid_api_key")
    assert_openai_error(bad_models, 401, code="invalid_api_key")
    assert WRONG_KEY not in bad.text  # OpenAI echoes a masked key; this echoes none of it
    assert ok.status_code == 200 and ok_stream.status_code == 200 and ok_models.status_code == 200
    assert health.status_code == 200
    assert invalid.status_code == 400 and failing.status_code == 400
    assert len(steps(tmp_path)) == 2
    # Neither key in any byte the ledger wrote (database, journal, spool), nor in the logs.
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for key in (KEY, OTHER_KEY, WRONG_KEY):
        assert key.encode() not in stored
        assert key not in caplog.text
    # Registered with milliwatt.redaction: a key that reaches a message is redacted.
    from milliwatt.redaction import redact

    assert KEY not in redact(f"the client sent {KEY}")


def test_keys_too_short_to_redact_are_refused():
    from milliwatt.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 8"):
        create_app(Milliwatt([ScriptedTier("remote", last_resort)]), api_keys=["short"])
    with pytest.raises(ConfigError, match="no client key"):
        create_app(Milliwatt([ScriptedTier("remote", last_resort)]), api_keys=["  "])


# --------------------------------------------------------------------------- disconnects


async def _call_asgi(app, body: dict, *, disconnect_after_events: int | None = None, disconnect_after_s: float | None = None):
    """Drive the ASGI app as a server would, with a client that goes away part-way."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    events = asyncio.Event()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if disconnect_after_s is not None:
            await asyncio.sleep(disconnect_after_s)
        else:
            await events.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        bodies = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after_events is not None and len(bodies) >= disconnect_after_events:
            events.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.mark.asyncio(loop_scope="session")
async def test_a_client_that_disconnects_mid_stream_stops_the_decode_and_the_step_is_recorded(tmp_path):
    drip = Drip(words=200, pause_s=0.01)
    mw = make_mw(tmp_path, ScriptedTier("rules", lambda s: None), drip)
    app = create_app(mw)
    t0 = time.perf_counter()
    sent = await _call_asgi(app, {"model": "m", "messages": HI, "stream": True}, disconnect_after_events=3)
    elapsed = time.perf_counter() - t0
    await mw.aclose()
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert elapsed < 1.0  # 200 words would take 2 s: the stream stopped
    await asyncio.wait_for(drip.closed.wait(), 1)
    produced = drip.produced
    await asyncio.sleep(0.05)
    assert drip.produced == produced < 200  # no word decoded after the stop
    [row] = steps(tmp_path)
    assert row["tier"] == "cancelled"
    cut = [a for a in attempts(tmp_path) if a["tier"] == "local"]
    assert cut[0]["outcome"] == "cancelled"
    assert json.loads(cut[0]["evidence_json"])["partial"]["content"].startswith("w0 w1 w2")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_client_that_disconnects_before_a_whole_answer_cancels_the_step(tmp_path):
    slow = ScriptedTier("remote", last_resort, delay_s=5.0)
    mw = make_mw(tmp_path, ScriptedTier("rules", lambda s: None), slow)
    t0 = time.perf_counter()
    sent = await _call_asgi(create_app(mw), {"model": "m", "messages": HI}, disconnect_after_s=0.1)
    elapsed = time.perf_counter() - t0
    await mw.aclose()
    assert elapsed < 2.0
    assert all(m.get("body", b"") in (b"",) for m in sent if m["type"] == "http.response.body")
    [row] = steps(tmp_path)
    assert row["tier"] == "cancelled"
    assert [a["outcome"] for a in attempts(tmp_path)][-1] == "cancelled"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stream_the_provider_breaks_ends_with_an_error_event(tmp_path):
    from milliwatt.errors import RemoteStreamError

    class Breaks(Drip):
        async def stream(self, step):
            inner = _DripStream(self)

            class _Broken(_DripStream):
                async def __anext__(s):
                    if len(inner.parts) == 2:
                        raise RemoteStreamError("connection dropped", status_code=None)
                    return await inner.__anext__()

                async def partial(s):
                    return await inner.partial()

            return _Broken(self)

    mw = make_mw(tmp_path, ScriptedTier("rules", lambda s: None), Breaks(words=10, pause_s=0))
    async with client(create_app(mw)) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": HI, "stream": True})
    await mw.aclose()
    assert r.status_code == 200
    events = sse(r.text)
    assert "[DONE]" not in events
    assert events[-1]["error"]["type"] == "server_error" and events[-1]["error"]["code"] == "upstream_error"
    [row] = steps(tmp_path)
    assert row["tier"] == "error"


# --------------------------------------------------------------------------- a real server, the real client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_client_against_a_real_uvicorn_server(tmp_path):
    import openai
    import uvicorn

    drip = Drip(words=6, pause_s=0.0)

    def rules(step):
        return answer(step) if "stream" not in step.last_user_text else None

    mw = make_mw(tmp_path, ScriptedTier("rules", rules), drip)
    port = _free_port()
    config = uvicorn.Config(create_app(mw, api_keys=[KEY], close_on_shutdown=True), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port}/v1"
        oa = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0,
                           default_headers={"X-Milliwatt-Session": "real-1", "X-Milliwatt-Tenant": "acme"})  # fmt: skip
        plain = oa.chat.completions.create(model="gpt-4o", messages=HI)
        assert plain.choices[0].message.content == "Hello! How can I help?"
        assert plain.model == "gpt-4o" and plain.usage.total_tokens > 0
        raw = oa.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "look up mia"}], tools=TOOLS, tool_choice="required")
        assert raw.headers["x-milliwatt-tier"] == "rules"
        called = raw.parse()
        assert called.choices[0].finish_reason == "tool_calls"
        assert called.choices[0].message.tool_calls[0].function.name == "get_user_details"
        pieces, usage = [], None
        for chunk in oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "stream please"}],
                                                stream=True, stream_options={"include_usage": True}):  # fmt: skip
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == "w0 w1 w2 w3 w4 w5 "
        assert usage is not None and usage.completion_tokens == 6
        assert [m.id for m in oa.models.list()][0] == "milliwatt"
        with pytest.raises(openai.AuthenticationError) as bad_key:
            openai.OpenAI(base_url=base, api_key=WRONG_KEY, max_retries=0).chat.completions.create(model="gpt-4o", messages=HI)
        assert bad_key.value.code == "invalid_api_key"
        with pytest.raises(openai.BadRequestError) as bad:
            oa.chat.completions.create(model="gpt-4o", messages=HI, temperature=5)
        assert bad.value.param == "temperature"
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()
    # The lifespan closed the client: every step is in the ledger.
    rows = steps(tmp_path)
    assert len(rows) == 3
    assert {(r["session_id"], r["tenant"]) for r in rows} == {("real-1", "acme")}
    assert KEY.encode() not in b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
