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

from .config import Settings
from .energy import CpuCoefficients
from .errors import ConfigError
from .tier import Tier

TierFactory = Callable[[dict[str, Any], Settings], Tier]

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
    e = settings.energy
    return CpuCoefficients(e.cpu_watts_low, e.cpu_watts_point, e.cpu_watts_high)


# --------------------------------------------------------------------------- built-ins


def _rules(section: dict[str, Any], settings: Settings) -> Tier:
    from milliwatt.rules import RulesTier

    return RulesTier.from_settings({"cpu": cpu_coefficients(settings), **section})


def _cache(section: dict[str, Any], settings: Settings) -> Tier:
    from milliwatt.cache import CacheTier

    return CacheTier.from_settings({"cpu": cpu_coefficients(settings), **section})


def _local(section: dict[str, Any], settings: Settings) -> Tier:
    from milliwatt.adapters.llama_cpp import LlamaCppBackend

    from .futility import FutilityGuard
    from .gates import ConfidenceGate
    from .model_tier import ModelTier

    section = dict(section)
    # Keys of the tier, its gate and its guard; the rest configure the backend, which
    # rejects unknown ones. ``futility: false`` turns the guard off.
    budget = section.pop("token_budget", 2048)
    gate_keys = {k: section.pop(k) for k in ("quantile", "threshold") if k in section}
    futility = section.pop("futility", {})
    try:
        gate = ConfidenceGate(**gate_keys)
    except (TypeError, ValueError) as e:
        raise ConfigError("local.quantile/threshold", str(e)) from None
    tier: Tier = ModelTier(
        "local",
        LlamaCppBackend.from_settings(section),
        gate=gate,
        token_budget=budget,
        cpu=cpu_coefficients(settings),
    )
    if futility is False:
        return tier
    if not isinstance(futility, dict):
        raise ConfigError("local.futility", "must be false or a mapping of window, min_answer_rate, probe_every")
    try:
        return FutilityGuard(tier, **futility)
    except (TypeError, ValueError) as e:
        raise ConfigError("local.futility", str(e)) from None


def _remote(section: dict[str, Any], settings: Settings) -> Tier:
    from milliwatt.adapters.litellm_backend import LiteLLMBackend

    from .model_tier import ModelTier

    section = {"model": settings.frontier_model, **section}
    budget = section.pop("token_budget", None)
    backend = LiteLLMBackend.from_settings(section)
    check_energy_model(backend.energy_model or backend.model, "remote.energy_model")
    return ModelTier("remote", backend, token_budget=budget)


def check_energy_model(model: str, where: str) -> None:
    """Fail at start-up, naming the setting, when EcoLogits cannot estimate ``model``: a step
    answered and paid for must not then fail on its energy figure. Warms EcoLogits too."""
    from .energy import RemoteEnergyModel

    try:
        RemoteEnergyModel().estimate(model, 1, 1)
    except ValueError as e:
        raise ConfigError(where, f"{e}; set {where} to a model EcoLogits knows") from None


register_tier("rules", _rules)
register_tier("cache", _cache)
register_tier("local", _local)
register_tier("remote", _remote)
