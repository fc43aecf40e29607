"""The local and remote tiers: one ``ModelTier`` over a model backend, with or without a gate.

A gated tier (local) answers only when its gate accepts, and turns a backend failure
into a pass: a small model that cannot run a step is a reason to escalate, not a crash.
An ungated tier (remote) is the last resort: it always answers, and its typed
``RemoteError``s reach the caller. Either way the energy of the work is charged, also
on a pass, since an escalated local attempt still burned its CPU time.

Write-back: a gated (local) tier's answers are not written back to the cache by default.
The gate judges confidence, not correctness, and a cached answer is served again to every
similar step: an unverified small-model answer must not be multiplied. The ungated remote
tier's answers are. ``write_back`` overrides either (``local.write_back: true``).
"""

from __future__ import annotations

import asyncio
import random
import time

from .energy import CpuCoefficients, RemoteEnergyModel, cpu_energy
from .errors import BackendError
from .gates import Gate, GateDecision
from .local_features import FEATURES_VERSION, answer_features
from .redaction import redact
from .tier import Completion, ModelBackend, Tier, current_spend
from .types import Energy, Message, Step, TierResult


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
        write_back: bool | None = None,
        shadow_share: float = 0.0,
    ) -> None:
        """``energy_model``: the model whose energy estimate is charged when the backend
        reports no CPU time (default: the backend's ``energy_model`` or ``model``).
        ``pass_on_error``: turn a ``BackendError`` into a pass (default: when gated).
        ``write_back``: may this tier's answers be written back to earlier tiers (the
        cache)? Default: not when gated (local), yes when ungated (remote)."""
        self.name = name
        self.backend = backend
        self.gate = gate
        self.token_budget = token_budget
        self.energy_model = energy_model or getattr(backend, "energy_model", None) or backend.model
        self.remote_energy = remote_energy or RemoteEnergyModel()
        self.pass_on_error = gate is not None if pass_on_error is None else pass_on_error
        self.cpu = cpu or CpuCoefficients()
        self.write_back = gate is None if write_back is None else write_back
        if not 0 <= shadow_share <= 1:
            raise ValueError(f"shadow_share must be in [0, 1], got {shadow_share}")
        self.shadow_share = shadow_share
        self._draw = random.Random(0).random  # which answers get a shadow check: reproducible
        # Accepted answers awaiting their check, by the step they answered (kept, so its id stays its own).
        self._checking: dict[int, tuple[Step, Message]] = {}

    async def attempt(self, step: Step) -> TierResult:
        t0 = time.perf_counter()
        try:
            completion = await self.backend.complete(step, abort=getattr(self.gate, "hopeless", None))
        except BackendError as e:
            if not self.pass_on_error:
                raise
            return TierResult.passed(self.name, redact(f"{self.name} backend failed: {e}"), model=self.backend.model)
        except asyncio.CancelledError:
            # The backend may have said what CPU time the cut-off call used: charge it at
            # this tier's coefficients (the cascade records the cancelled attempt).
            spend = current_spend()
            if spend is not None and spend.energy is None and spend.cpu_seconds > 0:
                spend.energy = cpu_energy(spend.cpu_seconds, self.cpu)
            raise
        latency = time.perf_counter() - t0
        if completion.cpu_seconds is not None:
            energy = self._energy(completion, latency)
        else:  # an EcoLogits estimate for the measured latency: ~0.3 ms of CPU, off the loop
            energy = await asyncio.to_thread(self._energy, completion, latency)
        common = dict(
            energy=energy,
            model=completion.model,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=completion.cost_usd,
            label=completion.label,
            cacheable=self.write_back,
        )
        if self.gate is None:
            return TierResult(self.name, completion.message, f"{self.name} model answered", **common)
        # Judging reads the whole context (schemas, the values it holds): off the event loop.
        decision, features = await asyncio.to_thread(self._judge, step, completion)
        # Every gated answer is kept with what it looked like, accepted or not: a ledger of
        # them, judged against the next tier's answers, is what a gate is calibrated on.
        evidence = {"answer": completion.message, "features": features, "features_version": FEATURES_VERSION, **(decision.evidence or {})}
        if completion.extra.get("decoding"):  # a gate is calibrated for one way of decoding
            evidence["decoding"] = completion.extra["decoding"]
        if not decision.accept:
            return TierResult.passed(self.name, decision.reason, signal=decision.signal, evidence=evidence, **common)
        shadow = self.shadow_share > 0 and self._draw() < self.shadow_share
        if shadow:
            self._checking[id(step)] = (step, completion.message)
            while len(self._checking) > 1024:  # checks that failed never come back
                self._checking.pop(next(iter(self._checking)))
        return TierResult(
            self.name, completion.message, decision.reason, signal=decision.signal, evidence=evidence, shadow=shadow, **common
        )

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        """A later tier's answer to a step this tier was asked: the verdict of a shadow check
        when this tier's answer to it was being checked (the gate sees whether they agree)."""
        checked = self._checking.pop(id(step), None)
        if checked is None or checked[0] is not step:
            return
        from .quality import agreement

        observe = getattr(self.gate, "observe_check", None)
        if observe is not None:  # may compute a binomial bound (scipy): off the event loop
            await asyncio.to_thread(observe, agreement(checked[1], message).agrees)

    def _judge(self, step: Step, completion: Completion) -> tuple[GateDecision, dict[str, float]]:
        assert self.gate is not None
        decision = self.gate.check(step, completion)
        # A gate that scores the features (the calibrated one) hands them back: computed once.
        features = (decision.evidence or {}).get("features") or answer_features(step, completion)
        return decision, features

    def _energy(self, completion: Completion, latency_s: float) -> Energy:
        if completion.cpu_seconds is not None:
            return cpu_energy(completion.cpu_seconds, self.cpu)
        # A measured latency describes the model that answered; when the energy is charged
        # for another model (a stand-in's), EcoLogits' own latency model for it applies.
        measured = latency_s if self.energy_model == self.backend.model else None
        return self.remote_energy.estimate(self.energy_model, completion.input_tokens, completion.output_tokens, measured)

    async def aclose(self) -> None:
        await self.backend.aclose()
