"""The one place that translates between OpenAI's chat-completions HTTP API and ``Milliwatt``.

* ``parse_request``: a request body (and the identity headers) to the keyword arguments of
  ``Milliwatt.step`` / ``Milliwatt.stream``, or an ``APIError`` in OpenAI's shape;
* ``completion``: a ``StepResult`` to a ``chat.completion`` object;
* ``chunk`` / ``usage_chunk``: a cascade chunk to a ``chat.completion.chunk`` of this response;
* ``error_for``: any exception to the OpenAI error (status code, type, param, code) a client
  of the OpenAI API would get for the same failure.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and its status
codes: 400 for a request the API would reject (never 422), 401 for a missing or wrong key, 404
for an unknown path, 405, 413, 429, 500, and 502/503/504 when the provider behind the remote
tier fails (docs/integrations.md has the table).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    BackendError,
    InvalidRequestError,
    MilliwattError,
    NoTierAnswered,
    RemoteAuthError,
    RemoteBadRequest,
    RemoteRateLimited,
    RemoteTimeout,
)
from ..redaction import redact
from ..types import StepResult

# Identity headers (case-insensitive); each wins over the same key in the body's ``metadata``.
IDENTITY_HEADERS = {
    "x-milliwatt-session": "session_id",
    "x-milliwatt-tenant": "tenant",
    "x-milliwatt-agent": "agent",
    "x-milliwatt-run": "run_id",
    "x-milliwatt-user": "user",
}
# ``metadata`` keys read as identity when the header is absent; other keys go to StepMeta.extra.
METADATA_IDENTITY = ("session_id", "tenant", "agent", "run_id")
MAX_IDENTITY_CHARS = 512

# Every parameter OpenAI's chat-completions endpoint takes. A key outside this set is rejected
# as OpenAI rejects it ("Unrecognized request argument supplied").
OPENAI_PARAMS = frozenset({
    "model", "messages", "stream", "stream_options", "user", "metadata", "tools", "tool_choice",
    "response_format", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop",
    "presence_penalty", "frequency_penalty", "n", "logprobs", "top_logprobs", "parallel_tool_calls",
    "logit_bias", "store", "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
    "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier", "functions", "function_call",
})  # fmt: skip
# Read by the endpoint itself, not passed to the cascade as options.
_CONSUMED = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata", "tools", "tool_choice",
                       "response_format", "safety_identifier"})  # fmt: skip
# Provider-side bookkeeping with no effect on the answer: accepted and ignored.
_IGNORED = frozenset({"store", "service_tier", "prompt_cache_key"})

# OpenAI's ranges for the numeric sampling parameters (it answers 400 outside them).
_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
    "top_logprobs": (0, 20),
}


class APIError(Exception):
    """An error answered in OpenAI's shape with OpenAI's status code."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A parsed chat-completions request: what to ask the cascade, and how to answer."""

    model: str
    stream: bool
    include_usage: bool
    kwargs: dict[str, Any] = field(default_factory=dict)  # Milliwatt.step / Milliwatt.stream keyword arguments
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_request(body: Any, headers: Mapping[str, str]) -> ChatRequest:
    """The request as ``Milliwatt.step`` arguments; ``APIError`` (400) for what OpenAI would reject.

    Messages, tools, tool_choice and the sampling options are validated by ``Step.create``
    when the step is made; ``invalid_request`` maps its ``InvalidRequestError``. Here: the
    envelope (model, stream, stream_options, user, metadata), unknown parameters, ranges.
    """
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    unknown = sorted(set(body) - OPENAI_PARAMS)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}")
    model = body.get("model")
    if model is None or model == "":
        raise bad_request("you must provide a model parameter")
    if not isinstance(model, str):
        raise _invalid_type("model", "a string", model)
    if "messages" not in body:
        raise bad_request("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(body["messages"], list):
        raise _invalid_type("messages", "an array", body["messages"])
    if not body["messages"]:
        raise bad_request("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                          "messages", "empty_array")  # fmt: skip
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean", stream)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
        if not isinstance(stream_options, dict):
            raise _invalid_type("stream_options", "an object", stream_options)
        extra = sorted(set(stream_options) - {"include_usage", "include_obfuscation"})
        if extra:
            raise bad_request(f"Unrecognized request argument supplied: stream_options.{extra[0]}")
        include_usage = stream_options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise _invalid_type("stream_options.include_usage", "a boolean", include_usage)
    if body.get("functions") is not None or body.get("function_call") is not None:
        which = "functions" if body.get("functions") is not None else "function_call"
        raise bad_request(f"'{which}' is deprecated and not supported here: use 'tools' and 'tool_choice'.", which, "unsupported_parameter")
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise bad_request(f"Invalid value: {kind!r}. Supported values are: 'text', 'json_object', and 'json_schema'.",
                              "response_format.type", "invalid_value")  # fmt: skip
        if kind == "json_schema":
            schema = response_format.get("json_schema")
            if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
                raise bad_request("Missing required parameter: 'response_format.json_schema.name'.",
                                  "response_format.json_schema.name", "missing_required_parameter")  # fmt: skip

    kwargs: dict[str, Any] = {"messages": body["messages"]}
    for key in ("tools", "tool_choice", "response_format"):
        if body.get(key) is not None:
            kwargs[key] = body[key]
    kwargs.update(_identity(body, headers))
    options = _options(body)
    kwargs.update(options)
    return ChatRequest(model=model, stream=bool(stream), include_usage=include_usage, kwargs=kwargs)


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in body.items() if k not in _CONSUMED and k not in _IGNORED and v is not None}
    for key, (low, high) in _RANGES.items():
        value = options.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            side = "below minimum" if value < low else "above maximum"
            bound = f">= {low}" if value < low else f"<= {high}"
            raise bad_request(f"Invalid '{key}': decimal {side} value. Expected a value {bound}, but got {value} instead.",
                              key, f"decimal_{side.split()[0]}_{'min' if value < low else 'max'}_value")  # fmt: skip
    for key in ("max_tokens", "max_completion_tokens", "n"):
        value = options.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise bad_request(f"Invalid '{key}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
                              key, "integer_below_min_value")  # fmt: skip
    n = options.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise bad_request("milliwatt answers with one choice: 'n' must be 1.", "n", "unsupported_value")
    if options.get("top_logprobs") is not None and not options.get("logprobs"):
        raise bad_request("Invalid value for 'top_logprobs': 'logprobs' must be set to true.", "top_logprobs")
    if "max_completion_tokens" in options:
        # One cap for every tier: the cascade's option is max_tokens (litellm maps it per provider).
        value = options.pop("max_completion_tokens")
        options.setdefault("max_tokens", value)
    return options


def _identity(body: dict[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """session_id, run_id, tenant, agent, user and metadata: headers first, then the body."""
    out: dict[str, Any] = {}
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _invalid_type("metadata", "an object", metadata)
        if len(metadata) > 16:
            raise bad_request("Invalid 'metadata': too many properties. Expected an object with at most 16 properties, "
                              f"but got an object with {len(metadata)} properties instead.", "metadata", "object_above_max_properties")  # fmt: skip
        for key, value in metadata.items():
            if len(key) > 64:
                raise bad_request(f"Invalid 'metadata': key {key[:16]!r}... is longer than 64 characters.", "metadata", "invalid_value")
            if not isinstance(value, str):
                raise _invalid_type(f"metadata.{key}", "a string", value)
            if len(value) > 512:
                raise bad_request(f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length 512.",
                                  f"metadata.{key}", "string_above_max_length")  # fmt: skip
        metadata = dict(metadata)
        for key in METADATA_IDENTITY:
            if key in metadata:
                out[key] = metadata.pop(key)
        if metadata:
            out["metadata"] = metadata
    for key in ("user", "safety_identifier"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise _invalid_type(key, "a string", value)
    user = body.get("user") or body.get("safety_identifier")
    if user:
        out["user"] = user
    lowered = {k.lower(): v for k, v in headers.items()}
    for header, key in IDENTITY_HEADERS.items():
        value = lowered.get(header)
        if value is None:
            continue
        if len(value) > MAX_IDENTITY_CHARS:
            raise bad_request(f"Header '{header}' is longer than {MAX_IDENTITY_CHARS} characters.")
        if value:
            out[key] = value
    return out


def _invalid_type(param: str, expected: str, got: Any) -> APIError:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a decimal", list: "an array", dict: "an object",
             type(None): "null"}  # fmt: skip
    return bad_request(f"Invalid type for '{param}': expected {expected}, but got {names.get(type(got), type(got).__name__)} instead.",
                       param, "invalid_type")  # fmt: skip


def invalid_request(e: InvalidRequestError) -> APIError:
    """``Step.create``'s error, as OpenAI names a bad parameter (``options.`` is ours, not the API's)."""
    param = e.field.removeprefix("options.")
    if e.field.startswith("options.") and "unknown sampling option" in e.problem:
        return bad_request(f"Unsupported parameter: '{param}' is not supported by milliwatt.", param, "unsupported_parameter")
    return bad_request(f"Invalid '{param}': {e.problem}", param, "invalid_value")


# --------------------------------------------------------------------------- errors


def error_for(e: BaseException) -> APIError:
    """The OpenAI error a client gets for ``e``; messages are redacted (a provider may echo our key).

    A failure of the provider behind the remote tier is a gateway error (502/504), not the
    client's: even a provider's 401 means *our* provider key failed, so it is 502, never 401.
    """
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return invalid_request(e)
    text = redact(str(e))
    if isinstance(e, RemoteRateLimited):
        return APIError(429, f"The upstream provider is rate limiting: {text}", type="requests", code="rate_limit_exceeded")
    if isinstance(e, RemoteTimeout):
        return APIError(504, f"The upstream provider did not answer in time: {text}", type="server_error", code="upstream_timeout")
    if isinstance(e, RemoteAuthError):
        return APIError(502, "The upstream provider rejected milliwatt's credentials (a server configuration problem).",
                        type="server_error", code="upstream_auth_error")  # fmt: skip
    if isinstance(e, RemoteBadRequest):
        if e.status_code in (400, 413, 422):  # what the client sent (too long a context, a bad schema)
            return APIError(400, f"The upstream provider rejected the request: {text}", code="upstream_bad_request")
        return APIError(502, f"The upstream provider refused the request: {text}", type="server_error", code="upstream_error")
    if isinstance(e, BackendError):  # RemoteUnavailable, RemoteStreamError, any other backend failure
        return APIError(502, f"The upstream provider failed: {text}", type="server_error", code="upstream_error")
    if isinstance(e, NoTierAnswered):
        return APIError(503, f"No tier answered the step: {text}", type="server_error", code="no_tier_answered")
    if isinstance(e, MilliwattError):
        return APIError(500, f"milliwatt failed: {text}", type="server_error")
    return APIError(500, "The server had an error while processing your request.", type="server_error")


# --------------------------------------------------------------------------- answers


def finish_reason_of(result: StepResult, options: Mapping[str, Any]) -> str:
    if result.message.get("tool_calls"):
        return "tool_calls"
    for attempt in result.record.attempts:
        reason = (attempt.evidence or {}).get("finish_reason") if attempt.tier == result.record.tier else None
        if reason in ("stop", "length", "content_filter"):
            return reason
    cap = options.get("max_tokens")
    if isinstance(cap, int) and result.record.output_tokens >= cap:
        return "length"
    return "stop"


def assistant_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """The assistant message as OpenAI returns it: every tool call with an id and its type."""
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content"), "refusal": message.get("refusal")}
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [
            {"id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
            for c in calls
        ]  # fmt: skip
    return out


def usage_of(result: StepResult) -> dict[str, int]:
    record = result.record
    prompt, completion_tokens = record.input_tokens_sent, record.output_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def completion(req: ChatRequest, result: StepResult) -> dict[str, Any]:
    """A ``chat.completion`` object; ``model`` is the request's (the answering tier is a header)."""
    return {
        "id": req.id,
        "object": "chat.completion",
        "created": req.created,
        "model": req.model,
        "choices": [
            {"index": 0, "message": assistant_message(result.message), "logprobs": None,
             "finish_reason": finish_reason_of(result, req.kwargs)}
        ],  # fmt: skip
        "usage": usage_of(result),
        "system_fingerprint": None,
    }


def chunk(req: ChatRequest, upstream: Mapping[str, Any]) -> dict[str, Any] | None:
    """A cascade chunk as a chunk of this response (its id, created and model); None for a
    chunk carrying only a provider's usage (the endpoint sends its own, from the record)."""
    choices = [
        {"index": 0, "delta": dict(c.get("delta") or {}), "logprobs": None, "finish_reason": c.get("finish_reason")}
        for c in upstream.get("choices") or [] if c.get("index", 0) == 0
    ]  # fmt: skip
    if not choices:
        return None
    out: dict[str, Any] = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": req.model,
                           "system_fingerprint": None, "choices": choices}  # fmt: skip
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: ChatRequest, result: StepResult) -> dict[str, Any]:
    return {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": req.model,
            "system_fingerprint": None, "choices": [], "usage": usage_of(result)}  # fmt: skip


def models_list(ids: list[str], created: int = 0) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(i, created) for i in ids]}


def model_object(model_id: str, created: int = 0) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "milliwatt"}
