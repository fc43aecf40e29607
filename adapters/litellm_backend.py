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
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import os
import sys
import threading
import time
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from milliwatt._offline import import_litellm
from milliwatt.errors import (
    ConfigError,
    RemoteAuthError,
    RemoteBadRequest,
    RemoteError,
    RemoteRateLimited,
    RemoteTimeout,
    RemoteUnavailable,
)
from milliwatt.redaction import get_logger, redact, register_secret
from milliwatt.tier import AbortCheck, Completion, ModelBackend
from milliwatt.tokens import count_completion, count_request
from milliwatt.types import Step

log = get_logger("milliwatt.remote")

_RETRYABLE = (RemoteTimeout, RemoteRateLimited, RemoteUnavailable)
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
        req.update(self.extra)
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
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_RETRYABLE),
            before_sleep=self._log_retry,
            reraise=True,
        )
        response = await retrying(self._attempt, litellm, req)
        return self._completion(step, response, litellm)

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
        try:
            cost = float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # noqa: BLE001 - an unpriced model (a local stand-in) costs nothing known
            cost = 0.0
        return Completion(
            message=message,
            model=getattr(response, "model", None) or self.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            label=self.label,
            extra={"finish_reason": response.choices[0].finish_reason},
        )

    def _typed(self, e: Exception) -> RemoteError:
        """The milliwatt error for a litellm (OpenAI-style) exception."""
        litellm = import_litellm()

        kw = {"backend": "litellm", "model": self.model}
        text = redact(f"{self.model}: {getattr(e, 'message', None) or e}")
        status = getattr(e, "status_code", None)
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
