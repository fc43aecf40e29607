"""The two small seams of the cascade: a tier, and a model backend.

A tier answers a step or passes on it. A model backend turns a step into a completion.
The local and remote tiers are the same ``ModelTier`` over different backends and gates,
so a new provider is one backend module and a new tier is one ``Tier`` subclass,
registered in ``milliwatt.registry``; the cascade itself never changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

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

    async def aclose(self) -> None:  # noqa: B027
        """Release the model or connection pool."""
