"""litellm front doors: a custom provider that answers through the cascade, and a callback
that records direct provider calls in milliwatt's ledger.

The provider: ``register(mw)`` puts milliwatt in ``litellm.custom_provider_map`` as provider
``milliwatt``, so an agent that calls litellm keeps its code and changes its model id::

    from milliwatt.integrations.litellm import register
    register(mw)
    response = await litellm.acompletion(model="milliwatt/support", messages=messages, tools=tools,
                                         metadata={"session_id": "s-1", "agent": "support", "tenant": "acme"})

Each call is one ``mw.step``: messages, tools, tool_choice, response_format and the sampling
options as sent; identity from ``metadata`` (``session_id``, ``run_id``, ``tenant``, ``agent``,
``user``; OpenAI's ``user`` parameter counts as the user). The answer is litellm's
``ModelResponse``: the assistant message with its tool calls and their ids, the finish reason
(``tool_calls`` or ``stop``), and usage as the ledger counted it (input tokens sent to the
answering tier, output tokens). Which tier answered is in ``response._hidden_params["milliwatt"]``
(tier, step id, model). ``stream=True`` streams (``astreaming``: ``mw.stream``'s chunks).
litellm's sync ``completion`` is not served: the cascade is async (use ``acompletion``).
``milliwatt/<name>``: ``register(mw, model="support")`` serves only ``milliwatt/support``, and
several instances can be registered under different names; ``register(mw)`` serves any name.

The callback: ``LedgerCallback(mw)`` in ``litellm.callbacks`` records every successful
``litellm.acompletion`` an agent makes to a provider directly (not through milliwatt) as a
step answered by the ``remote`` tier, labelled ``observed``: the request (messages, tools,
options, identity from ``metadata``), the provider's answer, its input and output tokens as
the provider reported them, the cost litellm computed, the latency, and the energy estimated
for the model called, with the step's counterfactual, exactly as the ledger books a remote
step. Calls milliwatt makes itself (its remote tier, the ``milliwatt`` provider) are not
recorded twice. It records, it never changes or delays the call; failed calls and calls made
with litellm's sync ``completion`` are not recorded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from milliwatt._offline import import_litellm
from milliwatt.energy import RemoteEnergyModel
from milliwatt.redaction import get_logger, redact
from milliwatt.tier import Tier, current_spend
from milliwatt.errors import InvalidRequestError
from milliwatt.serve.openai_compat import APIError, assistant_message, error_for, finish_reason_of, usage_of
from milliwatt.types import Energy, Message, Step, StepRecord, StepResult, TierResult

from ._request import step_arguments

litellm = import_litellm()  # offline: litellm's bundled price map, never a download

from litellm import CustomLLM, ModelResponse  # noqa: E402
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402
from litellm.llms.custom_llm import CustomLLMError  # noqa: E402

if TYPE_CHECKING:
    from milliwatt.client import Milliwatt

log = get_logger("milliwatt.integrations")

PROVIDER = "milliwatt"
OBSERVED = "observed"


def _response(model: str, result: StepResult, arguments: dict[str, Any]) -> ModelResponse:
    """The answer as the HTTP endpoint gives it (``openai_compat``): message, finish reason, usage."""
    record = result.record
    response = ModelResponse(
        id=f"chatcmpl-{record.step_id}",
        model=model,
        choices=[{"index": 0, "message": assistant_message(result.message), "finish_reason": finish_reason_of(result, arguments)}],
        usage=usage_of(result),
    )
    response._hidden_params["milliwatt"] = {"tier": record.tier, "step_id": record.step_id, "model": record.model}
    return response


class MilliwattProvider(CustomLLM):
    """litellm's ``milliwatt`` provider: each call is a step of the Milliwatt registered for
    its model name (``register``)."""

    def __init__(self) -> None:
        super().__init__()
        self.instances: dict[str | None, Milliwatt] = {}

    def _instance(self, model: str) -> Milliwatt:
        name = model.split("/", 1)[1] if model.startswith(f"{PROVIDER}/") else model
        mw = self.instances.get(name) or self.instances.get(None)
        if mw is None:
            raise CustomLLMError(404, f"no Milliwatt registered for model {PROVIDER}/{name} (milliwatt.integrations.litellm.register)")
        return mw

    @staticmethod
    def _arguments(messages: list, optional_params: dict[str, Any] | None, litellm_params: Any) -> dict[str, Any]:
        params = dict(optional_params or {})
        metadata = (litellm_params or {}).get("metadata") or {}
        return step_arguments(messages, params, metadata)

    def completion(self, model: str, messages: list, *args: Any, **kw: Any) -> ModelResponse:  # type: ignore[override]
        raise CustomLLMError(400, "the milliwatt provider answers async calls only: use litellm.acompletion")

    async def acompletion(self, model: str, messages: list, *args: Any, **kw: Any) -> ModelResponse:  # type: ignore[override]
        mw = self._instance(model)
        try:
            arguments = self._arguments(messages, kw.get("optional_params"), kw.get("litellm_params"))
            result = await mw.step(**arguments)
        except (APIError, InvalidRequestError) as e:
            err = error_for(e)
            raise CustomLLMError(err.status, err.message) from e
        return _response(model, result, arguments)

    async def astreaming(self, model: str, messages: list, *args: Any, **kw: Any) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        """``mw.stream``'s chunks as litellm's generic streaming chunks: text deltas, one
        chunk per tool-call delta (with its id, name and arguments), then the finish reason
        with the usage the ledger counted."""
        mw = self._instance(model)
        try:
            arguments = self._arguments(messages, kw.get("optional_params"), kw.get("litellm_params"))
        except APIError as e:
            raise CustomLLMError(e.status, e.message) from e
        finish = "stop"
        async with mw.stream(**arguments) as stream:
            async for chunk in stream:
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        yield {"text": delta["content"], "tool_use": None, "is_finished": False, "finish_reason": "", "usage": None, "index": 0}
                    for position, call in enumerate(delta.get("tool_calls") or []):
                        fn = call.get("function") or {}
                        tool_use = {
                            "id": call.get("id"),
                            "type": "function",
                            "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""},
                            "index": call.get("index", position),
                        }
                        yield {"text": "", "tool_use": tool_use, "is_finished": False, "finish_reason": "", "usage": None, "index": 0}
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        usage = usage_of(stream.result) if stream.result is not None else None
        yield {"text": "", "tool_use": None, "is_finished": True, "finish_reason": finish, "usage": usage, "index": 0}


_PROVIDER = MilliwattProvider()


def register(mw: Milliwatt, *, model: str | None = None) -> MilliwattProvider:
    """Serve ``litellm`` model ``milliwatt/<model>`` (any name when ``model`` is None) with
    ``mw``; registers the provider in ``litellm.custom_provider_map`` on first call."""
    _PROVIDER.instances[model] = mw
    entries = [e for e in litellm.custom_provider_map if e.get("provider") == PROVIDER]
    if not entries or entries[0].get("custom_handler") is not _PROVIDER:
        litellm.custom_provider_map = [e for e in litellm.custom_provider_map if e.get("provider") != PROVIDER] + [
            {"provider": PROVIDER, "custom_handler": _PROVIDER}
        ]
        litellm.utils.custom_llm_setup()  # litellm reads the map at import and when a router starts
    return _PROVIDER


def unregister(model: str | None = None) -> None:
    """Stop serving ``milliwatt/<model>`` (the instance registered for it)."""
    _PROVIDER.instances.pop(model, None)


# --------------------------------------------------------------------------- the callback


class _Observed(Tier):
    """The remote tier of an observed call: it answers with what the provider answered.

    Its energy is the remote estimate for the model called, for the tokens the provider
    reported and the call's latency, as the remote tier charges its own calls."""

    name = "remote"

    def __init__(self, energy: RemoteEnergyModel, frontier_model: str) -> None:
        self.energy = energy
        self.frontier_model = frontier_model

    def _estimate(self, call: dict[str, Any]) -> Energy:
        args = (call["input_tokens"], call["output_tokens"], call["latency_s"])
        try:
            return self.energy.estimate(call["model"], *args, cached_tokens=call["cached_tokens"])
        except Exception as e:  # noqa: BLE001 - a model EcoLogits does not know: charged as the frontier model
            log.info("no energy model for %s (%s): charging %s", call["model"], redact(str(e)), self.frontier_model)
            return self.energy.estimate(self.frontier_model, *args, cached_tokens=call["cached_tokens"])

    async def attempt(self, step: Step) -> TierResult:
        call: dict[str, Any] = step.meta.extra[_CALL]
        energy = await asyncio.to_thread(self._estimate, call)
        return TierResult(
            self.name,
            call["message"],
            "observed: the agent called the provider directly (litellm callback)",
            energy,
            model=call["model"],
            input_tokens=call["input_tokens"],
            output_tokens=call["output_tokens"],
            cost_usd=call["cost_usd"],
            label=OBSERVED,
            cacheable=False,
        )


