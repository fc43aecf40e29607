"""The remote model backend: any provider through litellm.

milliwatt owns the retries (litellm's and the OpenAI client's are switched off with
``num_retries=0``), so each attempt is visible. They run through tenacity: at most
``max_retries`` retries, each after a full-jitter wait (uniform in [0, min(cap, base *
2**attempt)], AWS's recommendation against synchronised retry storms; a 429's
``Retry-After`` is honoured up to the cap), and only for failures that a retry can fix:
timeouts, rate limits, connection errors and 5xx. Failures map to milliwatt's typed
``RemoteError``s carrying the backend, the model and the provider's message.

No credential is written anywhere: the key in use is registered with
``milliwatt.redaction``, and the typed errors' texts and the retry log lines are redacted
(providers echo keys in their error messages). The typed error does not chain litellm's
exception, whose text is the unredacted one.

Missing credentials are a configuration error at start (``check``, called when the tier is
built), naming the variable to set, not a failed call retried at the first step.

litellm is imported through ``milliwatt._offline.import_litellm`` (bundled price map, the
environment left as it was, litellm's stdout banners off: see that module).

Each call (the request, the retries, the response turned into a ``Completion``) runs on the
backend's own event loop, in one daemon thread (``_LoopThread``): the remote client's CPU
work stays off the caller's loop. The caller awaits a future; cancelling it cancels the
call; errors arrive as raised. ``aclose`` ends the thread and closes the HTTP clients litellm
made on its loop; a backend dropped without ``aclose`` ends its thread when it is collected.

Streaming (``stream``): ``acompletion(stream=True)`` is read on the same loop thread; each
chunk crosses to the caller's loop through a queue (``call_soon_threadsafe``). Opening the
stream and reading its first chunk is one attempt, retried like any other; a failure after
that is a ``RemoteStreamError`` (never retried: chunks were handed on). The provider is asked
for its usage where litellm says it takes ``stream_options``; otherwise tokens are counted.
Fallback models, per-tenant limits and session pinning wrap this backend
(``milliwatt.remote``).
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from milliwatt._offline import import_litellm
from milliwatt.errors import (
    ConfigError,
    RemoteAuthError,
    RemoteBadRequest,
    RemoteError,
    RemoteRateLimited,
    RemoteStreamError,
    RemoteTimeout,
    RemoteUnavailable,
)
from milliwatt.redaction import get_logger, redact, register_secret
from milliwatt.streaming import Chunk, ChunkAssembler
from milliwatt.tier import AbortCheck, Completion, CompletionStream, ModelBackend
from milliwatt.tokens import count_completion, count_request
from milliwatt.types import Step

log = get_logger("milliwatt.remote")

_RETRYABLE = (RemoteTimeout, RemoteRateLimited, RemoteUnavailable)
# Options a step and the configuration's ``extra`` both may give, merged key by key.
_MERGED = ("extra_headers", "extra_body")
# What a step passes through that only shapes how a model answers, not what a right answer is:
# sent where litellm says the model takes it, else left out (litellm would refuse the call, as
# OpenAI refuses reasoning_effort for gpt-4o), as the cheaper tiers leave it out.
_HINTS = ("user", "reasoning_effort")
# Headers whose values are credentials (registered for redaction).
_CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|cookie|password", re.IGNORECASE)
_T = TypeVar("_T")


class _LoopThread:
    """An event loop running in one daemon thread, for the remote client's calls.

    Why: litellm, the OpenAI client, httpx and pydantic spend several ms of CPU per call
    (request transformation, response models, cost lookup, logging), and when several
    answers arrive in one loop iteration their continuations run back to back: on the
    caller's loop that is lag every other coroutine of the process suffers (see "Event-loop
    lag" in docs/benchmarks.md). Here that work runs on this loop; the caller's loop only
    awaits a future. The interpreter lock is still shared: the caller's thread gets it back
    within the switch interval (5 ms) instead of after the whole burst.

    ``run`` submits with ``run_coroutine_threadsafe`` (which also carries the caller's
    context variables over) and awaits ``wrap_future`` on the caller's loop: cancelling the
    caller cancels the task here. Daemon: it never keeps the interpreter alive.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                # Runs the callbacks the shutdown left, closes generators, ends the executor's threads.
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on this loop; await it from the caller's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        """Cancel what still runs, close litellm's clients of this loop, end the thread; does
        not wait (callable from any thread, the garbage collector's included)."""
        if self.loop.is_closed():
            return
        shutdown = self._shutdown()
        try:
            asyncio.run_coroutine_threadsafe(shutdown, self.loop)
        except RuntimeError:  # closed meanwhile
            shutdown.close()

    async def _shutdown(self) -> None:
        try:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_litellm_clients()
        finally:
            asyncio.get_running_loop().stop()


async def _close_litellm_clients() -> None:
    """Close the async clients litellm cached for the running loop (best effort).

    litellm caches its HTTP/SDK clients per event loop (its cache keys end with the loop's
    token); nothing else would close the ones made on a loop about to end.
    """
    cache = getattr(sys.modules.get("litellm"), "in_memory_llm_clients_cache", None)
    scoped = getattr(cache, "update_cache_key_with_event_loop", None)
    if scoped is None:
        return
    suffix = scoped("")
    if not suffix:
        return
    for key in [k for k in list(getattr(cache, "cache_dict", {})) if isinstance(k, str) and k.endswith(suffix)]:
        try:
            client = cache.cache_dict.get(key)
            cache.delete_cache(key)
            close = getattr(client, "aclose", None) or getattr(client, "close", None)
            result = close() if callable(close) else None
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - closing is best effort; litellm's cache is not public API
            log.debug("closing litellm's client %s failed", key, exc_info=True)


class LiteLLMBackend(ModelBackend):
    def __init__(
        self,
        model: str,
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 20.0,
        label: str | None = None,
        energy_model: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """``model`` is a litellm id ("openai/gpt-4o"). ``api_key_env`` names the variable
        holding the key, read at call time; ``energy_model`` is the model whose energy is
        charged (default ``model``: a stand-in server can be billed as the frontier model
        it stands in for). ``extra`` is passed to ``litellm.acompletion`` as is."""
        if max_retries < 0:
            raise ConfigError("remote.max_retries", f"must be >= 0, got {max_retries}")
        self.model = model
        self.api_base = api_base
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.label = label
        self.energy_model = energy_model or model
        self.extra = dict(extra or {})
        register_secret(api_key)
        self._loop_thread: _LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self._stream_options: bool | None = None  # does the provider take stream_options? (asked once)
        self._params: dict[str, bool] = {}  # does the model take this parameter? (``_takes``)

    def check(self) -> None:
        """Fail at start, naming what to set, when the provider's credentials are missing.

        Blocking (imports litellm): call it where the tier is built, not on the event loop.
        A key given, an ``api_base`` (a local or self-hosted server) or a litellm custom
        provider (the replays' ``milliwatt-replay/...``) needs nothing from the environment.
        """
        if self.api_key_env:
            if not os.environ.get(self.api_key_env):
                raise ConfigError(
                    "remote.api_key_env",
                    f"{self.api_key_env} is not set in the environment (it should hold the key for {self.model})",
                )
            register_secret(os.environ[self.api_key_env])
            return
        if self.api_key or self.api_base:
            return
        litellm = import_litellm()
        provider = self.model.split("/", 1)[0] if "/" in self.model else None
        custom = {e.get("provider") for e in getattr(litellm, "custom_provider_map", None) or []}
        if provider is not None and provider in custom:
            return
        try:
            found = litellm.validate_environment(model=self.model)
        except Exception:  # noqa: BLE001 - an id litellm cannot resolve fails at its first call, typed
            return
        missing = [str(k) for k in found.get("missing_keys") or []]
        if not found.get("keys_in_environment", True) and missing:
            needs = " and ".join(missing)
            raise ConfigError(
                "remote.model",
                f"{self.model} needs {needs} in the environment "
                f"(or set remote.api_key_env / remote.api_base for a local server)",
            )

    def _key(self) -> str | None:
        key = self.api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)
        register_secret(key)
        return key

    def _request(self, step: Step) -> dict[str, Any]:
        req = step.to_openai()
        # The configured ``extra`` first, then what the step says: its ``extra_headers`` and
        # ``extra_body`` are merged over the configured ones (a step's value wins, key by key).
        req.update({k: v for k, v in self.extra.items() if k not in _MERGED})
        for key in _MERGED:
            ours, theirs = self.extra.get(key), step.options.get(key)
            if isinstance(ours, dict) and isinstance(theirs, dict):
                req[key] = {**ours, **theirs}
            elif theirs is not None or ours is not None:
                req[key] = theirs if theirs is not None else ours
        for name, value in (req.get("extra_headers") or {}).items():
            if _CREDENTIAL_HEADER.search(name):
                register_secret(value)  # never in a log line or an error's text
        if step.meta.user is not None and "user" not in req:
            req["user"] = step.meta.user  # OpenAI's ``user``: the end user the agent acts for
        for key in _HINTS:
            if key in req and not self._takes(key):
                del req[key]  # a model without it answers as if it had not been asked
        req.update(model=self.model, timeout=self.timeout_s, num_retries=0)
        if step.meta.extra:
            # litellm hands ``metadata`` to its callbacks and custom providers (providers'
            # APIs get at most a user_id from it): the replay provider finds its answer by it.
            req["metadata"] = dict(step.meta.extra)
        if self.api_base:
            req["api_base"] = self.api_base
        key = self._key()
        if key:
            req["api_key"] = key
        return req

    def _takes(self, param: str) -> bool:
        """Does litellm say this model takes ``param`` (asked once per parameter)? Where it
        cannot say, the parameter is sent and the provider decides."""
        if param not in self._params:
            litellm = import_litellm()
            try:
                model, provider, _, _ = litellm.get_llm_provider(self.model, api_base=self.api_base)
                params = litellm.get_supported_openai_params(model=model, custom_llm_provider=provider)
                self._params[param] = params is None or param in params
            except Exception:  # noqa: BLE001 - a model litellm cannot resolve fails at its call, typed
                self._params[param] = True
            if not self._params[param]:
                log.info("%s does not take %r (litellm's word): it is not sent", self.model, param)
        return self._params[param]

    def _thread(self) -> _LoopThread:
        """The backend's loop thread, started on first use (again after ``aclose``)."""
        with self._loop_lock:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread(f"milliwatt-remote ({self.model})")
                # A backend dropped without aclose ends its thread (not at exit: it is a daemon).
                self._finalizer = weakref.finalize(self, self._loop_thread.stop)
                self._finalizer.atexit = False
            return self._loop_thread

    async def complete(self, step: Step, *, abort: AbortCheck | None = None) -> Completion:
        return await self._thread().run(self._complete(step))

    async def aclose(self) -> None:
        """End the loop thread (cancelling calls still running) and close litellm's clients on it."""
        with self._loop_lock:
            runner, self._loop_thread = self._loop_thread, None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if runner is not None:
            runner.stop()
            await asyncio.to_thread(runner.thread.join, 10.0)

    async def _complete(self, step: Step) -> Completion:
        """On the backend's loop: the request, the attempts, the ``Completion``."""
        # The first import takes seconds: do it in a worker thread, not on an event loop.
        litellm = await asyncio.to_thread(import_litellm)
        req = self._request(step)
        response = await self._retrying()(self._attempt, litellm, req)
        return self._completion(step, response, litellm)

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_RETRYABLE),
            before_sleep=self._log_retry,
            reraise=True,
        )

    # ------------------------------------------------------------------ streaming

    async def stream(self, step: Step, *, abort: AbortCheck | None = None) -> CompletionStream:
        """Stream the answer (``litellm.acompletion(stream=True)``), returned once its first
        chunk is in: opening the stream and reading that chunk are one attempt, retried as
        ``complete``'s are; a failure after it is a ``RemoteStreamError``, not retried.

        The stream is read on the backend's loop thread and its chunks handed to the caller's
        loop through a queue; closing the returned stream cancels the reading there (the HTTP
        response is closed). The provider is asked for its usage (``stream_options``) where
        litellm says it takes the option; otherwise the tokens are counted.
        """
        runner = self._thread()
        stream = _LiteLLMStream(self, step, asyncio.get_running_loop())
        stream._reader = asyncio.run_coroutine_threadsafe(self._read_stream(step, stream._put), runner.loop)
        await stream._first()
        return stream

    async def _read_stream(self, step: Step, put: Callable[[tuple[str, Any]], None]) -> None:
        """On the backend's loop: open the stream (with retries), then hand on each chunk,
        then ``("end", None)``; or ``("error", typed error)``. Never raises but cancellation."""
        opened: Any = None
        try:
            litellm = await asyncio.to_thread(import_litellm)
            req = self._request(step)
            req["stream"] = True
            if self._stream_usage(litellm):
                req["stream_options"] = {"include_usage": True}
            opened, first = await self._retrying()(self._open_stream, litellm, req)
            if first is None:
                put(("end", None))
                return
            put(("chunk", _chunk_dict(first)))
            received = 1
            try:
                async for raw in opened:
                    put(("chunk", _chunk_dict(raw)))
                    received += 1
            except (asyncio.CancelledError, _CallerGone):
                raise
            except Exception as e:  # noqa: BLE001 - every break of the stream is typed
                put(("error", self._broken(e, received)))
                return
            put(("end", None))
        except (asyncio.CancelledError, _CallerGone):
            return
        except RemoteError as e:  # the attempts to open it failed: typed (and redacted) already
            put(("error", e))
        except Exception as e:  # noqa: BLE001
            put(("error", self._typed(e)))
        finally:
            if opened is not None:
                await _close_stream(opened)

    async def _open_stream(self, litellm: Any, req: dict[str, Any]) -> tuple[Any, Any]:
        """One attempt: open the stream and read its first chunk (None: it was empty)."""
        opened = await self._attempt(litellm, req)
        try:
            first = await opened.__anext__()
        except StopAsyncIteration:
            return opened, None
        except BaseException as e:
            await _close_stream(opened)
            if isinstance(e, Exception):
                raise self._typed(e) from None
            raise
        return opened, first

    def _broken(self, e: Exception, received: int) -> RemoteStreamError:
        """The typed error of a stream that broke after ``received`` chunks (redacted; not chained)."""
        typed = self._typed(e)
        text = f"{typed} (the stream broke after {received} chunk{'s' if received != 1 else ''})"
        return RemoteStreamError(text, backend="litellm", model=self.model, status_code=typed.status_code)

    def _stream_usage(self, litellm: Any) -> bool:
        """Does the provider take ``stream_options.include_usage``? (litellm's word for it.)"""
        if self._stream_options is None:
            try:
                _, provider, _, _ = litellm.get_llm_provider(self.model, api_base=self.api_base)
                params = litellm.get_supported_openai_params(model=self.model, custom_llm_provider=provider) or []
                self._stream_options = "stream_options" in params
            except Exception:  # noqa: BLE001 - a provider litellm cannot say: count the tokens
                self._stream_options = False
        return self._stream_options

    def _streamed(self, step: Step, assembler: ChunkAssembler, latency_s: float | None) -> Completion:
        """The ``Completion`` of a (possibly partial) streamed answer."""
        message = assembler.message()
        usage = assembler.usage or {}
        input_tokens = usage.get("prompt_tokens") or count_request(step.messages, step.tools)
        output_tokens = usage.get("completion_tokens") or count_completion(message)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        litellm = sys.modules.get("litellm")
        try:
            cost = float(sum(litellm.cost_per_token(model=self.model, prompt_tokens=input_tokens, completion_tokens=output_tokens)))
        except Exception:  # noqa: BLE001 - an unpriced model (a local stand-in) costs nothing known
            cost = 0.0
        extra: dict[str, Any] = {"finish_reason": assembler.finish_reason, "streamed": True, "chunks": assembler.chunks}
        if latency_s is not None:
            extra["latency_s"] = latency_s
        return Completion(
            message=message,
            model=assembler.model or self.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached if isinstance(cached, int) else None,
            cost_usd=cost,
            label=self.label,
            extra=extra,
        )

    async def _attempt(self, litellm: Any, req: dict[str, Any]) -> Any:
        try:
            return await litellm.acompletion(**req)
        except Exception as e:  # noqa: BLE001 - every provider failure is mapped to a typed error
            # Not chained: litellm's exception carries the unredacted provider text.
            raise self._typed(e) from None

    def _wait(self, state: RetryCallState) -> float:
        """Full jitter; a rate limit's Retry-After (up to the cap) when the provider sent one."""
        delay = wait_random_exponential(multiplier=self.backoff_base_s, max=self.backoff_cap_s)(state)
        err = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(err, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(float(retry_after), self.backoff_cap_s))
        return delay

    def _log_retry(self, state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        # ``err`` is a typed error: its text is redacted already (and the logger's filter redacts again).
        log.warning("%s attempt %d failed (%s); retrying in %.2fs", self.model, state.attempt_number, err, delay)

    def _completion(self, step: Step, response: Any, litellm: Any) -> Completion:
        msg = response.choices[0].message
        message: dict[str, Any] = {"role": "assistant", "content": msg.content}
        if msg.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments or "{}"}}
                for c in msg.tool_calls
            ]
        usage = getattr(response, "usage", None)
        input_tokens = getattr(usage, "prompt_tokens", None) or count_request(step.messages, step.tools)
        output_tokens = getattr(usage, "completion_tokens", None) or count_completion(message)
        # What the provider says its prompt cache served (None: it did not say; the accountant
        # then estimates it from the request's prefix, as for the baseline).
        cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
        try:
            cost = float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # noqa: BLE001 - an unpriced model (a local stand-in) costs nothing known
            cost = 0.0
        return Completion(
            message=message,
            model=getattr(response, "model", None) or self.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached if isinstance(cached, int) and not isinstance(cached, bool) else None,
            cost_usd=cost,
            label=self.label,
            extra={"finish_reason": response.choices[0].finish_reason},
        )

    def _typed(self, e: Exception) -> RemoteError:
        """The milliwatt error for a litellm (OpenAI-style) exception."""
        litellm = import_litellm()

        status = getattr(e, "status_code", None)
        kw: dict[str, Any] = {"backend": "litellm", "model": self.model, "status_code": status if isinstance(status, int) else None}
        text = redact(f"{self.model}: {getattr(e, 'message', None) or e}")
        if isinstance(e, (litellm.Timeout, asyncio.TimeoutError)):
            return RemoteTimeout(f"{text} (timeout {self.timeout_s}s)", **kw)
        if isinstance(e, litellm.RateLimitError) or status == 429:
            err = RemoteRateLimited(text, **kw)
            err.retry_after = _retry_after(e)  # type: ignore[attr-defined]
            return err
        if isinstance(e, (litellm.AuthenticationError, litellm.PermissionDeniedError)) or status in (401, 403):
            return RemoteAuthError(text, **kw)
        if isinstance(e, (litellm.APIConnectionError, litellm.ServiceUnavailableError, litellm.InternalServerError,
                          litellm.BadGatewayError)):  # fmt: skip
            return RemoteUnavailable(text, **kw)
        if isinstance(status, int) and status >= 500:
            return RemoteUnavailable(text, **kw)
        if isinstance(e, (litellm.BadRequestError, litellm.NotFoundError, litellm.UnprocessableEntityError)) or (
            isinstance(status, int) and 400 <= status < 500
        ):
            return RemoteBadRequest(text, **kw)
        return RemoteError(text, **kw)


