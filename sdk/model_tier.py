"""The local and remote tiers: one ``ModelTier`` over a model backend, with or without a gate.

A gated tier (local) answers only when its gate accepts, and turns a backend failure
into a pass: a small model that cannot run a step is a reason to escalate, not a crash.
An ungated tier (remote) is the last resort: it always answers, and its typed
``RemoteError``s reach the caller. Either way the energy of the work is charged, also
on a pass, since an escalated local attempt still burned its CPU time.
"""

from __future__ import annotations

import time

from .energy import CpuCoefficients, RemoteEnergyModel, cpu_energy
from .errors import BackendError
from .gates import Gate
from .tier import Completion, ModelBackend, Tier
from .types import Energy, Step, TierResult


class ModelTier(Tier):
    def __init__(
        self,
        name: str,
        backend: ModelBackend,
        *,
        gate: Gate | None = None,
        token_budget: int | None = None,
        energy_model: str | None = None,
        remote_energy: RemoteEnergyModel | None = None,
        pass_on_error: bool | None = None,
        cpu: CpuCoefficients | None = None,
    ) -> None:
        """``energy_model``: the model whose energy estimate is charged when the backend
        reports no CPU time (default: the backend's ``energy_model`` or ``model``).
        ``pass_on_error``: turn a ``BackendError`` into a pass (default: when gated)."""
        self.name = name
        self.backend = backend
        self.gate = gate
        self.token_budget = token_budget
        self.energy_model = energy_model or getattr(backend, "energy_model", None) or backend.model
        self.remote_energy = remote_energy or RemoteEnergyModel()
        self.pass_on_error = gate is not None if pass_on_error is None else pass_on_error
        self.cpu = cpu or CpuCoefficients()

    async def attempt(self, step: Step) -> TierResult:
        t0 = time.perf_counter()
        try:
            completion = await self.backend.complete(step, abort=getattr(self.gate, "hopeless", None))
        except BackendError as e:
            if not self.pass_on_error:
                raise
            return TierResult.passed(self.name, f"{self.name} backend failed: {e}", model=self.backend.model)
        energy = self._energy(completion, time.perf_counter() - t0)
        common = dict(
            energy=energy,
            model=completion.model,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=completion.cost_usd,
            label=completion.label,
        )
        if self.gate is None:
            return TierResult(self.name, completion.message, f"{self.name} model answered", **common)
        decision = self.gate.check(step, completion)
        if not decision.accept:
            return TierResult.passed(self.name, decision.reason, signal=decision.signal, **common)
        return TierResult(self.name, completion.message, decision.reason, signal=decision.signal, **common)

    def _energy(self, completion: Completion, latency_s: float) -> Energy:
        if completion.cpu_seconds is not None:
            return cpu_energy(completion.cpu_seconds, self.cpu)
        # A measured latency describes the model that answered; when the energy is charged
        # for another model (a stand-in's), EcoLogits' own latency model for it applies.
        measured = latency_s if self.energy_model == self.backend.model else None
        return self.remote_energy.estimate(self.energy_model, completion.input_tokens, completion.output_tokens, measured)

    async def aclose(self) -> None:
        await self.backend.aclose()
