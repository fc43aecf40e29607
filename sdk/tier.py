"""The two small seams of the cascade: a tier, and a model backend.

A tier answers a step or passes on it. A model backend turns a step into a completion.
The local and remote tiers are the same ``ModelTier`` over different backends and gates,
so a new provider is one backend module and a new tier is one ``Tier`` subclass,
registered in ``milliwatt.registry``; the cascade itself never changes.

Either may stream its answer (``Tier.stream``, ``ModelBackend.stream``: a ``TierStream``, a
``CompletionStream``); by default both answer whole, handed out as one chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from .streaming import Chunk, message_chunks
from .types import Energy, Message, Step, TierResult


class Tier(ABC):
    """One rung of the cascade.

    ``token_budget`` is the most input tokens this tier may be sent; the cascade trims the
    step to it before calling ``attempt`` (None: no trimming beyond the global budget).
    """

    name: str = "tier"
    token_budget: int | None = None

    @abstractmethod
    async def attempt(self, step: Step) -> TierResult:
        """Answer the step, or pass with the reason. Must not block the event loop."""

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:  # noqa: B027
        """Called with the answer of a later (costlier) tier; the cache writes it back.

        ``step`` is the step as this tier was asked it (trimmed to its budget), so a
        write-back is keyed exactly as the lookup before it. ``answered_by`` is the tier
        name, ``model`` the model that produced the answer.
        """

    async def aclose(self) -> None:  # noqa: B027
        """Release models, files and connections."""

    async def stream(self, step: Step) -> TierResult | TierStream:
        """Answer the step as a stream (``Milliwatt.stream``), or whole: a tier that answers
        whole (the default) returns ``attempt``'s result, and the cascade hands its answer
        out as one chunk. A tier that streams returns a ``TierStream`` once the first chunk
        is in, so a failure to start is raised here, where the cascade may still go on."""
        return await self.attempt(step)

    def claim(self, step: Step) -> Claim | None:
        """Claim the step before the cheaper tiers are asked (a session pinned to this tier):
        the cascade skips the tiers before this one, with the claim's reason. Called once per
        step, before any tier is asked; must be cheap. The claimant is then asked with
        ``current_claim()`` returning its claim."""
        return None

    async def answered(self, step: Step, result: TierResult) -> None:  # noqa: B027
        """Called once on the tier whose answer a step returned (not on a shadow check's)."""


@dataclass
class Claim:
    """A tier's claim on a step (``Tier.claim``): the tiers before it are skipped with
    ``reason``, except those named in ``keep`` (asked as usual, first)."""

    reason: str
    keep: frozenset[str] = frozenset()


_CLAIM: ContextVar[Claim | None] = ContextVar("milliwatt_claim", default=None)


def current_claim() -> Claim | None:
    """The claim under which the tier running now was asked (None: it was not claimed)."""
    return _CLAIM.get()


@contextmanager
def claiming(claim: Claim | None) -> Iterator[None]:
    """Ask a tier under ``claim`` (the cascade does, for the tier that claimed the step)."""
    token = _CLAIM.set(claim)
    try:
        yield
    finally:
        _CLAIM.reset(token)


class TierStream(ABC):
    """A tier's answer arriving in chunks (OpenAI ``chat.completion.chunk`` dicts).

    Iterate it; once it has ended, ``result`` is the whole answer as a ``TierResult``, with
    the energy and tokens of all of it. After a break (the iteration raised) or an early
    ``aclose``, ``partial`` is the answer as far as it came, charged for what was received.
    ``aclose`` stops the work (the provider's stream) and releases what it held.
    """

    tier: str = "tier"

    def __aiter__(self) -> TierStream:
        return self

    @abstractmethod
    async def __anext__(self) -> Chunk: ...

    @abstractmethod
    async def result(self) -> TierResult: ...

    @abstractmethod
    async def partial(self) -> TierResult: ...

    async def aclose(self) -> None:  # noqa: B027
        """Stop the stream and release what it holds (idempotent)."""


AbortCheck = Callable[[Sequence[float], int], bool]


@dataclass
class Spend:
    """What the attempt in progress has spent so far, as far as its tier can tell.

    The cascade opens one per attempt (``spending``). It is read only when the caller cancels
    the step mid-attempt: the cancelled attempt is then charged ``energy`` if the tier set it,
    else ``cpu_seconds`` at the default CPU coefficients, else nothing (a remote request cut
    off mid-flight: what the provider spent cannot be known).
    """

    cpu_seconds: float = 0.0
    energy: Energy | None = None


_SPEND: ContextVar[Spend | None] = ContextVar("milliwatt_attempt_spend", default=None)


def current_spend() -> Spend | None:
    """The ``Spend`` of the attempt this code runs in (None outside a cascade attempt).

    A backend interrupted by a cancellation adds the CPU seconds it has used to it; a tier
    that knows its own coefficients sets ``energy``. Worker threads started with
    ``asyncio.to_thread`` see the same object (the context is copied into them).
    """
    return _SPEND.get()


@contextmanager
def spending() -> Iterator[Spend]:
    """Open the ``Spend`` of one attempt for the code awaited inside the block."""
    spend = Spend()
    token = _SPEND.set(spend)
    try:
        yield spend
    finally:
        _SPEND.reset(token)


@dataclass(frozen=True)
class Completion:
    """A model backend's answer, with what the energy estimate and the gate need."""

    message: Message
    model: str
    input_tokens: int
    output_tokens: int
    # Log-probabilities of the generated tokens that carry the decision (the gate's input).
    token_logprobs: tuple[float, ...] = ()
    # Log-probability of each closed choice the answer made (tool or text; which tool),
    # among the options the grammar allowed. The gate requires each to pass on its own.
    choice_logprobs: tuple[float, ...] = ()
    # CPU seconds the backend measured for its own work (local backends); None for remote.
    cpu_seconds: float | None = None
    # A hardware counter's joules for the work, and which counter ("rapl", "nvml"); None: none read.
    joules: float | None = None
    meter: str | None = None
    # Input tokens the provider says its prompt cache served; None: it did not say.
    cached_tokens: int | None = None
    cost_usd: float = 0.0
    # Where the answer came from when it is not the configured provider (e.g. "stand-in").
    label: str | None = None
    extra: dict = field(default_factory=dict)


class ModelBackend(ABC):
    """A model that completes OpenAI-format steps (llama.cpp in-process, litellm remote)."""

    model: str = ""

    @abstractmethod
    async def complete(self, step: Step, *, abort: AbortCheck | None = None) -> Completion:
        """Complete the (already trimmed) step. Raise ``BackendError`` subclasses on failure.

        ``abort(logprobs_so_far, max_tokens)``: a backend that decodes token by token may
        stop early once it returns True (the answer can no longer pass the gate), and
        then sets ``extra["aborted"] = True``. Backends that cannot, ignore it.
        """

    async def stream(self, step: Step, *, abort: AbortCheck | None = None) -> CompletionStream:
        """Complete the step as a stream, returned once the first chunk is in (a failure to
        start is raised here, where retries and fallbacks still apply). A backend that cannot
        stream (the default) completes the step and hands the answer out as one chunk."""
        return WholeCompletion(await self.complete(step, abort=abort))

    async def aclose(self) -> None:  # noqa: B027
        """Release the model or connection pool."""


class CompletionStream(ABC):
    """A model's answer arriving in chunks (``ModelBackend.stream``).

    Iterate it for OpenAI chunk dicts; ``completion()`` is the answer as far as it has come
    (the whole answer once the iteration has ended), with its token counts: the provider's
    usage when it sent one, else counted. It may tokenise: call it off the event loop.
    ``aclose`` stops the stream (idempotent).
    """

    model: str = ""

    def __aiter__(self) -> CompletionStream:
        return self

    @abstractmethod
    async def __anext__(self) -> Chunk: ...

    @abstractmethod
    def completion(self) -> Completion: ...

    async def aclose(self) -> None:  # noqa: B027
        """Stop the stream and release what it holds."""


class WholeCompletion(CompletionStream):
    """A whole ``Completion`` as a stream of one chunk."""

    def __init__(self, completion: Completion) -> None:
        self.model = completion.model
        self._completion = completion
        self._chunks = message_chunks(completion.message, model=completion.model)

    async def __anext__(self) -> Chunk:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    def completion(self) -> Completion:
        return self._completion