class _CallerGone(Exception):
    """The caller's event loop is closed: nobody reads the stream any more."""


class _LiteLLMStream(CompletionStream):
    """The caller's end of a stream read on the backend's loop (``LiteLLMBackend.stream``).

    The reader there puts ``("chunk", dict)``, then ``("end", None)`` or ``("error", typed
    error)`` on a queue of the caller's loop (``call_soon_threadsafe``); ``__anext__`` takes
    them. A usage-only chunk (no choices) is kept for the books, not handed on.
    """

    def __init__(self, backend: LiteLLMBackend, step: Step, loop: asyncio.AbstractEventLoop) -> None:
        self.model = backend.model
        self._backend = backend
        self._step = step
        self._loop = loop
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._assembler = ChunkAssembler()
        self._reader: Any = None  # the concurrent future of the reader on the backend's loop
        self._pending: tuple[str, Any] | None = None
        self._done = False
        self._t0 = time.perf_counter()
        self._ended_at: float | None = None

    def _put(self, item: tuple[str, Any]) -> None:
        """Called on the backend's loop."""
        if item[0] != "chunk":
            self._ended_at = time.perf_counter()
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            raise _CallerGone from None

    async def _first(self) -> None:
        """Wait for the first chunk; raise the typed error when the stream could not start."""
        try:
            item = await self._queue.get()
        except BaseException:
            await self.aclose()
            raise
        if item[0] == "error":
            self._done = True
            raise item[1]
        self._pending = item

    async def __anext__(self) -> Chunk:
        while True:
            if self._done:
                raise StopAsyncIteration
            if self._pending is not None:
                (kind, payload), self._pending = self._pending, None
            else:
                kind, payload = await self._queue.get()
            if kind == "end":
                self._done = True
                raise StopAsyncIteration
            if kind == "error":
                self._done = True
                if isinstance(payload, RemoteStreamError):
                    payload.partial = self._assembler.message()
                raise payload
            self._assembler.add(payload)
            if payload.get("choices"):
                return payload

    def completion(self) -> Completion:
        latency = self._ended_at - self._t0 if self._ended_at is not None else None
        return self._backend._streamed(self._step, self._assembler, latency)

    async def aclose(self) -> None:
        self._done = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()  # cancels the reading task on the backend's loop


