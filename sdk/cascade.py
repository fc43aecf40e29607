"""The cascade: trim, then ask each tier in order until one answers; record every attempt.

The cascade knows tiers only through the ``Tier`` seam. It never names a concrete tier,
so adding one is a registry entry (``milliwatt.registry``), not an edit here. It only
orchestrates: the books of a step (tokens, energy, cost, the counterfactual) are kept by
``milliwatt.accounting``, off the event loop.

Failures: a tier other than the last that raises (any ``Exception``: a backend, an
embedding model, a FAISS index) is logged, recorded as that tier's ``error`` attempt, and
the step goes on to the next tier. Only the last resort's failure reaches the caller, as a
``MilliwattError``. A step the caller cancels is recorded with outcome ``cancelled`` and
the energy spent until then, and the ``CancelledError`` goes on. Every step, answered,
failed or cancelled, is handed to the sink exactly once.

Trimming (``milliwatt.trimming``, one pipeline per tier): a step is trimmed for each tier
before it is asked. A tier whose token budget the step cannot fit is not asked (it passes with
the reason). An answer that asks for tools whose schemas trimming withheld (through the index
tool, or by calling one) is not handed on: it is a ``passed`` attempt, and the same tier is
asked again with those schemas. Every verified answer is shown to the trimmers, which learn
from it which tools conversations use.

Shadow checks: a tier that answered may ask (``TierResult.shadow``) that its answer be
checked. The caller gets the answer at once; the later tiers answer the step in the
background, the first answer goes to the checked tier's ``remember``, and the step is
recorded with those ``shadow`` attempts and their energy and cost.

Streaming (``stream``): the same choice of tier (``_choose``), the same books (``_finish``,
``_account``). The answering tier streams if it can (``Tier.stream``); its chunks are relayed
as they come, and the step is recorded when the stream ends. A stream the reader closes or
cancels is recorded ``cancelled``, one that breaks is the tier's ``error`` attempt: either way
with the answer as far as it came (``partial`` in the attempt's evidence) and its energy.

Claims: a tier may claim a step before the cheaper ones are asked (``Tier.claim``: a session
pinned to the remote tier); the tiers before it are recorded as ``skipped``, with its reason.

Decisions of a tier that passes: ``skip_to`` (go straight to that tier), ``forbid`` (do not ask
these tiers for this step: ``skipped`` with the reason given; never the last resort) and
``token_budget`` (trim every later tier to at most this many input tokens), e.g. from a rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import pickle
import time
import traceback
from collections.abc import AsyncGenerator, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .accounting import CANCELLED, FAILED, Accountant
from .energy import RemoteEnergyModel, cpu_energy
from .errors import BackendError, MilliwattError, NoTierAnswered
from .redaction import get_logger, redact
from .streaming import Chunk, StepStream, StreamOutcome, content_of, finish_reason, message_chunks, split_tool_calls
from .tier import Claim, Spend, Tier, TierStream, claiming, spending
from .tokens import TokenCounter
from .trimming import Trimmed, Trimmer, wanted
from .types import Attempt, Energy, Message, Step, StepRecord, StepResult, TierResult

log = get_logger()


class RecordSink(Protocol):
    """Where step records go (the ledger). ``write`` must not block the event loop."""

    async def write(self, record: StepRecord) -> None: ...


@dataclass
class _Progress:
    """How far one step has got: what a cancellation needs to record it."""

    step: Step
    started_at: float
    t0: float
    tokens_raw: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    current: tuple[str, float, Spend] | None = None  # the attempt in progress: tier, start, spend
    streaming: tuple[str, float, TierStream] | None = None  # the answer being streamed: tier, start, stream
    handed_on: bool = False  # the record went to the sink
    token_cap: int | None = None  # a tier's cap on the input tokens of the later tiers (a rule's budget)


@dataclass
class _Chosen:
    """The tier that answers a step: its result, or the stream it answers in (its first chunk
    in), with the request it was sent and the step as each tier was asked it."""

    index: int
    trimmed: Trimmed
    a0: float
    asked: dict[str, Step]
    result: TierResult | None = None
    stream: TierStream | None = None
    claim: Claim | None = None  # the claim it was asked under


class Cascade:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        frontier_model: str,
        trimmers: Mapping[str, Trimmer] | None = None,
        counter: TokenCounter | None = None,
        energy_model: RemoteEnergyModel | None = None,
        sink: RecordSink | None = None,
        accountant: Accountant | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a cascade needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.frontier_model = frontier_model
        # One token memo for the books and every tier's trimming: they count the same messages.
        self.counter = counter or (accountant.counter if accountant else TokenCounter())
        self.accountant = accountant or Accountant(frontier_model, counter=self.counter, energy_model=energy_model)
        unknown = sorted(set(trimmers or {}) - set(names))
        if unknown:
            raise ValueError(f"trimming configured for {unknown}, which are not tiers of this cascade ({names})")
        # Each tier's pipeline; a tier without one is trimmed only to its token budget.
        self.trimmers = {n: (trimmers or {}).get(n) or Trimmer(counter=self.counter) for n in names}
        self.sink = sink
        # Record writes in flight, kept so a cancelled caller cannot cut one off and
        # ``aclose`` can wait for them.
        self._writes: set[asyncio.Future[None]] = set()

    async def run(self, step: Step) -> StepResult:
        progress = _Progress(step, time.time(), time.perf_counter())
        try:
            return await self._run(progress)
        except asyncio.CancelledError:
            await self._record_cancelled(progress)
            raise

    def stream(self, step: Step) -> StepStream:
        """Answer the step as a stream of OpenAI chunks (``milliwatt.streaming.StepStream``).

        The tiers are asked as ``run`` asks them; the one that answers streams its answer if
        it can (``Tier.stream``: the remote tier), else its whole answer is one chunk. A failure
        before the first chunk is handled as in ``run`` (the next tier, or the typed error);
        the record is written when the stream ends, before its last chunk is handed out.
        """
        return StepStream(lambda out: self._stream(step, out))

    async def _run(self, p: _Progress) -> StepResult:
        chosen = await self._choose(p)
        assert chosen.result is not None
        return await self._finish(p, chosen, chosen.result)

    async def _choose(self, p: _Progress, *, streaming: bool = False) -> _Chosen:
        """Ask the tiers in order until one answers (or, ``streaming``, starts a stream)."""
        step = p.step
        tokens_raw = self.accountant.cached_tokens_raw(step)
        if tokens_raw is None:
            tokens_raw = await asyncio.to_thread(self.accountant.tokens_raw, step)
        p.tokens_raw = tokens_raw
        attempts = p.attempts
        last = len(self.tiers) - 1
        claimed, claim = self._claimed(step)
        skip_to: str | None = None
        forbidden: dict[str, str] = {}  # tiers an earlier tier said not to ask (a rule's forbid), with why
        asked: dict[str, Step] = {}  # the step as each tier was asked it, for write-back
        for index, tier in enumerate(self.tiers):
            if claim is not None and index < claimed and tier.name not in claim.keep:
                attempts.append(_skipped(tier.name, claim.reason))
                continue
            if skip_to is not None and tier.name != skip_to:
                attempts.append(_skipped(tier.name, f"routed to {skip_to}"))
                continue
            if tier.name in forbidden and index < last:  # the last resort is asked whatever was said
                attempts.append(_skipped(tier.name, forbidden[tier.name]))
                continue
            skip_to = None
            a0 = time.perf_counter()
            under = claim if index == claimed else None
            with spending() as spend, claiming(under):
                p.current = (tier.name, a0, spend)
                try:
                    result, trimmed, a0 = await self._ask(tier, step, tokens_raw, attempts, a0, streaming=streaming, cap=p.token_cap)
                    asked[tier.name] = trimmed.step
                except Exception as e:  # noqa: BLE001 - any failure of a tier is a reason to go on
                    p.current = None
                    reason = redact(f"{type(e).__name__}: {e}")
                    attempts.append(_failed(tier.name, reason, e, time.perf_counter() - a0))
                    if index == last:
                        log.warning("tier %s failed and is the last resort: %s", tier.name, reason)
                        _log_traceback(e)
                        await self._hand_on_quietly(p, await self._account(p))
                        if isinstance(e, MilliwattError):
                            raise
                        raise BackendError(f"{tier.name} failed: {reason}", backend=tier.name) from e
                    log.warning("tier %s failed, going on to the next tier: %s", tier.name, reason)
                    _log_traceback(e)
                    continue
                p.current = None
            if isinstance(result, TierStream):
                return _Chosen(index, trimmed, a0, asked, stream=result, claim=under)
            attempts.append(_attempted(result, trimmed, time.perf_counter() - a0))
            if result.answered:
                return _Chosen(index, trimmed, a0, asked, result=result, claim=under)
            # Only a route to a later tier is obeyed: one to a tier this cascade does not
            # have, or one already passed, would skip every later tier and fail the step.
            later = {t.name for t in self.tiers[index + 1 :]}
            skip_to = result.skip_to if result.skip_to in later else None
            forbidden.update(result.forbid)
            if result.token_budget is not None:
                p.token_cap = result.token_budget if p.token_cap is None else min(p.token_cap, result.token_budget)
        await self._hand_on_quietly(p, await self._account(p))
        raise NoTierAnswered("every tier passed: " + "; ".join(f"{a.tier}: {a.reason}" for a in attempts))

    def _claimed(self, step: Step) -> tuple[int, Claim | None]:
        """The first tier that claims the step (``Tier.claim``: a pinned session), if any."""
        for index, tier in enumerate(self.tiers[1:], 1):
            try:
                claim = tier.claim(step)
            except Exception as e:  # noqa: BLE001 - a claim is an optimisation, never worth the step
                log.warning("tier %s could not say whether it claims a step: %s", tier.name, redact(f"{type(e).__name__}: {e}"))
                continue
            if claim is not None:
                return index, claim
        return 0, None

    async def _finish(self, p: _Progress, chosen: _Chosen, answer: TierResult) -> StepResult:
        """The step is answered: write back, record, hand the record on (after a shadow check,
        if one was asked for)."""
        step, asked, answered_at, sent = p.step, chosen.asked, chosen.index, chosen.trimmed
        last = len(self.tiers) - 1
        message = snapshot(answer.message or {})
        if answer.cacheable:
            self._learn(step, message)
            for earlier in self.tiers[:answered_at]:
                if earlier.name not in asked:  # a tier skipped by a route was not asked
                    continue
                try:
                    await earlier.remember(asked[earlier.name], message, answer.tier, model=answer.model)
                except Exception as e:  # noqa: BLE001 - a failed write-back costs a future hit, never this answer
                    log.warning("write-back to %s failed: %s", earlier.name, redact(f"{type(e).__name__}: {e}"))
                    _log_traceback(e)
        record = await self._account(p, answer=answer, message=message, sent=sent)
        if answer.shadow and answered_at < last:
            # The caller gets its answer now; the record goes to the sink once the check is in,
            # with the check's attempt and its cost (the caller's record is without them).
            p.handed_on = True
            self._spawn_write(self._shadow_check(p, asked, answered_at, answer, message, sent))
        else:
            await self._hand_on(p, record)
        try:
            await self.tiers[answered_at].answered(step, answer)
        except Exception as e:  # noqa: BLE001 - what a tier makes of its answer is never worth the answer
            log.warning("tier %s could not take note of its answer: %s", answer.tier, redact(f"{type(e).__name__}: {e}"))
        # The caller's copy: what it does to it cannot change the record the writer serialises.
        return StepResult(snapshot(message), record)

    async def _stream(self, step: Step, out: StreamOutcome) -> AsyncGenerator[Chunk, None]:
        """``stream``'s chunks: the answering tier's, relayed; the step recorded at the end.

        The chunk with the ``finish_reason`` (and any after it) is held until the step is
        recorded, so a reader that stops at it leaves a complete record. When trimming withheld
        tool schemas, tool-call deltas are held to the end: an answer asking for withheld
        schemas is not handed on, and the tier is asked again with them (whole), as in ``run``.
        """
        p = _Progress(step, time.time(), time.perf_counter())
        try:
            chosen = await self._choose(p, streaming=True)
            if chosen.stream is None:
                assert chosen.result is not None
                out.result = await self._finish(p, chosen, chosen.result)
                record = out.result.record
                for chunk in message_chunks(out.result.message, model=record.model, chunk_id=f"chatcmpl-{record.step_id}"):
                    yield chunk
                return
            tier = self.tiers[chosen.index]
            stream, trimmed, a0 = chosen.stream, chosen.trimmed, chosen.a0
            p.streaming = (tier.name, a0, stream)
            hold = bool(trimmed.withheld)
            held: list[Chunk] = []
            tail: list[Chunk] = []
            sent: list[str] = []  # the content handed on
            while True:
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as e:  # noqa: BLE001 - typed for the caller in _broken
                    await self._broken(p, e)
                    raise AssertionError("unreachable") from None
                if tail or finish_reason(chunk):
                    tail.append(chunk)
                    continue
                if hold:
                    rest, calls = split_tool_calls(chunk)
                    if calls is not None:
                        held.append(calls)
                    if rest is None:
                        continue
                    chunk = rest
                sent.append(content_of(chunk))
                yield chunk
            try:
                result = await stream.result()
            except Exception as e:  # noqa: BLE001 - its books could not be kept: a break, recorded as one
                await self._broken(p, e)
                raise AssertionError("unreachable") from None
            p.streaming = None
            await stream.aclose()
            answer, tail = await self._after_stream(p, chosen, tier, result, held + tail, "".join(sent))
            out.result = await self._finish(p, chosen, answer)
            for chunk in tail:
                yield chunk
        except asyncio.CancelledError:
            await self._record_cancelled(p)
            raise
        except GeneratorExit:
            await self._record_cancelled(p, "the reader closed the stream")
            raise

    async def _after_stream(
        self, p: _Progress, chosen: _Chosen, tier: Tier, result: TierResult, tail: list[Chunk], sent: str
    ) -> tuple[TierResult, list[Chunk]]:
        """A streamed answer has ended: record its attempt, unless it asks for tool schemas
        trimming withheld; then the tier is asked again with them, and that answer's chunks
        follow (its content only if none was handed on yet: what was sent cannot be taken back,
        so the answer recorded is what the reader got)."""
        a0, trimmed = chosen.a0, chosen.trimmed
        if not (chosen.trimmed.withheld and wanted(result.message, trimmed)):
            p.attempts.append(_attempted(result, trimmed, time.perf_counter() - a0))
            return result, tail
        with spending() as spend, claiming(chosen.claim):
            p.current = (tier.name, a0, spend)
            try:
                again, trimmed, a0 = await self._unwithhold(tier, p.step, p.tokens_raw or 0, p.attempts, a0, result, trimmed, cap=p.token_cap)
            except Exception as e:  # noqa: BLE001 - typed for the caller below
                p.current = None
                reason = redact(f"{type(e).__name__}: {e}")
                p.attempts.append(_failed(tier.name, reason, e, time.perf_counter() - a0))
                await self._hand_on_quietly(p, await self._account(p))
                if isinstance(e, MilliwattError):
                    raise
                raise BackendError(f"{tier.name} failed: {reason}", backend=tier.name) from e
            p.current = None
        chosen.trimmed, chosen.a0, chosen.asked[tier.name] = trimmed, a0, trimmed.step
        p.attempts.append(_attempted(again, trimmed, time.perf_counter() - a0))
        if not again.answered:  # the stream's reader cannot be sent on to a later tier: the step fails
            await self._hand_on_quietly(p, await self._account(p))
            raise NoTierAnswered(f"{tier.name} passed when asked again with the tool schemas it asked for: {again.reason}")
        message = dict(again.message or {})
        if sent:
            message["content"] = sent
        return replace(again, message=message), message_chunks({**message, "content": None if sent else message.get("content")}, model=again.model)

    async def _broken(self, p: _Progress, error: Exception) -> None:
        """The answer's stream broke part-way: record the partial answer and its energy as
        the tier's ``error`` attempt, then raise the error, typed (``RemoteStreamError`` from
        the remote tier)."""
        assert p.streaming is not None
        name, a0, stream = p.streaming
        p.streaming = None
        reason = redact(f"{type(error).__name__}: {error}")
        p.attempts.append(await _cut(stream, "error", reason, time.perf_counter() - a0))
        await stream.aclose()
        log.warning("tier %s: the answer's stream broke: %s", name, reason)
        _log_traceback(error)
        await self._hand_on_quietly(p, await self._account(p))
        if isinstance(error, MilliwattError):
            raise error
        raise BackendError(f"{name} failed: {reason}", backend=name) from error

    async def _shadow_check(
        self, p: _Progress, asked: dict[str, Step], answered_at: int, answer: TierResult, message: Message, sent: Trimmed | None
    ) -> None:
        """Ask the tiers after the one that answered, as if it had passed, off the critical
        path. The first answer fit to be a reference (one the cascade would write back, so not
        an unverified local answer) goes to the answering tier's ``remember`` (the cache judges
        its own answer against it and learns); every try is a ``shadow`` attempt of the step,
        charged like any other; then the step is recorded."""
        checked = self.tiers[answered_at]

        def shadow(a: Attempt, what: str, **kw: Any) -> None:
            p.attempts.append(replace(a, outcome="shadow", reason=f"shadow check of {checked.name}{what}", **kw))

        for later in self.tiers[answered_at + 1 :]:
            a0 = time.perf_counter()
            checks: list[Attempt] = []
            try:
                result, trimmed, a0 = await self._ask(later, p.step, p.tokens_raw, checks, a0)
            except Exception as e:  # noqa: BLE001 - a failed check costs feedback, never the answer
                reason = redact(f"{type(e).__name__}: {e}")
                shadow(_failed(later.name, reason, e, time.perf_counter() - a0), f" failed: {reason}")
                continue
            for check in checks:
                shadow(check, f": {check.reason}")
            attempt = _attempted(result, trimmed, time.perf_counter() - a0)
            if not (result.answered and result.cacheable):
                shadow(attempt, f": {'not a reference' if result.answered else 'passed'}: {result.reason}")
                continue
            reference = snapshot(result.message or {})
            self._learn(p.step, reference)
            shadow(attempt, f": {result.reason}", evidence={"checks": checked.name, "answer": reference})
            try:
                await checked.remember(asked[checked.name], reference, result.tier, model=result.model)
            except Exception as e:  # noqa: BLE001
                log.warning("shadow feedback to %s failed: %s", checked.name, redact(f"{type(e).__name__}: {e}"))
            break
        record = await self._account(p, answer=answer, message=message, sent=sent)
        if self.sink is not None:
            await self.sink.write(record)

    async def _ask(
        self, tier: Tier, step: Step, tokens_raw: int, attempts: list[Attempt], a0: float, *, streaming: bool = False,
        cap: int | None = None,
    ) -> tuple[TierResult | TierStream, Trimmed, float]:
        """Trim the step for ``tier`` and ask it; return the result, the request it answered
        and when that request started. An answer that asks for tools whose schemas trimming
        withheld (it calls one, or the index of them) is not an answer: it is recorded as a
        passed attempt and the tier is asked again with those schemas (and, should it ask
        again, with all of them). ``streaming``: the tier may answer with a ``TierStream``
        (what it asks for is then seen when it ends: ``_after_stream``). ``cap``: the step's own
        cap on input tokens (a rule's budget), beside the tier's."""
        trimmed = await self._trim(step, tier, tokens_raw, cap=cap)
        if not trimmed.fits:
            # A token budget is what the tier can take (a local model's window, or what runs
            # fast enough on a CPU): what must stay of the step is more, so it is not asked.
            budget = _budget(tier.token_budget, cap)
            whose = "the tier's" if budget == tier.token_budget else "the step's (set by an earlier tier)"
            reason = f"{trimmed.tokens_after} input tokens after trimming exceed {whose} token budget of {budget}"
            return TierResult.passed(tier.name, reason), trimmed, a0
        result = await (tier.stream(trimmed.step) if streaming else tier.attempt(trimmed.step))
        if isinstance(result, TierStream):
            return result, trimmed, a0
        return await self._unwithhold(tier, step, tokens_raw, attempts, a0, result, trimmed, cap=cap)

    async def _unwithhold(
        self, tier: Tier, step: Step, tokens_raw: int, attempts: list[Attempt], a0: float, result: TierResult, trimmed: Trimmed,
        *, cap: int | None = None,
    ) -> tuple[TierResult, Trimmed, float]:
        """While ``result`` asks for tool schemas trimming withheld, record it as passed and ask
        the tier again with them (then with all of them); return the last answer."""
        reveal: set[str] = set()
        for last_try in (False, True):
            asked_for = wanted(result.message, trimmed) if result.answered else frozenset()
            if not asked_for:
                break
            reveal |= set(trimmed.withheld) if last_try else asked_for
            passed = _attempted(result, trimmed, time.perf_counter() - a0)
            attempts.append(replace(
                passed, outcome="passed",
                reason=f"asked for tool schemas trimming withheld ({', '.join(sorted(asked_for))}); asked again with them",
                evidence={**(passed.evidence or {}), "asked_for": sorted(asked_for)},
            ))  # fmt: skip
            a0 = time.perf_counter()
            trimmed = await self._trim(step, tier, tokens_raw, reveal, cap=cap)
            result = await tier.attempt(trimmed.step)
        return result, trimmed, a0

    async def _trim(self, step: Step, tier: Tier, tokens_raw: int, reveal: Collection[str] = (), *, cap: int | None = None) -> Trimmed:
        trimmer, budget = self.trimmers[tier.name], _budget(tier.token_budget, cap)
        if not trimmer.strategies and (budget is None or tokens_raw <= budget):
            return trimmer.trim(step, budget, tokens_before=tokens_raw)  # returns at once
        # Strategies tokenise what they rewrite (once: the counts are memoised), so off the loop.
        return await asyncio.to_thread(trimmer.trim, step, budget, tokens_before=tokens_raw, reveal=reveal)

    def _learn(self, step: Step, answer: Message) -> None:
        """Strategies that learn from traffic (tool selection) see each verified answer."""
        for trimmer in self.trimmers.values():
            try:
                trimmer.learn(step, answer)
            except Exception as e:  # noqa: BLE001 - learning is never worth an answer
                log.warning("trimming could not learn from a step: %s", redact(f"{type(e).__name__}: {e}"))

    async def _account(self, p: _Progress, *, outcome: str = FAILED, attempts: list[Attempt] | None = None, **kw: Any) -> StepRecord:
        """The step's record: built here when every figure it needs is memoised (cheaper than
        a thread hop), else in a worker thread (tokenising, a new EcoLogits estimate)."""
        build = functools.partial(
            self.accountant.record,
            p.step,
            started_at=p.started_at,
            t0=p.t0,
            tokens_raw=p.tokens_raw,
            attempts=list(p.attempts if attempts is None else attempts),
            outcome=outcome,
            **kw,
        )
        if self.accountant.can_record_inline(p.tokens_raw, kw.get("message")):
            return build()
        return await asyncio.to_thread(build)

    async def _hand_on(self, p: _Progress, record: StepRecord) -> None:
        """Give the record to the sink. The write runs as its own task, so a caller cancelling
        the step now cannot cut it off (nor make the step be recorded twice)."""
        p.handed_on = True
        if self.sink is None:
            return
        await asyncio.shield(self._spawn_write(self.sink.write(record)))

    async def _hand_on_quietly(self, p: _Progress, record: StepRecord) -> None:
        """``_hand_on`` on a failure path: a failing sink must not hide the step's own error."""
        try:
            await self._hand_on(p, record)
        except Exception:  # noqa: BLE001 - logged by _finished_write
            return

    async def _record_cancelled(self, p: _Progress, why: str = "cancelled by the caller") -> None:
        """Record a step the caller cancelled: the attempts completed, plus the one cut off
        with what its tier says it spent so far (a stream cut off: the partial answer, charged
        for what was received; the stream is stopped)."""
        if p.handed_on:
            return
        p.handed_on = True
        attempts = list(p.attempts)
        if p.current is not None:
            name, a0, spend = p.current
            elapsed = time.perf_counter() - a0
            energy = spend.energy or (cpu_energy(spend.cpu_seconds) if spend.cpu_seconds > 0 else Energy.zero())
            attempts.append(
                Attempt(name, "cancelled", f"{why} after {elapsed:.3f} s in this tier", None, None, 0, 0, elapsed, energy, 0.0)
            )
        streaming, p.streaming = p.streaming, None
        log.info("step cancelled by the caller after %d attempt(s)", len(attempts) + (streaming is not None))
        if self.sink is None and streaming is None:
            return
        sink = self.sink

        async def account_and_write() -> None:
            if streaming is not None:
                _, a0, stream = streaming
                elapsed = time.perf_counter() - a0
                try:
                    attempts.append(await _cut(stream, "cancelled", f"{why} after {elapsed:.3f} s of its stream", elapsed))
                finally:
                    await stream.aclose()
            if sink is None:
                return
            record = await self._account(p, outcome=CANCELLED, attempts=attempts)
            await sink.write(record)

        write = self._spawn_write(account_and_write())
        # Cancelled again while recording: the write goes on in the background. A failed write
        # is logged by _finished_write; either way the caller gets its CancelledError.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(write)

    def _spawn_write(self, write: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run a record write as its own task, kept until done (``aclose`` waits for it) and
        its failure logged (``_finished_write``)."""
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        task.add_done_callback(_finished_write)
        return task

    async def aclose(self) -> None:
        """Wait for record writes in flight, then close every tier, even when one fails to
        close; then raise the first failure."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        errors: list[BaseException] = []
        for tier in self.tiers:
            try:
                await tier.aclose()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


def _finished_write(write: asyncio.Future[None]) -> None:
    if write.cancelled():
        return
    error = write.exception()  # retrieved here, so an unawaited failure is logged once, not lost
    if error is not None:
        log.error("a step record could not be written: %s", redact(f"{type(error).__name__}: {error}"))


def _log_traceback(error: BaseException) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", redact("".join(traceback.format_exception(error))))


def snapshot(value: Any) -> Any:
    """A deep copy of a request or an answer (JSON-shaped data: dicts, lists, strings, numbers).

    A pickle round trip is C code all the way: for a 5k-token agent request with its tool
    schemas it takes ~15 us, against ~40 us for a recursive copy in Python and ~80 us for
    ``copy.deepcopy``. What pickle cannot copy is deep-copied."""
    try:
        return pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))  # our own bytes, just made
    except Exception:  # noqa: BLE001 - an unpicklable object in the request: the slow path
        return copy.deepcopy(value)


