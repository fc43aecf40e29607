"""The semantic cache tier: answer a step with a stored answer to a step close enough to it.

Two kinds of candidates:

* **exact entries**: the same scope (scope.py), history and tail (key.py), exactly, the
  nearest last user messages by cosine, and the same digit-bearing literals;
* **templates** (template.py): an answer that copied values from its context, in the same
  situation (key.Situation: scope and shape of recent turns exactly, the masked request by
  cosine), re-bound to this step's values; every slot must bind to exactly one value.

Either kind must be unexpired and call only tools declared read-only. Then the **gate**
(evidence.py) decides: a score over evidence beyond cosine (text features, and for
templates how many stored templates bind to the same answer; for every entry how often its
answer agreed with the next tier before) against a threshold certified so that the share of
wrong hits stays under the bound it was calibrated for. A gate that was not calibrated on
templated candidates never serves one. Anything less is a pass with the reason, and the
candidates go to the ledger (``evidence``) so ``milliwatt cache calibrate`` can judge them.

Feedback: when the cache passes with candidates and a later tier answers the step, each
candidate is judged against that answer (``milliwatt.quality.agreement``) and the verdict is
counted on its entry (``agree``/``disagree``): the per-entry evidence vCache learns from.

A tool call served from the cache is executed again by the agent, so only calls to tools
without side effects may be: ``tool_policy`` maps tool names to ``"read_only"`` or
``"never"``, read as ``milliwatt.side_effects`` reads it for every cheap tier (a tool it does
not name counts as read-only only if its schema carries MCP's ``readOnlyHint: true``). The
policy is applied when an answer is stored and again when an entry would answer (a persisted
cache may outlive a policy change).
"""

from __future__ import annotations

import asyncio
import copy
import math
import random
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from milliwatt.calibration import clopper_pearson_lower
from milliwatt.energy import CpuCoefficients, CpuTimer, cpu_energy
from milliwatt.errors import ConfigError, InvalidRequestError
from milliwatt.overheads import overheads
from milliwatt.quality import agreement
from milliwatt.redaction import get_logger
from milliwatt.side_effects import ReadOnlyTools
from milliwatt.tier import Tier
from milliwatt.types import Message, Step, TierResult

from . import persist
from .embedder import Embedder
from .evidence import HitGate, default_gate, text_features
from .key import Situation, StepKey, situation, step_key
from .scope import canonical_json, uncacheable_reason
from .store import Entry, Store
from .template import BindError, Context, make_template

_R = TypeVar("_R")

DEFAULT_TTL_S = 24 * 3600.0  # answers about bookings, stock or status go stale
DEFAULT_MAX_ENTRIES = 50_000  # ~75 MB of vectors
SEARCH_K = 8  # candidates of each kind checked against the exact guards, best first
PURGE_EVERY_S = 60.0
log = get_logger(__name__)
PENDING_MAX = 4096
# Share of hits also answered by the next tier, off the critical path, to check them: the
# feedback that keeps per-entry evidence current in service (docs/cache.md).
DEFAULT_SHADOW_SHARE = 0.05  # steps whose held-back candidates await the answer a later tier gives


