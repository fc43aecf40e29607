"""The remote tier in production: fallback models, per-tenant limits, session pinning.

Each is a wrapper, composed around the parts it changes (as httpx wraps transports), so
each can be read, tested and left out alone; the registry builds them from ``remote:``
(docs/remote.md):

- ``FallbackBackend(backends)``: a model backend that asks the next model when one fails
  with an error another model may not have (``falls_back``). The answer says which model
  gave it and which failed before (``Completion.extra["route"]``, kept as the attempt's
  evidence in the ledger); each failure is logged.
- ``TenantLimitedBackend(backend, limit)``: at most ``limit`` calls in flight per tenant
  (``StepMeta.tenant``; no tenant is a tenant of its own); the others wait their turn, in
  order, without blocking the event loop. A stream holds its slot until it is closed.
- ``PinnedTier(tier, steps)``: once a session's step was answered by ``tier``, its next
  ``steps`` steps go straight to it, on the same model, so the provider's prefix cache stays
  warm: the tier claims them (``Tier.claim``), and the cheaper tiers are recorded as skipped.

The retries of one model (with jittered backoff) and its per-call timeout belong to its
backend (``milliwatt.adapters.LiteLLMBackend``); these wrappers come after them.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

from .errors import (
    BackendError,
    RemoteAuthError,
    RemoteBadRequest,
    RemoteError,
    RemoteRateLimited,
    RemoteTimeout,
    RemoteUnavailable,
)
from .redaction import get_logger, redact
from .streaming import Chunk
from .tier import (
    AbortCheck,
    Claim,
    Completion,
    CompletionStream,
    ModelBackend,
    Tier,
    TierStream,
    current_claim,
)
from .types import Message, Step, TierResult

log = get_logger("milliwatt.remote")

# The model a pinned step should be answered by (set by ``PinnedTier``, read by ``FallbackBackend``).
_PREFERRED_MODEL: ContextVar[str | None] = ContextVar("milliwatt_preferred_model", default=None)


# --------------------------------------------------------------------------- fallbacks


def falls_back(error: BackendError) -> bool:
    """May another model answer where this one failed? Yes after the model's own retries for
    timeouts, rate limits, 5xx and connection failures (another deployment may be up), for
    rejected credentials (another provider has its own), and for a model the provider does
    not know (404: retired or misspelt). Not for another bad request: the same request
    would be refused again."""
    if isinstance(error, (RemoteTimeout, RemoteRateLimited, RemoteUnavailable, RemoteAuthError)):
        return True
    return isinstance(error, RemoteBadRequest) and error.status_code == 404


class FallbackBackend(ModelBackend):
    """Several model backends, asked in order until one answers (``falls_back`` decides
    which failures move on; any other is raised at once).

    The completion says which model answered, and which failed before it
    (``extra["route"] = {"model": ..., "failed": [{"model", "error", "latency_s"}]}``), and
    which model its energy is charged for (``extra["energy_model"]``). When every model
    fails, the last failure is raised, typed as it was, its text naming the earlier ones.
    A streamed answer falls back only until its first chunk is in.
    """

    def __init__(self, backends: Sequence[ModelBackend], *, should_fall_back: Callable[[BackendError], bool] = falls_back) -> None:
        if not backends:
            raise ValueError("a FallbackBackend needs at least one backend")
        self.backends = list(backends)
        self.should_fall_back = should_fall_back
        first = self.backends[0]
        self.model = first.model
        self.energy_model = getattr(first, "energy_model", None) or first.model
        self.label = getattr(first, "label", None)

    def _order(self) -> list[ModelBackend]:
        preferred = _PREFERRED_MODEL.get()
        chosen = [b for b in self.backends if b.model == preferred]
        return chosen + [b for b in self.backends if b not in chosen]

    async def _first(self, call: Callable[[ModelBackend], Awaitable[Any]]) -> tuple[ModelBackend, Any, list[dict[str, Any]]]:
        failed: list[dict[str, Any]] = []
        order = self._order()
        for n, backend in enumerate(order):
            t0 = time.perf_counter()
            try:
                return backend, await call(backend), failed
            except BackendError as e:
                reason = redact(f"{type(e).__name__}: {e}")
                failed.append({"model": backend.model, "error": reason, "latency_s": round(time.perf_counter() - t0, 3)})
                if n == len(order) - 1 or not self.should_fall_back(e):
                    raise _exhausted(e, failed) from None
                log.warning("%s failed (%s); falling back to %s", backend.model, reason, order[n + 1].model)
        raise AssertionError("unreachable")

    def _route(self, backend: ModelBackend, failed: list[dict[str, Any]]) -> dict[str, Any]:
        route: dict[str, Any] = {"model": backend.model}
        if failed:
            route["failed"] = failed
        return {"route": route, "energy_model": getattr(backend, "energy_model", None) or backend.model}

    async def complete(self, step: Step, *, abort: AbortCheck | None = None) -> Completion:
        backend, completion, failed = await self._first(lambda b: b.complete(step, abort=abort))
        return replace(completion, extra={**completion.extra, **self._route(backend, failed)})

    async def stream(self, step: Step, *, abort: AbortCheck | None = None) -> CompletionStream:
        backend, stream, failed = await self._first(lambda b: b.stream(step, abort=abort))
        return _Annotated(stream, self._route(backend, failed))

    async def aclose(self) -> None:
        errors = []
        for backend in self.backends:
            try:
                await backend.aclose()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


def _exhausted(error: BackendError, failed: list[dict[str, Any]]) -> BackendError:
    """``error`` (the last model's), its text naming the models that failed before it."""
    if len(failed) < 2:
        return error
    earlier = "; ".join(f"{f['model']}: {f['error']}" for f in failed[:-1])
    kw: dict[str, Any] = {"backend": error.backend, "model": error.model}
    if isinstance(error, RemoteError):
        kw["status_code"] = error.status_code
    try:
        out = type(error)(f"{error} (after {earlier})", **kw)
    except TypeError:  # a subclass with another signature: keep it as it is
        return error
    out.__dict__.update({k: v for k, v in error.__dict__.items() if k not in out.__dict__})
    return out


class _Delegating(CompletionStream):
    def __init__(self, inner: CompletionStream) -> None:
        self.inner = inner
        self.model = inner.model

    async def __anext__(self) -> Chunk:
        return await self.inner.__anext__()

    def completion(self) -> Completion:
        return self.inner.completion()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Annotated(_Delegating):
    """A stream whose completion carries ``extra`` (the route of a fallback)."""

    def __init__(self, inner: CompletionStream, extra: dict[str, Any]) -> None:
        super().__init__(inner)
        self.extra = extra

    def completion(self) -> Completion:
        c = self.inner.completion()
        return replace(c, extra={**c.extra, **self.extra})


# --------------------------------------------------------------------------- per-tenant limits


class TenantLimiter:
    """At most ``limit`` holders per tenant at once; the others wait first come, first served.

    A slot that frees goes to the tenant's longest waiter directly, so a newcomer cannot
    overtake it. Memory is bounded by the tenants with calls in flight: a tenant's entry is
    dropped when its last holder leaves. Use from one event loop.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._active: dict[str | None, int] = {}
        self._waiting: dict[str | None, deque[asyncio.Future[None]]] = {}

    def in_flight(self, tenant: str | None) -> int:
        return self._active.get(tenant, 0)

    def waiting(self, tenant: str | None) -> int:
        return sum(1 for f in self._waiting.get(tenant, ()) if not f.done())

    async def acquire(self, tenant: str | None) -> None:
        waiters = self._waiting.get(tenant)
        if self._active.get(tenant, 0) < self.limit and not waiters:
            self._active[tenant] = self._active.get(tenant, 0) + 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(future)
        try:
            await future  # a release hands its slot over: the count stays
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(tenant)  # the slot came as the waiter was cancelled: pass it on
            else:
                queue = self._waiting.get(tenant)
                if queue is not None and future in queue:
                    queue.remove(future)
                    if not queue:
                        del self._waiting[tenant]
            raise

    def release(self, tenant: str | None) -> None:
        queue = self._waiting.get(tenant)
        while queue:
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
                if not queue:
                    del self._waiting[tenant]
                return
        self._waiting.pop(tenant, None)
        left = self._active.get(tenant, 0) - 1
        if left > 0:
            self._active[tenant] = left
        else:
            self._active.pop(tenant, None)

    @asynccontextmanager
    async def slot(self, tenant: str | None) -> AsyncIterator[None]:
        await self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)


class TenantLimitedBackend(ModelBackend):
    """A backend with at most ``limit`` calls in flight per tenant (``step.meta.tenant``).
    The wait for a slot is part of the attempt's latency; a stream keeps its slot until it
    ends or is closed."""

    def __init__(self, backend: ModelBackend, limit: int) -> None:
        self.backend = backend
        self.limiter = TenantLimiter(limit)
        self.model = backend.model
        self.energy_model = getattr(backend, "energy_model", None) or backend.model
        self.label = getattr(backend, "label", None)

    async def complete(self, step: Step, *, abort: AbortCheck | None = None) -> Completion:
        async with self.limiter.slot(step.meta.tenant):
            return await self.backend.complete(step, abort=abort)

    async def stream(self, step: Step, *, abort: AbortCheck | None = None) -> CompletionStream:
        tenant = step.meta.tenant
        await self.limiter.acquire(tenant)
        try:
            stream = await self.backend.stream(step, abort=abort)
        except BaseException:
            self.limiter.release(tenant)
            raise
        return _Releasing(stream, lambda: self.limiter.release(tenant))

    async def aclose(self) -> None:
        await self.backend.aclose()


class _Releasing(_Delegating):
    """A stream that calls ``release`` once, when it ends, breaks or is closed."""

    def __init__(self, inner: CompletionStream, release: Callable[[], None]) -> None:
        super().__init__(inner)
        self._release: Callable[[], None] | None = release

    def _done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def __anext__(self) -> Chunk:
        try:
            return await self.inner.__anext__()
        except BaseException:  # the end (StopAsyncIteration), a break, a cancellation
            self._done()
            raise

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self._done()


# --------------------------------------------------------------------------- session pinning


@dataclass
class _Pin:
    model: str | None  # None: the tier has one model
    left: int


@dataclass
class _PinClaim(Claim):
    """A pinned session's claim on one step; the pin is used up once, when the tier is asked."""

    pinned_by: Any = None
    session: str = ""
    model: str | None = None
    used: bool = False
    left: int = 0


@contextmanager
def _preferring(model: str | None) -> Iterator[None]:
    token = _PREFERRED_MODEL.set(model) if model is not None else None
    try:
        yield
    finally:
        if token is not None:
            _PREFERRED_MODEL.reset(token)


class PinnedTier(Tier):
    """``tier``, pinning sessions to it: once a step of a session was answered by it (on model
    M), the session's next ``steps`` steps are claimed for it (the cascade skips the tiers
    before it but those in ``keep``) and answered on M first (a ``FallbackBackend`` tries M
    first), so the provider's prefix cache of the conversation stays warm.

    A pinned step uses up one step of the pin when the tier is asked (not when a kept tier
    answers it first); pinned steps do not renew the pin, so after ``steps`` of them the
    session goes through the cascade again. Only the step's own answer pins (``answered``),
    never a shadow check. Steps without a ``session_id`` are never pinned. At most
    ``max_sessions`` pins are kept (least recently used dropped)."""

    def __init__(self, tier: Tier, steps: int, *, keep: Sequence[str] = (), max_sessions: int = 10_000) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.tier = tier
        self.name = tier.name
        self.token_budget = tier.token_budget
        self.steps = steps
        self.keep = frozenset(keep)
        self.max_sessions = max_sessions
        self._pins: OrderedDict[str, _Pin] = OrderedDict()

    def pinned(self, session_id: str | None) -> tuple[str | None, int] | None:
        """(model, pinned steps left) of a pinned session, else None."""
        pin = self._pins.get(session_id) if session_id is not None else None
        return (pin.model, pin.left) if pin is not None else None

    def claim(self, step: Step) -> Claim | None:
        session = step.meta.session_id
        pin = self._pins.get(session) if session is not None else None
        if pin is None:
            return self.tier.claim(step)
        on = f" on {pin.model}" if pin.model else ""
        n = self.steps - pin.left + 1
        reason = f"pinned to {self.name}{on} (prefix cache): pinned step {n} of {self.steps}"
        return _PinClaim(reason, self.keep, pinned_by=self, session=session, model=pin.model)  # type: ignore[arg-type]

    def _use(self) -> _PinClaim | None:
        """This step's pin, if it was claimed for this tier; used up on the first ask only
        (the step asked again with withheld tool schemas is the same step)."""
        claim = current_claim()
        if not isinstance(claim, _PinClaim) or claim.pinned_by is not self:
            return None
        if not claim.used:
            claim.used = True
            pin = self._pins.get(claim.session)
            if pin is not None:
                pin.left -= 1
                claim.left = pin.left
                if pin.left > 0:
                    self._pins.move_to_end(claim.session)
                else:
                    del self._pins[claim.session]
        return claim

    @staticmethod
    def _mark(claim: _PinClaim | None, result: TierResult) -> TierResult:
        if claim is None:
            return result
        return replace(result, evidence={**(result.evidence or {}), "pinned": {"model": claim.model, "left": claim.left}})

    async def attempt(self, step: Step) -> TierResult:
        claim = self._use()
        with _preferring(claim.model if claim else None):
            return self._mark(claim, await self.tier.attempt(step))

    async def stream(self, step: Step) -> TierResult | TierStream:
        claim = self._use()
        with _preferring(claim.model if claim else None):
            opened = await self.tier.stream(step)
        if isinstance(opened, TierResult):
            return self._mark(claim, opened)
        return _MarkedStream(opened, lambda result: self._mark(claim, result))

    async def answered(self, step: Step, result: TierResult) -> None:
        """The step's answer came from this tier: pin its session (a pinned step does not renew)."""
        await self.tier.answered(step, result)
        session = step.meta.session_id
        evidence = result.evidence or {}
        if session is None or "pinned" in evidence:
            return
        self._pins[session] = _Pin((evidence.get("route") or {}).get("model"), self.steps)
        self._pins.move_to_end(session)
        while len(self._pins) > self.max_sessions:
            self._pins.popitem(last=False)

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        await self.tier.remember(step, message, answered_by, model=model)

    async def aclose(self) -> None:
        await self.tier.aclose()


class _MarkedStream(TierStream):
    def __init__(self, inner: TierStream, mark: Callable[[TierResult], TierResult]) -> None:
        self.inner = inner
        self.tier = inner.tier
        self._mark = mark

    async def __anext__(self) -> Chunk:
        return await self.inner.__anext__()

    async def result(self) -> TierResult:
        return self._mark(await self.inner.result())

    async def partial(self) -> TierResult:
        return self._mark(await self.inner.partial())

    async def aclose(self) -> None:
        await self.inner.aclose()