def _chunk_dict(raw: Any) -> Chunk:
    """A litellm stream chunk as an OpenAI chunk dict, with only what it says."""
    choices = []
    for choice in getattr(raw, "choices", None) or []:
        d = getattr(choice, "delta", None)
        delta: dict[str, Any] = {}
        if getattr(d, "role", None):
            delta["role"] = d.role
        if getattr(d, "content", None) is not None:
            delta["content"] = d.content
        calls = []
        for position, call in enumerate(getattr(d, "tool_calls", None) or []):
            fn = getattr(call, "function", None)
            out: dict[str, Any] = {"index": getattr(call, "index", None) if getattr(call, "index", None) is not None else position}
            if getattr(call, "id", None):
                out["id"] = call.id
                out["type"] = "function"
            out["function"] = {k: v for k in ("name", "arguments") if (v := getattr(fn, k, None)) is not None}
            calls.append(out)
        if calls:
            delta["tool_calls"] = calls
        choices.append({"index": getattr(choice, "index", 0) or 0, "delta": delta, "finish_reason": getattr(choice, "finish_reason", None)})
    chunk: Chunk = {
        "id": getattr(raw, "id", None),
        "object": "chat.completion.chunk",
        "created": getattr(raw, "created", None),
        "model": getattr(raw, "model", None),
        "choices": choices,
    }
    usage = getattr(raw, "usage", None)
    if usage is not None:
        dump = usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
        chunk["usage"] = {k: v for k, v in dump.items() if v is not None}
    return chunk


async def _close_stream(stream: Any) -> None:
    """Close a litellm stream's HTTP response (best effort)."""
    for target in (getattr(stream, "completion_stream", None), stream):
        for name in ("aclose", "close"):
            close = getattr(target, name, None)
            if not callable(close):
                continue
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing a stream failed", exc_info=True)
            break


def _retry_after(e: Exception) -> float | None:
    """Seconds from a 429's Retry-After header (seconds or an HTTP date), if litellm kept the response."""
    headers = getattr(e, "litellm_response_headers", None) or getattr(getattr(e, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None and hasattr(headers, "get") else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
