"""Tier factories by name: the one place where concrete parts are wired together.

A factory takes its tier's configuration section and the whole settings and returns a
``Tier``. Built-in tiers import their parts lazily, so naming a tier costs nothing until
a cascade is built. Third-party tiers register with ``register_tier`` or through the
``milliwatt.tiers`` entry-point group (a callable with the same signature).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ._extras import require
from .config import CacheSettings, LocalSettings, RemoteSettings, RulesSettings, Settings
from .energy import CpuCoefficients
from .errors import ConfigError
from .tier import ModelBackend, Tier

# A factory takes its section (a typed ``TierSettings`` for the built-in tiers, a dict for a
# plugin, which validates its own) and the whole settings.
TierFactory = Callable[[Any, Settings], Tier]

_FACTORIES: dict[str, TierFactory] = {}


def register_tier(name: str, factory: TierFactory) -> None:
    _FACTORIES[name] = factory


def build_tier(name: str, settings: Settings) -> Tier:
    factory = _FACTORIES.get(name) or _entry_point(name)
    if factory is None:
        known = sorted(set(_FACTORIES) | {ep.name for ep in entry_points(group="milliwatt.tiers")})
        raise ConfigError(f"tiers: {name}", f"no tier registered under this name (known: {', '.join(known)})")
    return factory(settings.section(name), settings)


def _entry_point(name: str) -> TierFactory | None:
    for ep in entry_points(group="milliwatt.tiers", name=name):
        return ep.load()
    return None


def cpu_coefficients(settings: Settings) -> CpuCoefficients:
    return CpuCoefficients.of(settings.energy.resolve())


# --------------------------------------------------------------------------- built-ins
# Each factory gets its tier's typed section (config.py has validated every key and value),
# so the tiers' constructors take plain arguments and validate nothing twice.


def _rules(section: RulesSettings, settings: Settings) -> Tier:
    from milliwatt.rules import RulesTier

    return RulesTier(section.packs, cpu=cpu_coefficients(settings), watch=section.reload, reload_interval_s=section.reload_interval_s)


def _cache(section: CacheSettings, settings: Settings) -> Tier:
    require("cache", "the cache tier")  # a missing extra is named at start, not at the first step
    from milliwatt.cache import CacheTier
    from milliwatt.cache.evidence import load_gate

    return CacheTier(
        **section.model_dump(exclude={"tier", "gate", "max_wrong"}),
        gate=load_gate(section.gate, section.max_wrong),
        tool_policy=settings.tool_cache_policy(),
        coefficients=cpu_coefficients(settings),
    )


def _local(section: LocalSettings, settings: Settings) -> Tier:
    require("local", "the local tier")
    if section.pregate is not False and not section.observe:
        require("cache", "the local tier's pre-gate (local.pregate)")  # it embeds steps with the cache's model
    from milliwatt.adapters.llama_cpp import LlamaCppBackend

    from .futility import FutilityGuard
    from .gates import ConfidenceGate, Gate, ObservingGate, SideEffectGate
    from .model_tier import ModelTier
    from .side_effects import ReadOnlyTools

    gate: Gate
    if section.gate is not None:
        from .local_gate import CalibratedGate, load_local_gate

        decoding = "copy" if section.copy_values else "free"
        gate = CalibratedGate(load_local_gate(section.gate, section.precision, decoding=decoding))  # a bad file stops the start-up
    else:
        gate = ConfidenceGate(section.quantile, section.threshold)
    if section.tool_calls == "read_only":
        gate = SideEffectGate(gate, ReadOnlyTools(settings.tool_cache_policy()))
    if section.observe:
        gate = ObservingGate(gate)
    tier: Tier = ModelTier(
        "local",
        LlamaCppBackend(**section.backend_settings(), meter=settings.energy.meter),
        gate=gate,
        token_budget=section.token_budget,
        cpu=cpu_coefficients(settings),
        write_back=section.write_back,
        shadow_share=0.0 if section.observe else section.shadow_share,
    )
    if section.observe:  # observing judges every step
        return tier
    if section.pregate is not False:
        from milliwatt.cache.embedder import Embedder

        from .pregate import PreGate

        embedder = Embedder()  # loaded on first use
        return PreGate(tier, embedder.embed, close=embedder.close, cpu=cpu_coefficients(settings), **section.pregate.model_dump())
    if section.futility is False:
        return tier
    return FutilityGuard(tier, **section.futility.model_dump())


def _remote(section: RemoteSettings, settings: Settings) -> Tier:
    require("remote", "the remote tier")
    from milliwatt.adapters.litellm_backend import LiteLLMBackend

    from .model_tier import ModelTier

    backend = LiteLLMBackend(**section.backend_settings(settings.frontier_model))
    # Missing credentials are named now (which variable to set), not retried at the first step.
    backend.check()
    check_energy_model(backend.energy_model or backend.model, "remote.energy_model", settings)
    from .energy import RemoteEnergyModel

    tier = ModelTier("remote", _in_production(backend, section, settings), token_budget=section.token_budget, remote_energy=RemoteEnergyModel(settings.energy.resolve()))
    if section.pin_steps:
        from .remote import PinnedTier

        return PinnedTier(tier, section.pin_steps, keep=section.pin_keep, max_sessions=section.pin_sessions)
    return tier


def _in_production(backend: ModelBackend, section: RemoteSettings, settings: Settings) -> ModelBackend:
    """The remote backend with its fallback models and per-tenant limit (``milliwatt.remote``),
    each fallback checked at start as the primary is, errors naming ``remote.fallbacks[i]``."""
    if section.fallbacks:
        from milliwatt.adapters.litellm_backend import LiteLLMBackend

        from .remote import FallbackBackend

        backends = [backend]
        for i, kw in enumerate(section.fallback_settings()):
            where = f"remote.fallbacks[{i}]"
            fallback = LiteLLMBackend(**kw)
            try:
                fallback.check()
            except ConfigError as e:
                raise ConfigError(e.where.replace("remote.", f"{where}.", 1), e.problem.replace("remote.", f"{where}.")) from None
            check_energy_model(fallback.energy_model or fallback.model, f"{where}.energy_model", settings)
            backends.append(fallback)
        backend = FallbackBackend(backends)
    if section.max_concurrency_per_tenant is not None:
        from .remote import TenantLimitedBackend

        backend = TenantLimitedBackend(backend, section.max_concurrency_per_tenant)
    return backend


def check_energy_model(model: str, where: str, settings: Settings | None = None) -> None:
    """Fail at start-up, naming the setting, when neither EcoLogits nor the coefficient table
    can estimate ``model``: a step answered and paid for must not then fail on its energy
    figure, nor be charged zero. Warms EcoLogits too."""
    from .energy import RemoteEnergyModel

    try:
        RemoteEnergyModel(settings.energy.resolve() if settings else None).check(model)
    except ValueError as e:
        raise ConfigError(where, str(e)) from None


register_tier("rules", _rules)
register_tier("cache", _cache)
register_tier("local", _local)
register_tier("remote", _remote)
