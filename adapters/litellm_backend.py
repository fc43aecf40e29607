"""The remote model backend: any provider through litellm.

milliwatt owns the retries (litellm's and the OpenAI client's are switched off with
``num_retries=0``), so each attempt is visible, the backoff is bounded with full jitter
(sleep uniform in [0, min(cap, base * 2**attempt)], AWS's recommendation against
synchronised retry storms), and only failures that a retry can fix are retried:
timeouts, rate limits, connection errors and 5xx. Failures map to milliwatt's typed
``RemoteError``s carrying the backend, the model and the provider's message.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import random
from typing import Any

from milliwatt.errors import (
    ConfigError,
    RemoteAuthError,
    RemoteBadRequest,
    RemoteError,
    RemoteRateLimited,
    RemoteTimeout,
    RemoteUnavailable,
)
from milliwatt.tier import AbortCheck, Completion, ModelBackend
from milliwatt.tokens import count_completion, count_request
from milliwatt.types import Step

log = logging.getLogger("milliwatt.remote")

_RETRYABLE = (RemoteTimeout, RemoteRateLimited, RemoteUnavailable)


class LiteLLMBackend(ModelBackend):
    SETTINGS = (
        "model", "api_base", "api_key", "api_key_env", "timeout_s", "max_retries",
        "backoff_base_s", "backoff_cap_s", "label", "energy_model", "extra",
    )  # fmt: skip

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

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> LiteLLMBackend:
        unknown = sorted(set(settings) - set(cls.SETTINGS))
        if unknown:
            raise ConfigError(f"remote.{unknown[0]}", f"unknown setting (known: {', '.join(cls.SETTINGS)})")
        if "model" not in settings:
            raise ConfigError("remote.model", "a litellm model id is required, e.g. 'openai/gpt-4o'")
        return cls(**settings)

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
        key = self.api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)
        if key:
            req["api_key"] = key
        return req

    async def complete(self, step: Step, *, abort: AbortCheck | None = None) -> Completion:
        # The first import takes seconds: do it in a worker thread, not on the event loop.
        litellm = await asyncio.to_thread(importlib.import_module, "litellm")
        # litellm prints "Give Feedback / Get Help" banners to stdout on every error; the
        # typed exception already says what failed.
        litellm.suppress_debug_info = True
        req = self._request(step)
        for attempt in range(self.max_retries + 1):
            try:
                response = await litellm.acompletion(**req)
                break
            except Exception as e:  # noqa: BLE001 - every provider failure is mapped below
                err = self._typed(e)
                if not isinstance(err, _RETRYABLE) or attempt == self.max_retries:
                    raise err from e
                delay = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))
                log.warning("%s attempt %d failed (%s); retrying in %.2fs", self.model, attempt + 1, err, delay)
                await asyncio.sleep(delay)
        return self._completion(step, response, litellm)

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
        import litellm

        kw = {"backend": "litellm", "model": self.model}
        text = f"{self.model}: {getattr(e, 'message', None) or e}"
        status = getattr(e, "status_code", None)
        if isinstance(e, (litellm.Timeout, asyncio.TimeoutError)):
            return RemoteTimeout(f"{text} (timeout {self.timeout_s}s)", **kw)
        if isinstance(e, litellm.RateLimitError) or status == 429:
            return RemoteRateLimited(text, **kw)
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
