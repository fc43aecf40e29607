"""The rules tier: the cascade's first and cheapest rung.

Matching costs microseconds of pure Python, so ``attempt`` runs it inline on the event
loop: handing it to a thread would cost more than the match. Energy is the thread's CPU
time of the match, so concurrent steps do not charge each other.
"""

from __future__ import annotations

from milliwatt.energy import CpuCoefficients, CpuTimer, cpu_energy
from milliwatt.tier import Tier
from milliwatt.types import Step, TierResult

from .engine import RuleSet
from .loader import PathsLike, load_rules, path_list


class RulesTier(Tier):
    """Answers a step when a rule matches; passes (or routes) otherwise.

    Rules are replaced only whole: ``load``/``reload`` build the new RuleSet from every
    file first and swap it in with one assignment, so a step sees the old rules or the
    new ones, never a mix, and a file that fails validation leaves the old rules in force.
    """

    name = "rules"

    def __init__(self, packs: PathsLike = (), *, cpu: CpuCoefficients | None = None) -> None:
        """``packs``: rule files and folders of ``*.yaml``; none by default, so a rules tier
        answers nothing until a team gives it rules."""
        self._cpu = cpu or CpuCoefficients.of()
        self._packs: list[str] = []
        self._ruleset = RuleSet()
        self.load(packs)

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    @property
    def packs(self) -> tuple[str, ...]:
        """The rule files and folders the rules were loaded from (what ``reload`` reads)."""
        return tuple(self._packs)

    def load(self, packs: PathsLike) -> RuleSet:
        """Load these rule files and switch to them. Raises RuleFileError, keeping the old rules."""
        items = path_list(packs)
        ruleset = load_rules(items)
        self._ruleset, self._packs = ruleset, [str(p) for p in items]
        return ruleset

    def reload(self) -> RuleSet:
        """Re-read the same files (after an edit). Raises RuleFileError, keeping the old rules."""
        return self.load(self._packs)

    async def attempt(self, step: Step) -> TierResult:
        ruleset = self._ruleset  # one read: a concurrent reload cannot change rules mid-match
        with CpuTimer("thread").measure() as timer:
            evaluation = ruleset.evaluate(step)
        energy = cpu_energy(timer.seconds, self._cpu)
        m = evaluation.match
        if m is None:
            reason = "no rule matched"
            if evaluation.declined:
                reason += "; matched but declined: " + "; ".join(evaluation.declined)
            return TierResult.passed(self.name, reason, energy=energy)
        rule_name = m.rule.qualified_id
        model = f"rules:{rule_name}"
        if m.skip_to is not None:
            return TierResult.passed(self.name, f"rule {rule_name} routes to {m.skip_to}", energy=energy,
                                     signal=1.0, model=model, skip_to=m.skip_to, cacheable=False)
        # Not cacheable: a rule answers more cheaply than a cache lookup would.
        return TierResult(self.name, m.message, f"rule {rule_name} matched", energy, signal=1.0,
                          model=model, label=m.label, cacheable=False)
