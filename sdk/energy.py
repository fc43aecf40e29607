"""How energy is counted. Every figure carries its method, its coefficients and a range.

Figures are computed from what was observed (``milliwatt.types.Observed``) and a coefficient
set (``milliwatt.coefficients``, a versioned data file), by the functions of this module
only, so a live step and a recomputed ledger get the same figure from the same observation.

* CPU work (rules, cache, local model on CPU): CPU seconds x watts per vCPU x the facility
  factors (server overhead, the site's PUE).
* A hardware counter (RAPL, NVML; ``milliwatt.meters``): its joules x the facility factors,
  within the counter's stated error.
* Remote calls: the EcoLogits method for the output tokens (from the model's active
  parameters, GPU count, server overhead and the provider's PUE), plus the input-token term
  EcoLogits lacks (its issue #183): prefill costs 2 x active parameters FLOPs per input
  token, at an H100's energy per FLOP over a range of utilisations, x the same facility
  factors; tokens a provider's prompt cache serves are charged at a lower weight.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from . import coefficients as _coefficients
from .coefficients import Coefficients, ModelEntry
from .types import Energy, Observed

WH_PER_J = 1 / 3600.0


@dataclass(frozen=True)
class CpuCoefficients:
    """Watts drawn per busy vCPU (low / point / high) and the facility factor on them.

    ``CpuCoefficients.of(coefficients)`` takes them from a coefficient set; a tier's ``cpu``
    setting may override the watts (a local model on another machine)."""

    low_w: float = 1.5
    point_w: float = 2.5
    high_w: float = 4.0
    facility: float = 1.0  # server overhead x site PUE
    version: str | None = None

    @classmethod
    def of(cls, c: Coefficients | None = None) -> CpuCoefficients:
        c = c or _coefficients.current()
        w = c.cpu.watts_per_vcpu
        return cls(w.low, w.point, w.high, c.own_facility, c.version)

    @property
    def basis(self) -> str:
        basis = f"cpu-time x {self.low_w}/{self.point_w}/{self.high_w} W per vCPU"
        if self.facility != 1.0:
            basis += f" x facility {self.facility:g}"
        return f"{basis} {self.version}" if self.version else basis

    @classmethod
    def from_setting(cls, value: object, where: str) -> CpuCoefficients | None:
        """A tier's ``cpu`` setting: coefficients, a mapping of low_w/point_w/high_w, or None."""
        from .errors import ConfigError

        if value is None or isinstance(value, CpuCoefficients):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(**{**cls.of().__dict__, **value})
            except TypeError as e:
                raise ConfigError(where, f"{e} (known: low_w, point_w, high_w)") from None
        raise ConfigError(where, f"must be a mapping of low_w, point_w, high_w, got {type(value).__name__}")


def cpu_energy(cpu_seconds: float, coeff: CpuCoefficients | None = None) -> Energy:
    coeff = coeff or CpuCoefficients.of()
    s = max(cpu_seconds, 0.0)
    k = s * coeff.facility * WH_PER_J
    return Energy(
        "cpu-time", k * coeff.low_w, k * coeff.point_w, k * coeff.high_w, coeff.basis, Observed(cpu_seconds=s), coeff.version
    )


def measured_energy(joules: float, meter: str, c: Coefficients | None = None, *, cpu_seconds: float | None = None) -> Energy:
    """A hardware counter's reading: its joules x the facility factors, within its error."""
    c = c or _coefficients.current()
    wh = max(joules, 0.0) * c.own_facility * WH_PER_J
    err = c.measured.counter_error.value
    basis = f"{meter} counter x facility {c.own_facility:g} +-{err:.0%} {c.version}"
    observed = Observed(cpu_seconds=cpu_seconds, joules=max(joules, 0.0), meter=meter)
    return Energy("measured", wh * max(1 - err, 0.0), wh, wh * (1 + err), basis, observed, c.version)


