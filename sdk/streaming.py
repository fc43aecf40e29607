"""Streamed answers: OpenAI ``chat.completion.chunk`` dicts, put together and handed out.

``Milliwatt.stream`` returns a ``StepStream``: an async iterator of chunk dicts (and an
async context manager that closes it), with ``result`` (the ``StepResult``, as
``Milliwatt.step`` returns it) once the stream has ended::

    async with mw.stream(messages, tools=tools, session_id="s1") as stream:
        async for chunk in stream:
            delta = chunk["choices"][0]["delta"]
            print(delta.get("content") or "", end="")
    messages.append(stream.result.message)

A tier that answers whole (rules, cache, local) hands its answer out as one chunk; the
remote tier streams it as the provider sends it. Every chunk has one choice with a
``delta`` (``role``, ``content``, ``tool_calls`` deltas with their ``index``), and the last
one its ``finish_reason``. ``ChunkAssembler`` turns the deltas back into the message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

from .types import Message

if TYPE_CHECKING:
    from .types import StepRecord, StepResult

Chunk = dict[str, Any]


class ChunkAssembler:
    """Puts streamed chunks back together: the assistant message so far, the finish reason,
    the usage a provider reported (its last chunk, with ``stream_options.include_usage``)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.id: str | None = None

    def add(self, chunk: Chunk) -> None:
        self.chunks += 1
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        if chunk.get("usage"):
            self.usage = dict(chunk["usage"])
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for position, call in enumerate(delta.get("tool_calls") or []):
                index = call.get("index", position)
                into = self.calls.setdefault(index, {"id": None, "name": "", "arguments": ""})
                if call.get("id"):
                    into["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    into["name"] = fn["name"]  # sent once, whole
                if fn.get("arguments"):
                    into["arguments"] += fn["arguments"]
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def message(self) -> Message:
        """The assistant message as far as it came, in the shape a whole answer has (content
        None beside tool calls, as OpenAI sends it unstreamed)."""
        content = "".join(self.content)
        message: Message = {"role": "assistant", "content": content}
        calls = [self.calls[i] for i in sorted(self.calls)]
        if calls:
            message["tool_calls"] = [
                {"id": c["id"] or f"call_{i}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"] or "{}"}}
                for i, c in enumerate(calls)
            ]
            if not content:
                message["content"] = None
        return message


def message_chunks(message: Message, *, model: str | None = None, chunk_id: str | None = None) -> list[Chunk]:
    """A whole answer as a stream: one chunk carrying all of it, with its finish reason."""
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    calls = message.get("tool_calls") or []
    if calls:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
    finish = "tool_calls" if calls else "stop"
    return [_chunk(delta, finish, model=model, chunk_id=chunk_id)]


def _chunk(delta: dict[str, Any], finish: str | None, *, model: str | None, chunk_id: str | None) -> Chunk:
    return {
        "id": chunk_id or "chatcmpl-milliwatt",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def finish_reason(chunk: Chunk) -> str | None:
    choices = chunk.get("choices") or []
    return choices[0].get("finish_reason") if choices else None


def split_tool_calls(chunk: Chunk) -> tuple[Chunk | None, Chunk | None]:
    """A chunk as (what it says but tool calls, its tool-call deltas): either may be None."""
    choices = chunk.get("choices") or []
    delta = (choices[0].get("delta") or {}) if choices else {}
    if not delta.get("tool_calls"):
        return chunk, None
    rest = {k: v for k, v in delta.items() if k != "tool_calls"}
    calls = {**chunk, "choices": [{**choices[0], "delta": {"tool_calls": delta["tool_calls"]}}]}
    if not rest.get("content") and not rest.get("role"):
        return None, calls
    return {**chunk, "choices": [{**choices[0], "delta": rest}]}, calls


def content_of(chunk: Chunk) -> str:
    choices = chunk.get("choices") or []
    return ((choices[0].get("delta") or {}).get("content") or "") if choices else ""


class StreamOutcome:
    """Where a stream's producer leaves the ``StepResult`` when the stream ends."""

    __slots__ = ("result",)

    def __init__(self) -> None:
        self.result: StepResult | None = None


class StepStream:
    """One streamed step: iterate it for OpenAI chunk dicts; ``result`` once it has ended.

    Ending it early (``aclose``, leaving ``async with``, cancelling the task that reads it)
    stops the provider's stream and records the step as ``cancelled``, with the partial
    answer and the energy of the tokens received. A stream the provider breaks part-way
    raises a typed error (``RemoteStreamError``) and is recorded as failed, likewise with
    the partial answer. Retries and fallbacks happen only before the first chunk.
    Use it as an async context manager, or ``aclose`` it, so that a stream left unfinished
    is recorded at once (otherwise it is when the garbage collector finds it).
    """

    def __init__(self, chunks: Callable[[StreamOutcome], AsyncGenerator[Chunk, None]]) -> None:
        # The generator gets the outcome, not this object: no cycle, so a stream dropped
        # unfinished is closed (and recorded) as soon as it is let go.
        self._outcome = StreamOutcome()
        self._chunks = chunks(self._outcome)

    @property
    def result(self) -> StepResult | None:
        """The ``StepResult`` once the stream has ended (None before, or if it did not end well)."""
        return self._outcome.result

    @property
    def record(self) -> StepRecord | None:
        return self.result.record if self.result is not None else None

    def __aiter__(self) -> StepStream:
        return self

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def __aenter__(self) -> StepStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