_CALL = "_milliwatt_observed_call"


class _ObservedSink:
    """Puts the observed call's own timing on its record and its remote attempt, and leaves
    the call's private details out of the step's metadata, then hands it to the ledger."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    async def write(self, record: StepRecord) -> None:
        call = record.meta.extra.get(_CALL) or {}
        extra = {k: v for k, v in record.meta.extra.items() if k != _CALL}
        attempts = tuple(dataclasses.replace(a, latency_s=call.get("latency_s", a.latency_s)) if a.tier == "remote" else a for a in record.attempts)
        record = dataclasses.replace(
            record,
            meta=dataclasses.replace(record.meta, extra=extra),
            started_at=call.get("started_at", record.started_at),
            latency_s=call.get("latency_s", record.latency_s),
            attempts=attempts,
        )
        await self.sink.write(record)


class LedgerCallback(CustomLogger):
    """A litellm callback that records each successful direct provider call (``acompletion``)
    as a remote step in ``mw``'s ledger (see the module's docstring for what it records)::

        litellm.callbacks = [LedgerCallback(mw)]

    ``recorded`` counts the steps it wrote. Await ``aclose`` (or close ``mw`` after it) so
    that records in flight are written."""

    def __init__(self, mw: Milliwatt) -> None:
        super().__init__()
        from milliwatt.cascade import Cascade

        self.mw = mw
        accountant = mw.cascade.accountant
        sink = _ObservedSink(mw.cascade.sink) if mw.cascade.sink is not None else None
        self.cascade = Cascade(
            [_Observed(accountant.energy_model, mw.cascade.frontier_model)], frontier_model=mw.cascade.frontier_model, sink=sink, accountant=accountant
        )
        self.recorded = 0

    @staticmethod
    def _ours(kwargs: dict[str, Any]) -> bool:
        """A call milliwatt made or served: a tier's own (it runs while a tier is asked) or
        the milliwatt provider's (recorded as that step)."""
        if current_spend() is not None:
            return True
        provider = kwargs.get("custom_llm_provider") or (kwargs.get("litellm_params") or {}).get("custom_llm_provider")
        model = str(kwargs.get("model") or "")
        return provider in (PROVIDER, "milliwatt-replay") or model.startswith((f"{PROVIDER}/", "milliwatt-replay/"))

    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        if self._ours(kwargs) or response_obj is None or not getattr(response_obj, "choices", None):
            return
        try:
            await self._record(kwargs, response_obj, start_time, end_time)
        except Exception as e:  # noqa: BLE001 - a record is never worth the agent's call
            log.warning("could not record a litellm call in the ledger: %s", redact(f"{type(e).__name__}: {e}"))

    async def _record(self, kwargs: dict[str, Any], response: Any, start_time: Any, end_time: Any) -> None:
        choice = response.choices[0]
        message = _message(choice.message)
        usage = getattr(response, "usage", None)
        details = getattr(usage, "prompt_tokens_details", None)
        started, latency = _seconds(start_time), max(0.0, _seconds(end_time) - _seconds(start_time))
        model = str(kwargs.get("model") or getattr(response, "model", None) or "unknown")
        provider = kwargs.get("custom_llm_provider") or (kwargs.get("litellm_params") or {}).get("custom_llm_provider")
        if provider and not model.startswith(f"{provider}/"):
            model = f"{provider}/{model}"
        call = {
            "model": model,
            "message": message,
            "input_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
            "output_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
            "cached_tokens": int(getattr(details, "cached_tokens", 0) or 0),
            "cost_usd": float(kwargs.get("response_cost") or 0.0),
            "started_at": started or time.time(),
            "latency_s": latency,
        }
        params = {**(kwargs.get("optional_params") or {})}
        metadata = (kwargs.get("litellm_params") or {}).get("metadata") or {}
        arguments = step_arguments(kwargs.get("messages") or [], params, metadata)
        arguments["metadata"] = {_CALL: call}
        step = self.mw._step(
            arguments.pop("messages"),
            arguments.pop("tools", None),
            arguments.pop("tool_choice", None),
            arguments.pop("response_format", None),
            arguments.pop("session_id", None),
            arguments.pop("run_id", None),
            arguments.pop("tenant", None),
            arguments.pop("agent", None),
            arguments.pop("user", None),
            arguments.pop("metadata"),
            arguments,
        )
        await self.cascade.run(step)
        self.recorded += 1

    async def aclose(self) -> None:
        """Wait for the records in flight (the ledger itself is ``mw``'s to close)."""
        await self.cascade.aclose()


def _message(message: Any) -> Message:
    data = message.model_dump() if hasattr(message, "model_dump") else dict(message)
    out: Message = {"role": "assistant", "content": data.get("content")}
    calls = [
        {"id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
        for c in data.get("tool_calls") or []
    ]
    if calls:
        out["tool_calls"] = calls
    elif out["content"] is None:
        out["content"] = ""
    return out


def _seconds(t: Any) -> float:
    if isinstance(t, datetime):
        return t.timestamp()
    return float(t) if isinstance(t, (int, float)) else 0.0