@dataclass
class CpuTimer:
    """CPU seconds of a block of work: the thread's own time, or the process's.

    Native libraries (llama.cpp, torch) spread one call over several threads, so their
    work is measured with process CPU time under the lock that serialises them; pure
    Python work (rules) is measured with the thread's CPU time so concurrent steps do
    not charge each other.
    """

    scope: str = "thread"
    seconds: float = 0.0

    @contextmanager
    def measure(self) -> Iterator[CpuTimer]:
        clock = time.thread_time if self.scope == "thread" else time.process_time
        t0 = clock()
        try:
            yield self
        finally:
            self.seconds += clock() - t0


# --------------------------------------------------------------------------- remote


# litellm-style model ids -> EcoLogits provider names.
_PROVIDER_PREFIXES = {
    "openai": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "gemini": "google_genai",
    "vertex_ai": "google_genai",
    "mistral": "mistralai",
    "cohere": "cohere",
    "groq": "huggingface_hub",
}


def ecologits_model(model: str) -> tuple[str, str]:
    """Map a litellm model id ("openai/gpt-4o", "gpt-4o", "claude-3-5-sonnet") to EcoLogits'."""
    if "/" in model:
        prefix, name = model.split("/", 1)
        return _PROVIDER_PREFIXES.get(prefix, prefix), name
    if model.startswith(("gpt-", "o1", "o3", "o4", "chatgpt")):
        return "openai", model
    if model.startswith("claude"):
        return "anthropic", model
    if model.startswith("gemini"):
        return "google_genai", model
    if model.startswith(("mistral", "codestral", "open-mistral")):
        return "mistralai", model
    return "openai", model


class RemoteEnergyModel:
    """Estimates a remote call's energy: EcoLogits for output tokens + a prefill term.

    ``coefficients``: the set to use (default: the shipped current one). A model EcoLogits
    does not list is estimated from the set's ``models`` table; one in neither is refused
    (``check``, called at start-up), never charged zero.
    """

    def __init__(self, coefficients: Coefficients | None = None) -> None:
        self.coefficients = coefficients or _coefficients.current()

    @property
    def version(self) -> str:
        return self.coefficients.version

    def check(self, model: str) -> None:
        """Raise ``ValueError`` naming the model when it cannot be estimated."""
        self.estimate(model, 1, 1)

    def estimate(
        self, model: str, input_tokens: int, output_tokens: int, latency_s: float | None = None, *, cached_tokens: int | None = None
    ) -> Energy:
        """``latency_s`` is used only where the coefficient set says so (``remote.latency``);
        ``cached_tokens`` of the ``input_tokens`` came from the provider's prompt cache (None:
        not known, charged as 0 and recorded as unknown, so the accountant may estimate it)."""
        known_cached = cached_tokens
        cached_tokens = cached_tokens or 0
        for name, n in (("input_tokens", input_tokens), ("output_tokens", output_tokens), ("cached_tokens", cached_tokens)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{name} must be a count >= 0, got {n!r} (model {model})")
        if cached_tokens > input_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) exceeds input_tokens ({input_tokens}) (model {model})")
        c = self.coefficients
        provider, name = ecologits_model(model)
        latency = latency_s if c.remote.latency.use_measured else None
        entry = c.models.get(model) or c.models.get(name)
        out_lo, out_hi, active_lo, active_hi, pue = _ecologits_output(provider, name, max(output_tokens, 1), latency, entry)
        if output_tokens <= 0:
            out_lo = out_hi = 0.0
        u = c.remote.utilisation
        watts, peak = c.remote.gpu_watts.value, c.remote.gpu_peak_flops.value
        pue = pue or c.facility.default_provider_pue.value
        overhead = c.facility.server_overhead.value
        w = c.prompt_cache.energy_weight
        fresh = input_tokens - cached_tokens

        def prefill_wh(active_b: float, utilisation: float, weight: float) -> float:
            tokens = fresh + cached_tokens * weight
            return tokens * 2 * active_b * 1e9 * watts / (peak * utilisation) * overhead * pue * WH_PER_J

        in_lo = prefill_wh(active_lo, u.high, w.low)
        in_pt = prefill_wh((active_lo + active_hi) / 2, u.point, w.point)
        in_hi = prefill_wh(active_hi, u.low, w.high)
        source = "table" if entry is not None else "ecologits"
        basis = f"{source} {provider}/{name} output + prefill {c.version}"
        observed = Observed(model=model, cached_tokens=known_cached)
        return Energy("estimate", out_lo + in_lo, (out_lo + out_hi) / 2 + in_pt, out_hi + in_hi, basis, observed, c.version)


