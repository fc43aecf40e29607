"""The semantic cache tier: answer a step with a stored answer to a step close enough to it.

A hit needs, in order: the same scope (scope.py) and tail (key.py), exactly; a cosine
similarity of the semantic texts at or above ``threshold``; an unexpired entry; the same
digit-bearing literals; and every context literal the stored answer used present in the
new step. Anything less is a pass with the reason, so the ledger says why the cache missed.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from milliwatt.energy import CpuCoefficients, CpuTimer, cpu_energy
from milliwatt.errors import ConfigError
from milliwatt.tier import Tier
from milliwatt.types import Message, Step, TierResult

from . import persist
from .embedder import Embedder
from .key import EMPTY_TAIL, StepKey, grounded_literals, step_key
from .scope import uncacheable_reason
from .store import Entry, Store

# Cosine similarity of all-MiniLM-L6-v2 embeddings needed for a hit. GPTCache's default
# (0.8) lets 5.6-9.2% wrong hits through in its own benchmark, and vCache shows that one
# static threshold cannot bound errors; so the default is strict (a miss costs a model
# call, a wrong hit costs a wrong step) and the exact guards carry what cosine cannot.
DEFAULT_THRESHOLD = 0.92
DEFAULT_TTL_S = 24 * 3600.0  # answers about bookings, stock or status go stale
DEFAULT_MAX_ENTRIES = 50_000  # ~75 MB of vectors
SEARCH_K = 8  # candidates checked against the exact guards, best first
PURGE_EVERY_S = 60.0
_SETTINGS = {"path", "threshold", "ttl_s", "max_entries", "token_budget", "cpu"}


class CacheTier(Tier):
    name = "cache"
    # No trimming by default: the key reads only the last user message and what follows it
    # (key.py), so a budget could only cut the user message away from a long agent prompt.
    token_budget: int | None = None

    def __init__(
        self,
        *,
        path: str | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        ttl_s: float | None = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        token_budget: int | None = None,
        embedder: Embedder | None = None,
        coefficients: CpuCoefficients = CpuCoefficients(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ConfigError("cache.threshold", f"must be in (0, 1], got {threshold}")
        if ttl_s is not None and not ttl_s > 0:
            raise ConfigError("cache.ttl_s", f"must be > 0 seconds or null (no expiry), got {ttl_s}")
        if max_entries < 1:
            raise ConfigError("cache.max_entries", f"must be >= 1, got {max_entries}")
        self.path = path
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.token_budget = token_budget
        self.coefficients = coefficients
        self.embedder = embedder or Embedder()
        self._owns_embedder = embedder is None
        self._clock = clock
        self._last_purge = clock()
        self.store = Store()
        if path is not None:
            # Loaded now, so a corrupt folder fails at start-up, naming the file.
            persist.load(self.store, path, self.embedder.name)
            self.store.purge_expired(clock())

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> CacheTier:
        """Build from the ``cache`` section of the configuration (unknown keys are an error)."""
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise ConfigError(f"cache.{unknown[0]}", f"unknown setting (known: {', '.join(sorted(_SETTINGS))})")
        kw: dict[str, Any] = {}
        cpu = CpuCoefficients.from_setting(settings.get("cpu"), "cache.cpu")
        if cpu is not None:
            kw["coefficients"] = cpu
        if settings.get("path") is not None:
            kw["path"] = str(settings["path"])
        for key, kind in (("threshold", float), ("ttl_s", float), ("max_entries", int), ("token_budget", int)):
            if key not in settings:
                continue
            value = settings[key]
            if value is None and key in ("ttl_s", "token_budget"):
                kw[key] = None
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value)):
                kw[key] = kind(value)
            else:
                raise ConfigError(f"cache.{key}", f"must be a {'number' if kind is float else 'whole number'}, got {value!r}")
        return cls(**kw)

    # ------------------------------------------------------------------ lookup

    async def attempt(self, step: Step) -> TierResult:
        timer = CpuTimer("thread")
        with timer.measure():
            why_not = uncacheable_reason(step)
            key = None if why_not else step_key(step)
        if key is None:
            return self._pass(f"not cacheable: {why_not}", timer.seconds)
        if not self.store.has_partition(key.partition):
            where = f"scope {key.scope[:6]}"
            other_tail = key.tail != EMPTY_TAIL and self.store.has_scope(key.scope)
            reason = f"no entry with these tool calls and outputs in {where}" if other_tail else f"no entry in {where}"
            return self._pass(reason, timer.seconds)

        vector, embed_cpu = await self.embedder.embed(key.text)
        candidates, search_cpu = await asyncio.to_thread(self._search, key, vector)
        cpu = timer.seconds + embed_cpu + search_cpu

        now = self._clock()
        rejection: str | None = None
        for entry, sim in candidates:
            if sim < self.threshold:
                break
            why = self._guard(entry, key, now)
            if why is None:
                entry.hits += 1
                return TierResult(
                    self.name,
                    _with_fresh_ids(entry.message),
                    f"similarity {sim:.3f} >= {self.threshold:.3f} in scope {key.scope[:6]}",
                    cpu_energy(cpu, self.coefficients),
                    signal=sim,
                    model=f"cache:{entry.source}",
                    cacheable=False,
                )
            rejection = rejection or f"{why} (similarity {sim:.3f})"
        if rejection is None:
            best = candidates[0][1] if candidates else 0.0
            rejection = f"best similarity {best:.3f} < {self.threshold:.3f}"
        best_sim = candidates[0][1] if candidates else None
        return self._pass(rejection, cpu, signal=best_sim)

    def _search(self, key: StepKey, vector: np.ndarray) -> tuple[list[tuple[Entry, float]], float]:
        timer = CpuTimer("thread")
        with timer.measure():
            found = self.store.search(key.partition, vector, SEARCH_K)
        return found, timer.seconds

    @staticmethod
    def _guard(entry: Entry, key: StepKey, now: float) -> str | None:
        """Why a close-enough entry must still not answer; None if it may."""
        if entry.expired(now):
            return "expired"
        if entry.literals != key.literals:
            return f"literal mismatch: {_fmt(key.literals - entry.literals)} (step) vs {_fmt(entry.literals - key.literals)} (entry)"
        missing = entry.grounded - key.context_literals
        if missing:
            return f"answer uses {_fmt(missing)}, absent from this step"
        return None

    def _pass(self, reason: str, cpu_s: float, signal: float | None = None) -> TierResult:
        return TierResult.passed(self.name, reason, energy=cpu_energy(cpu_s, self.coefficients), signal=signal)

    # ------------------------------------------------------------------ write-back

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        """Store a model tier's answer. Skipped: the cache's own answers, steps that may not
        be cached (see ``uncacheable_reason``), answers with neither content nor tool calls,
        refusals, and steps whose ``meta.extra["cache_ttl_s"]`` is 0."""
        if answered_by == self.name or uncacheable_reason(step):
            return
        ttl = step.meta.extra.get("cache_ttl_s", self.ttl_s)
        if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
            return
        answer = _clean_answer(message)
        if answer is None:
            return
        key = step_key(step)
        vector, _ = await self.embedder.embed(key.text)
        now = self._clock()
        entry = Entry(
            id=0,
            scope=key.scope,
            tail=key.tail,
            text=key.text,
            literals=key.literals,
            grounded=grounded_literals(answer, key),
            message=answer,
            source=model or answered_by,
            created_at=now,
            expires_at=None if ttl is None else now + float(ttl),
        )
        await asyncio.to_thread(self._add, entry, vector, now)

    def _add(self, entry: Entry, vector: np.ndarray, now: float) -> None:
        self.store.add(entry, vector)
        if now - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = now
            self.store.purge_expired(now)
        self.store.evict(self.max_entries, now)

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        """Write the cache to ``path`` (blocking; a no-op for an in-memory cache)."""
        if self.path is None:
            return
        self.store.purge_expired(self._clock())
        persist.save(self.store, self.path, self.embedder.name)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.save)
        if self._owns_embedder:
            self.embedder.close()


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