class CacheTier(Tier):
    name = "cache"
    # No trimming by default: the key hashes the whole conversation (key.py), and keys the
    # step as the cache sees it; a trimmed step's key is blind to what trimming cut away (an
    # older tool result), so two contexts that differ only there would share answers.
    token_budget: int | None = None

    def __init__(
        self,
        *,
        path: str | None = None,
        gate: HitGate | None = None,
        templates: bool = True,
        observe: bool = False,
        shadow_share: float = DEFAULT_SHADOW_SHARE,
        autosave_s: float = 30.0,
        sync_s: float = 1.0,
        ttl_s: float | None = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        token_budget: int | None = None,
        tool_policy: Mapping[str, str] | None = None,
        embedder: Embedder | None = None,
        coefficients: CpuCoefficients | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s is not None and not ttl_s > 0:
            raise ConfigError("cache.ttl_s", f"must be > 0 seconds or null (no expiry), got {ttl_s}")
        if max_entries < 1:
            raise ConfigError("cache.max_entries", f"must be >= 1, got {max_entries}")
        if not 0 <= shadow_share <= 1:
            raise ConfigError("cache.shadow_share", f"must be in [0, 1], got {shadow_share}")
        self.read_only = ReadOnlyTools(tool_policy, where="cache.tool_policy")
        self.path = path
        self.gate = gate or default_gate()
        self.templates = templates
        self.observe = observe
        self.shadow_share = shadow_share
        self._draw = random.Random(0).random  # which hits get a shadow check: reproducible
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.token_budget = token_budget
        self.coefficients = coefficients or CpuCoefficients.of()
        self.embedder = embedder or Embedder()
        self._owns_embedder = embedder is None
        self._clock = clock
        self._last_purge = clock()
        self.store = Store()
        self._folder_lock: persist.FolderLock | None = None
        self._autosave: persist.Autosaver | None = None
        # Candidates of steps the cache did not answer, until the answer a later tier gave
        # comes back through remember(): the feedback each entry learns from (_learn).
        self._pending: OrderedDict[int, tuple[Step, list[Candidate]]] = OrderedDict()
        if path is not None and "://" in path:
            # Shared by every worker on the database (shared.py): its writes are committed as they come.
            # Imported here: SQLAlchemy is not loaded for a cache that does not need it.
            from .shared import SharedStore

            self.store = SharedStore(path, self.embedder.name, sync_s=sync_s)
            self.store.purge_expired(clock())
        elif path is not None:
            # One open cache per folder: a second process (or tier) is refused, never allowed
            # to overwrite this one's saves.
            self._folder_lock = persist.lock_folder(path)
            try:
                # Loaded now, so a corrupt folder fails at start-up, naming the file.
                persist.load(self.store, path, self.embedder.name)
            except BaseException:
                self._folder_lock.release()
                raise
            self.store.purge_expired(clock())
            # Saved while open, at most every autosave_s, so a crash loses little.
            self._autosave = persist.Autosaver(self.store, path, self.embedder.name, every_s=autosave_s)

    # ------------------------------------------------------------------ lookup

    async def attempt(self, step: Step) -> TierResult:
        """Answer from the cache, or pass with the reason. Errors of MiniLM or FAISS are raised,
        not turned into a pass: the cascade records them and goes on."""
        timer = CpuTimer("thread")
        with timer.measure():
            if _step_ttl(step, self.ttl_s) == 0:
                why_not: str | None = "cache_ttl_s is 0 for this step"
            else:
                why_not = uncacheable_reason(step)
                why_not = why_not and f"not cacheable: {why_not}"
            key = None if why_not else step_key(step)
            where = situation(step, key.scope) if key is not None and self.templates else None
        if key is None:
            return self._pass(str(why_not), timer.seconds)
        exact = self.store.has_partition(key.partition)
        templated = where is not None and self.store.has_partition(where.partition)
        if not exact and not templated:
            return self._pass(self._empty_reason(key), timer.seconds)

        texts = ([key.text] if exact else []) + ([where.text] if templated and where else [])
        embedded = await asyncio.gather(*(self.embedder.embed(t) for t in texts))
        vectors = [v for v, _ in embedded]
        found, search_cpu = await asyncio.to_thread(
            self._candidates, step, key if exact else None, vectors[0] if exact else None,
            where if templated else None, vectors[-1] if templated else None,
        )  # fmt: skip
        cpu = timer.seconds + sum(c for _, c in embedded) + search_cpu
        candidates, rejections = found
        energy = cpu_energy(cpu, self.coefficients)

        ranked = sorted(candidates, key=lambda c: c.score, reverse=True)
        served = next((c for c in ranked if c.serve), None)
        if served is not None and not self.observe:
            served.entry.hits += 1
            self.store.touch(served.entry)
            shadow = self._draw() < self.shadow_share
            if shadow:  # the next tier's answer comes back through remember(): _learn judges this one
                self._remember_candidates(step, [served])
            return TierResult(
                self.name,
                _with_fresh_ids(served.message),
                f"{served.describe(self.gate)} in scope {key.scope[:6]}",
                energy,
                signal=served.score,
                model=f"cache:{served.entry.source}",
                cacheable=False,
                evidence=self._evidence(ranked, served),
                shadow=shadow,
            )
        if ranked:
            self._remember_candidates(step, ranked)
        # The reason names the nearest entries first: the best candidate the gate turned down,
        # and the nearest one a guard turned down (expired, a literal, a slot, a tool).
        nearest = sorted([*rejections, *((c.features["cosine"], c.describe(self.gate)) for c in ranked[:1])], reverse=True)
        reason = "; ".join(text for _, text in nearest[:2]) or self._empty_reason(key)
        if self.observe:
            reason = f"observing: {reason}"
        return self._pass(reason, cpu, signal=ranked[0].score if ranked else None, evidence=self._evidence(ranked, None))

    def _empty_reason(self, key: StepKey) -> str:
        where = f"scope {key.scope[:6]}"
        if not self.store.has_scope(key.scope):
            return f"no entry in {where}"
        templates = "; no template for this situation" if self.templates else ""
        if not self.store.has_history(key.history_key):
            return f"no entry with these earlier turns in {where}{templates}"
        return f"no entry with these tool calls and outputs in {where}{templates}"

    def _candidates(
        self, step: Step, key: StepKey | None, vector: np.ndarray | None, where: Situation | None, masked: np.ndarray | None
    ) -> tuple[tuple[list[Candidate], list[tuple[float, str]]], float]:
        """The candidates of both kinds that pass the exact guards, scored by the gate, and the
        reasons the others were turned down (in a worker thread: FAISS, binding, features)."""
        timer = CpuTimer("thread")
        now = self._clock()
        out: list[Candidate] = []
        rejections: list[tuple[float, str]] = []  # (similarity, why)
        with timer.measure():
            if key is not None and vector is not None:
                for entry, sim in self.store.search(key.partition, vector, SEARCH_K):
                    why = self._guard(entry, entry.message, step, now) or _literal_mismatch(entry, key)
                    if why:
                        rejections.append((sim, f"{why} (similarity {sim:.3f})"))
                        continue
                    out.append(self._scored(entry, entry.message, text_features(key.text, entry.text, sim), templated=False))
            if where is not None and masked is not None:
                ctx = Context(step.messages)
                bound: list[tuple[Entry, Message, float]] = []
                for entry, sim in self.store.search(where.partition, masked, SEARCH_K):
                    assert entry.template is not None
                    try:
                        message = entry.template.bind(ctx)
                    except BindError as e:
                        rejections.append((sim, f"template {entry.id}: {e} (similarity {sim:.3f})"))
                        continue
                    why = self._guard(entry, message, step, now)
                    if why:
                        rejections.append((sim, f"template {entry.id}: {why} (similarity {sim:.3f})"))
                        continue
                    bound.append((entry, message, sim))
                # Several templates that bind to the same answer are evidence for it.
                votes = Counter(_answer_key(m) for _, m, _ in bound)
                for entry, message, sim in bound:
                    features = text_features(where.text, entry.text, sim)
                    features.update(slots=float(len(entry.template.slots)), votes=float(votes[_answer_key(message)]), rivals=float(len(votes) - 1))  # type: ignore[union-attr]
                    out.append(self._scored(entry, message, features, templated=True))
        return (out, rejections), timer.seconds

    def _retired(self, entry: Entry) -> bool:
        """Whether the entry's record as a hit (the verdicts given when the gate served it, or
        would have) shows, with 95% confidence, that it is wrong more often than the gate's
        bound allows: a threshold per entry, learned from its feedback (vCache's idea), on top
        of the gate's. At a 2% bound one failed check in one retires an entry; one in sixty
        does not. Verdicts on it as a far candidate the gate turned down do not count."""
        return clopper_pearson_lower(entry.failed_checks, entry.checks) > self.gate.threshold.target_error

    def _scored(self, entry: Entry, message: Message, features: dict[str, float], *, templated: bool) -> Candidate:
        features.update(
            templated=float(templated), tool_call=float(bool(message.get("tool_calls"))), agree=float(entry.agree), disagree=float(entry.disagree)
        )
        serve, score = self.gate.accepts(features)
        return Candidate(entry, message, features, score, serve, templated)

    def _guard(self, entry: Entry, message: Message, step: Step, now: float) -> str | None:
        """Why an entry of the right partition must still not answer; None if it may."""
        if entry.expired(now):
            return "expired"
        if entry.failed_checks and self._retired(entry):
            return f"retired: as a hit, disagreed with the next tier {entry.failed_checks} of {entry.checks} times"
        tool = self.read_only.first_unsafe(message, step)
        if tool is not None:
            return f"tool {tool} is not declared read-only"
        return None

    def _evidence(self, ranked: list[Candidate], served: Candidate | None) -> dict[str, Any] | None:
        """What the ledger keeps of the decision (attempts.evidence_json), so ``milliwatt cache
        calibrate`` can judge candidates against the answer the step got: the best candidate of
        each kind, or when observing every candidate (the scorer being fitted may rank them
        otherwise than the gate in force)."""
        if not ranked:
            return None
        if self.observe:
            kept = ranked  # calibration data: a refitted scorer may rank them otherwise
        else:
            best: dict[bool, Candidate] = {}
            for c in ranked:
                best.setdefault(c.templated, c)
            kept = list(best.values())
        threshold = self.gate.threshold.score
        return {
            "gate": {"version": self.gate.version, "fitted_on": self.gate.fitted_on, "threshold": threshold, "observe": self.observe},
            "candidates": [c.to_json(served is c) for c in kept],
        }

    def _pass(self, reason: str, cpu_s: float, signal: float | None = None, evidence: dict[str, Any] | None = None) -> TierResult:
        return TierResult.passed(self.name, reason, energy=cpu_energy(cpu_s, self.coefficients), signal=signal, evidence=evidence)

    # ------------------------------------------------------------------ feedback

    def _remember_candidates(self, step: Step, ranked: list[Candidate]) -> None:
        self._pending[id(step)] = (step, ranked[:SEARCH_K])
        while len(self._pending) > PENDING_MAX:
            self._pending.popitem(last=False)

    def _learn(self, step: Step, answer: Message) -> None:
        """Judge the candidates the cache held back for ``step`` against the answer a later
        tier gave it, and count the verdict on each entry (vCache-style per-entry feedback)."""
        pending = self._pending.pop(id(step), None)
        if pending is None or pending[0] is not step:
            return
        for c in pending[1]:
            agrees = agreement(c.message, answer).agrees
            if agrees:
                c.entry.agree += 1
            else:
                c.entry.disagree += 1
            if c.serve:  # served (a shadow check) or would have been: its record as a hit
                c.entry.checks += 1
                c.entry.failed_checks += not agrees
            self.store.touch(c.entry)

    # ------------------------------------------------------------------ write-back

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        """Store a model tier's answer, exactly and (when it copies values from the context) as
        a template. Skipped: the cache's own answers, steps that may not be cached (see
        ``uncacheable_reason``), steps whose ``meta.extra["cache_ttl_s"]`` is 0, answers with
        neither content nor tool calls, refusals, and answers that call a tool not declared
        read-only. The candidates the cache held back for this step learn from the answer."""
        if answered_by == self.name or uncacheable_reason(step):
            return
        self._learn(step, message)
        ttl = _step_ttl(step, self.ttl_s)
        if ttl == 0:
            return
        answer = _clean_answer(message)
        if answer is None or self.read_only.first_unsafe(answer, step) is not None:
            return
        key = step_key(step)
        now = self._clock()
        expires = None if ttl is None else now + float(ttl)
        source = model or answered_by
        entries = [Entry(id=0, scope=key.scope, history=key.history, tail=key.tail, text=key.text, literals=key.literals,
                         message=answer, source=source, created_at=now, expires_at=expires)]  # fmt: skip
        # Parsing every tool result of a long conversation is CPU work: off the event loop.
        template, template_s = await asyncio.to_thread(_timed, make_template, step.messages, answer) if self.templates else (None, 0.0)
        if template is not None:
            where = situation(step, key.scope)
            entries.append(Entry(id=0, scope=where.scope, history="situation", tail=where.shape, text=where.text,
                                 literals=frozenset(), message=answer, source=source, created_at=now,
                                 expires_at=expires, template=template))  # fmt: skip
        vectors = await asyncio.gather(*(self.embedder.embed(e.text) for e in entries))
        _, add_s = await asyncio.to_thread(_timed, self._add, entries, [v for v, _ in vectors], now)
        # Writing back serves later steps, not this one: charged apart (milliwatt.overheads).
        cpu = template_s + sum(s for _, s in vectors) + add_s
        overheads.report(self.name, "write_back", cpu, f"{len(entries)} entries from {source}")

    def _add(self, entries: list[Entry], vectors: list[np.ndarray], now: float) -> None:
        # Each store write is all or nothing (store.py): if one fails, the store is as it
        # was before that write, and the error goes to the caller.
        for entry, vector in zip(entries, vectors, strict=True):
            self.store.add(entry, vector)
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            self.store.purge_expired(now)
        self.store.evict(self.max_entries, now)
        if self._autosave is not None:
            try:
                self._autosave.maybe_save()
            except Exception as e:  # noqa: BLE001 - the store is intact; the next write or close saves
                log.warning("cache autosave to %s failed: %s", self.path, e)

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        """Write the cache to ``path`` (blocking; a no-op for an in-memory cache). A shared
        cache commits what it queued and applies the other workers' writes."""
        if self.path is None:
            return
        self.store.purge_expired(self._clock())
        if self._folder_lock is None:  # shared: in the database already
            self.store.sync()
        else:
            persist.save(self.store, self.path, self.embedder.name)

    async def aclose(self) -> None:
        try:
            if self._folder_lock is not None:
                await asyncio.to_thread(self.save)
        finally:
            await asyncio.to_thread(self.store.close)  # shared: stops syncing, commits what is queued
            if self._folder_lock is not None:
                self._folder_lock.release()
            if self._owns_embedder:
                self.embedder.close()


def _step_ttl(step: Step, default: float | None) -> float | None:
    """The lifetime of the step's answer in the cache: ``meta.extra["cache_ttl_s"]`` (0: do not
    cache this step; None: no expiry), else the tier's default."""
    if "cache_ttl_s" not in step.meta.extra:
        return default
    ttl = step.meta.extra["cache_ttl_s"]
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or math.isnan(ttl) or ttl < 0:
        raise InvalidRequestError(
            "meta.extra.cache_ttl_s", f"must be a number of seconds >= 0 (0: do not cache this step) or null (no expiry), got {ttl!r}"
        )
    return float(ttl)


def _clean_answer(message: Message) -> Message | None:
    """The parts of an assistant message worth replaying; None when there is nothing to replay."""
    if message.get("refusal"):
        return None
    content = message.get("content")
    calls = [
        {"id": c.get("id", ""), "type": "function", "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
        for c in message.get("tool_calls") or []
    ]
    if not calls and (content is None or (isinstance(content, str) and not content.strip())):
        return None
    out: Message = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = calls
    return out


def _with_fresh_ids(message: Message) -> Message:
    """A copy of a stored answer whose tool calls get new ids (an id answers one call only)."""
    out = copy.deepcopy(message)  # the caller may mutate what it gets; the entry must not change
    for call in out.get("tool_calls") or []:
        call["id"] = f"call_{secrets.token_hex(12)}"
    return out


def _fmt(tokens: frozenset[str]) -> str:
    return ", ".join(sorted(tokens)) or "none"


def _literal_mismatch(entry: Entry, key: StepKey) -> str | None:
    """An exact entry answers only the same IDs and numbers (key.py, literals)."""
    if entry.literals == key.literals:
        return None
    return f"literal mismatch: {_fmt(key.literals - entry.literals)} (step) vs {_fmt(entry.literals - key.literals)} (entry)"


def _answer_key(message: Message) -> str:
    """What two answers share when they are the same answer (tool-call ids aside)."""
    calls = [[c["function"]["name"], c["function"].get("arguments")] for c in message.get("tool_calls") or []]
    return canonical_json([message.get("content"), calls])


@dataclass
class Candidate:
    """A stored answer that passed the exact guards for a step, with the gate's verdict."""

    entry: Entry
    message: Message  # the answer as it would be served (a template's, re-bound)
    features: dict[str, float]
    score: float
    serve: bool
    templated: bool

    def describe(self, gate: HitGate) -> str:
        kind = f"template {self.entry.id} ({len(self.entry.template.slots)} slots re-bound)" if self.entry.template else f"entry {self.entry.id}"
        threshold = gate.threshold.score
        if not self.templated and self.features.get("same_text"):
            verdict = "an exact repeat"
        elif self.templated and not gate.knows_templates:
            verdict = "the gate is not calibrated on templates"
        elif threshold is None:
            verdict = "the gate serves nothing"
        else:
            verdict = f"{'>=' if self.score >= threshold else '<'} {threshold:.3f}"
        return f"{kind}: gate score {self.score:.3f}, {verdict} (similarity {self.features['cosine']:.3f})"

    def to_json(self, served: bool) -> dict[str, Any]:
        return {
            "entry": self.entry.id,
            "templated": self.templated,
            "score": round(self.score, 6),
            "served": served,
            "features": {k: round(v, 6) for k, v in self.features.items()},
            "answer": self.message,
        }


def _timed(fn: Callable[..., _R], *args: Any) -> tuple[_R, float]:
    """``fn(*args)`` and the CPU seconds of this thread it took."""
    t0 = time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - t0