def _attempted(r: TierResult, trimmed: Trimmed, latency: float) -> Attempt:
    evidence = r.evidence
    if trimmed.stages:  # what trimming did to this tier's request, beside what the tier decided on
        evidence = {**(evidence or {}), "trim": trim_evidence(trimmed)}
    return Attempt(
        tier=r.tier,
        outcome="answered" if r.answered else "passed",
        reason=r.reason,
        signal=r.signal,
        model=r.model,
        input_tokens=r.input_tokens or (trimmed.tokens_after if trimmed.fits else 0),  # not fitting: not sent
        output_tokens=r.output_tokens,
        latency_s=latency,
        energy=r.energy,
        cost_usd=r.cost_usd,
        label=r.label,
        evidence=evidence,
        prefix_tokens=trimmed.prefix_tokens,
    )


def trim_evidence(trimmed: Trimmed) -> dict[str, Any]:
    """The ledger's account of one request's trimming (``attempts.evidence_json`` → ``trim``)."""
    out: dict[str, Any] = {"saved": {s.strategy: s.saved for s in trimmed.stages if s.saved}}
    if trimmed.withheld:
        out["withheld"] = list(trimmed.withheld)
    return out


async def _cut(stream: TierStream, outcome: str, reason: str, latency: float) -> Attempt:
    """The attempt of a stream cut off (``cancelled``) or broken (``error``): the answer as far
    as it came is its evidence (``partial``), charged for the tokens received."""
    try:
        partial = await stream.partial()
    except Exception as e:  # noqa: BLE001 - what it spent is unknown; the step is still recorded
        log.warning("the partial answer of a %s stream could not be charged: %s", stream.tier, redact(f"{type(e).__name__}: {e}"))
        return Attempt(stream.tier, outcome, reason, None, None, 0, 0, latency, Energy.zero(), 0.0)  # type: ignore[arg-type]
    return Attempt(
        tier=stream.tier,
        outcome=outcome,  # type: ignore[arg-type]
        reason=reason,
        signal=None,
        model=partial.model,
        input_tokens=partial.input_tokens,
        output_tokens=partial.output_tokens,
        latency_s=latency,
        energy=partial.energy,
        cost_usd=partial.cost_usd,
        label=partial.label,
        evidence={**(partial.evidence or {}), "partial": partial.message},
    )


def _budget(own: int | None, cap: int | None) -> int | None:
    """A tier's token budget under the step's cap (either may be unset)."""
    return own if cap is None else cap if own is None else min(own, cap)


def _skipped(tier: str, reason: str) -> Attempt:
    return Attempt(tier, "skipped", reason, None, None, 0, 0, 0.0, Energy.zero(), 0.0)


def _failed(tier: str, reason: str, error: Exception, latency: float) -> Attempt:
    model = getattr(error, "model", None) or None
    return Attempt(tier, "error", reason, None, model if isinstance(model, str) else None, 0, 0, latency, Energy.zero(), 0.0)

