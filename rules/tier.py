"""The rules tier: the cascade's first and cheapest rung.

Matching costs microseconds of pure Python, so ``attempt`` runs it inline on the event
loop: handing it to a thread would cost more than the match. Energy is the thread's CPU
time of the match, so concurrent steps do not charge each other.

Hot reload (``watch``): at most every ``reload_interval_s``, a step stats the rule files
(inline: a few ``stat`` calls); when one changed, or files came or went in a pack folder,
the packs are loaded again in a thread, one reload at a time, and swapped in with one
assignment. The step that noticed, and every step in flight, finish on the rules they
started with. A broken edit is logged (``file:line:column: problem``), kept in
``reload_error``, and the last good rules stay in force until the files change again.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from milliwatt.energy import CpuCoefficients, CpuTimer, cpu_energy
from milliwatt.errors import RuleFileError
from milliwatt.redaction import get_logger
from milliwatt.tier import Tier
from milliwatt.types import Step, TierResult

from .engine import RuleSet
from .loader import PathsLike, _is_pack_file, load_rules, path_list

log = get_logger()

Signature = tuple[tuple[str, int, int, int], ...]  # (path, mtime_ns, size, inode) of each file


class RulesTier(Tier):
    """Answers a step when a rule matches; passes (or routes, forbids, budgets) otherwise.

    Rules are replaced only whole: ``load``/``reload`` (and the hot reload of ``watch``) build
    the new RuleSet from every file first and swap it in with one assignment, so a step sees
    the old rules or the new ones, never a mix, and a file that fails validation leaves the
    old rules in force.
    """

    name = "rules"

    def __init__(
        self,
        packs: PathsLike = (),
        *,
        cpu: CpuCoefficients | None = None,
        watch: bool = False,
        reload_interval_s: float = 1.0,
    ) -> None:
        """``packs``: rule files and folders of ``*.yaml``; none by default, so a rules tier
        answers nothing until a team gives it rules. ``watch``: reload them when they change
        (checked at most every ``reload_interval_s`` seconds, by the steps themselves)."""
        if reload_interval_s <= 0:
            raise ValueError(f"reload_interval_s must be positive, got {reload_interval_s}")
        self._cpu = cpu or CpuCoefficients.of()
        self._packs: list[str] = []
        self._ruleset = RuleSet()
        self.watch = watch
        self.reload_interval_s = reload_interval_s
        self.reload_error: RuleFileError | None = None  # the last hot reload's problem, until one succeeds
        self._signature: Signature = ()
        self._checked_at = time.monotonic()
        self._reloading: asyncio.Task[bool] | None = None
        self._generation = 0  # bumped by every load, so a slower hot reload never undoes a newer load
        self.load(packs)

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    @property
    def version(self) -> str:
        """The loaded packs' version (``RuleSet.version``), as the ledger records it."""
        return self._ruleset.version

    @property
    def packs(self) -> tuple[str, ...]:
        """The rule files and folders the rules were loaded from (what ``reload`` reads)."""
        return tuple(self._packs)

    def load(self, packs: PathsLike) -> RuleSet:
        """Load these rule files and switch to them. Raises RuleFileError, keeping the old rules."""
        items = [str(p) for p in path_list(packs)]
        signature = _signature(items)
        ruleset = load_rules(items)
        self._generation += 1
        self._ruleset, self._packs, self._signature = ruleset, items, signature
        self.reload_error = None
        return ruleset

    def reload(self) -> RuleSet:
        """Re-read the same files (after an edit). Raises RuleFileError, keeping the old rules."""
        return self.load(self._packs)

    # ----------------------------------------------------------------- hot reload

    async def refresh(self) -> bool:
        """Reload now if a rule file changed (whatever the interval); True if new rules are in
        force. A broken edit is logged and kept in ``reload_error``; it returns False."""
        if self._reloading is not None:
            await asyncio.shield(self._reloading)
        signature = _signature(self._packs)
        if signature == self._signature:
            return False
        self._reloading = asyncio.ensure_future(self._reload_changed(signature))
        return await asyncio.shield(self._reloading)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.reload_interval_s or self._reloading is not None:
            return
        self._checked_at = now
        try:
            signature = _signature(self._packs)
        except OSError:  # pragma: no cover - _signature records what it cannot stat
            return
        if signature != self._signature:
            self._reloading = asyncio.ensure_future(self._reload_changed(signature))

    async def _reload_changed(self, signature: Signature) -> bool:
        generation = self._generation
        try:
            ruleset = await asyncio.to_thread(load_rules, self._packs)
        except RuleFileError as e:
            self._signature = signature  # not retried until the files change again
            self.reload_error = e
            log.warning("rules not reloaded, the last good rules (version %s) stay in force: %s", self._ruleset.version, e)
            return False
        except Exception as e:  # noqa: BLE001 - a reload is never worth the tier
            self._signature = signature
            self.reload_error = RuleFileError(", ".join(self._packs), None, f"cannot reload: {type(e).__name__}: {e}")
            log.warning("rules not reloaded: %s", self.reload_error)
            return False
        finally:
            self._reloading = None
        if generation != self._generation:  # a load() came first: it is newer
            return False
        self._ruleset, self._signature, self.reload_error = ruleset, signature, None
        self._generation += 1
        log.info("rules reloaded: version %s, %d rules", ruleset.version, len(ruleset))
        return True

    # ----------------------------------------------------------------- a step

    async def attempt(self, step: Step) -> TierResult:
        if self.watch:
            self._maybe_reload()
        ruleset = self._ruleset  # one read: a concurrent reload cannot change rules mid-match
        with CpuTimer("thread").measure() as timer:
            evaluation = ruleset.evaluate(step)
        energy = cpu_energy(timer.seconds, self._cpu)
        m = evaluation.match
        evidence = {"rule": m.rule.qualified_id if m is not None else None, "pack_version": ruleset.version}
        if m is None:
            reason = "no rule matched"
            if evaluation.declined:
                reason += "; matched but declined: " + "; ".join(evaluation.declined)
            return TierResult.passed(self.name, reason, energy=energy, evidence=evidence)
        rule_name = m.rule.qualified_id
        model = f"rules:{rule_name}"
        if m.message is None:  # a decision for the later tiers: route, forbid, budget
            forbid = {t: f"forbidden by rule {rule_name}" for t in sorted(m.forbid)}
            if m.token_budget is not None:
                reason = f"rule {rule_name} sets the step's budget to {m.token_budget} input tokens"
            elif m.skip_to is not None and forbid:
                reason = f"rule {rule_name} routes to {m.skip_to} and forbids {', '.join(forbid)}"
            elif m.skip_to is not None:
                reason = f"rule {rule_name} routes to {m.skip_to}"
            else:
                reason = f"rule {rule_name} forbids {', '.join(forbid)}"
            return TierResult.passed(self.name, reason, energy=energy, signal=1.0, model=model, skip_to=m.skip_to,
                                     forbid=forbid, token_budget=m.token_budget, cacheable=False, evidence=evidence)
        # Not cacheable: a rule answers more cheaply than a cache lookup would.
        return TierResult(self.name, m.message, f"rule {rule_name} matched", energy, signal=1.0,
                          model=model, label=m.label, cacheable=False, evidence=evidence)


def _signature(packs: list[str]) -> Signature:
    """What identifies the rule files' contents cheaply: each file's mtime, size and inode
    (a folder's ``*.yaml`` listed afresh, so a new or removed file counts)."""
    out: list[tuple[str, int, int, int]] = []
    for item in packs:
        p = Path(item)
        try:
            if p.is_dir():
                files = sorted(str(x) for x in p.iterdir() if _is_pack_file(x))
            else:
                files = [item]
        except OSError:
            files = [item]
        for f in files:
            try:
                st = os.stat(f)
                out.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((f, -1, -1, -1))  # missing: a change from present
    return tuple(out)