@functools.lru_cache(maxsize=4096)
def _ecologits_output(
    provider: str, name: str, output_tokens: int, latency_s: float | None, entry: ModelEntry | None = None
) -> tuple[float, float, float, float, float | None]:
    """(energy low Wh, high Wh, active params low B, high B, PUE point) from EcoLogits: its
    model repository, or the parameters of a table ``entry`` for a model it does not list.

    Imported lazily: EcoLogits loads its model table on first use.
    """
    import logging

    from ecologits.model_repository import ParametersMoE, models
    from ecologits.tracers.utils import PROVIDER_CONFIG_MAP, llm_impacts

    # EcoLogits warns once per model about its precision; docs/method says it, the log need not.
    logging.getLogger("ecologits").setLevel(logging.ERROR)
    # With no measured latency, EcoLogits' own latency model (tps/ttft of the deployment) applies.
    latency = latency_s if latency_s is not None else 1e9
    if entry is not None:
        return _table_output(entry, output_tokens, latency)
    m = models.find_model(provider=provider, model_name=name)
    if m is None:
        raise ValueError(
            f"EcoLogits has no model {provider}/{name}, nor does the coefficient table (energy.models): "
            f"configure a frontier model it knows (e.g. openai/gpt-4o), or add this one's parameters to "
            f"energy.models so the estimate has a basis"
        )
    impacts = llm_impacts(provider, name, output_tokens, latency)
    if impacts.energy is None:
        raise ValueError(f"EcoLogits gave no energy for {provider}/{name}: {impacts.errors}")
    lo, hi = _range(impacts.energy.value)
    params = m.architecture.parameters
    active = params.active if isinstance(params, ParametersMoE) else params
    a_lo, a_hi = _range(active)
    pue_lo, pue_hi = _range(PROVIDER_CONFIG_MAP[provider].datacenter_pue)
    # EcoLogits reports kWh.
    return lo * 1000, hi * 1000, a_lo, a_hi, (pue_lo + pue_hi) / 2


def _table_output(entry: ModelEntry, output_tokens: int, latency_s: float) -> tuple[float, float, float, float, float | None]:
    """EcoLogits' computation (``compute_llm_impacts``) for parameters from the table."""
    from ecologits.electricity_mix_repository import electricity_mixes
    from ecologits.impacts.llm import compute_llm_impacts
    from ecologits.utils.range_value import RangeValue

    a_lo, a_hi = entry.active_params_b
    t_lo, t_hi = entry.total_params_b or entry.active_params_b
    mix = electricity_mixes.find_electricity_mix(zone="WOR")
    pue = entry.pue or 1.2
    impacts = compute_llm_impacts(
        model_active_parameter_count=RangeValue(min=a_lo, max=a_hi) if a_lo < a_hi else a_lo,
        model_total_parameter_count=RangeValue(min=t_lo, max=t_hi) if t_lo < t_hi else t_lo,
        output_token_count=output_tokens,
        if_electricity_mix_adpe=mix.adpe,
        if_electricity_mix_pe=mix.pe,
        if_electricity_mix_gwp=mix.gwp,
        if_electricity_mix_wue=mix.wue,
        datacenter_pue=pue,
        datacenter_wue=0.0,
        request_latency=latency_s,
    )
    lo, hi = _range(impacts.energy.value)
    return lo * 1000, hi * 1000, a_lo, a_hi, entry.pue


def _range(v: object) -> tuple[float, float]:
    if hasattr(v, "min") and hasattr(v, "max"):
        return float(v.min), float(v.max)  # type: ignore[attr-defined]
    return float(v), float(v)  # type: ignore[arg-type]
