"""How energy is counted. Every figure carries its method, its coefficients and a range.

* CPU work (rules, cache, local model on CPU): CPU seconds of the work x watts per vCPU.
  These machines have no RAPL counter, so this is an estimate from measured CPU time.
* Remote calls: the EcoLogits method (energy of the output tokens from the model's active
  parameters, GPU count, server overhead and the provider's PUE), plus an input-token
  term EcoLogits lacks: prefill costs 2 x active parameters FLOPs per input token, at an
  H100's energy per FLOP and a range of utilisations. Agent contexts are long, so this
  term is not left out. Coefficients are versioned (``REMOTE_COEFFICIENTS_VERSION``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from .types import Energy

WH_PER_J = 1 / 3600.0


@dataclass(frozen=True)
class CpuCoefficients:
    """Watts drawn per busy vCPU. Low: Cloud Carbon Footprint's figure for recent EPYCs;
    high: CodeCarbon's per-thread default."""

    low_w: float = 1.5
    point_w: float = 2.5
    high_w: float = 4.0

    @property
    def basis(self) -> str:
        return f"cpu-time x {self.low_w}/{self.point_w}/{self.high_w} W per vCPU"

    @classmethod
    def from_setting(cls, value: object, where: str) -> CpuCoefficients | None:
        """A tier's ``cpu`` setting: coefficients, a mapping of low_w/point_w/high_w, or None."""
        from .errors import ConfigError

        if value is None or isinstance(value, CpuCoefficients):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(**value)
            except TypeError as e:
                raise ConfigError(where, f"{e} (known: low_w, point_w, high_w)") from None
        raise ConfigError(where, f"must be a mapping of low_w, point_w, high_w, got {type(value).__name__}")


def cpu_energy(cpu_seconds: float, coeff: CpuCoefficients = CpuCoefficients()) -> Energy:
    s = max(cpu_seconds, 0.0)
    return Energy(
        "cpu-time",
        s * coeff.low_w * WH_PER_J,
        s * coeff.point_w * WH_PER_J,
        s * coeff.high_w * WH_PER_J,
        coeff.basis,
    )


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

REMOTE_COEFFICIENTS_VERSION = "mw-remote-2026.11"


@dataclass(frozen=True)
class RemoteCoefficients:
    """The input-token (prefill) term added to EcoLogits' output-token estimate.

    Energy per input token = 2 x active params x (GPU watts / (peak FLOP/s x utilisation))
    x server overhead x PUE. Low end: the fewest active parameters EcoLogits lists for the
    model at high utilisation; high end: the most at low utilisation.
    """

    gpu_watts: float = 700.0  # H100 SXM board power
    gpu_peak_flops: float = 989e12  # H100 SXM dense BF16
    # Prefill is compute-bound, so it runs near peak; 0.3-0.7 spans published MFU figures.
    utilisation_low: float = 0.3
    utilisation_point: float = 0.5
    utilisation_high: float = 0.7
    server_overhead: float = 1.3  # CPUs, memory, network around the GPUs
    default_pue: float = 1.2
    version: str = REMOTE_COEFFICIENTS_VERSION


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
    """Estimates a remote call's energy: EcoLogits for output tokens + a prefill term."""

    def __init__(self, coeff: RemoteCoefficients = RemoteCoefficients()) -> None:
        self.coeff = coeff

    def estimate(self, model: str, input_tokens: int, output_tokens: int, latency_s: float | None = None) -> Energy:
        provider, name = ecologits_model(model)
        out_lo, out_hi, active_lo, active_hi, pue = _ecologits_output(provider, name, max(output_tokens, 1), latency_s)
        if output_tokens <= 0:
            out_lo = out_hi = 0.0
        c = self.coeff
        joule_per_flop_lo = c.gpu_watts / (c.gpu_peak_flops * c.utilisation_high)
        joule_per_flop_pt = c.gpu_watts / (c.gpu_peak_flops * c.utilisation_point)
        joule_per_flop_hi = c.gpu_watts / (c.gpu_peak_flops * c.utilisation_low)
        pue = pue or c.default_pue

        def prefill_wh(active_b: float, j_per_flop: float) -> float:
            return input_tokens * 2 * active_b * 1e9 * j_per_flop * c.server_overhead * pue * WH_PER_J

        in_lo = prefill_wh(active_lo, joule_per_flop_lo)
        in_pt = prefill_wh((active_lo + active_hi) / 2, joule_per_flop_pt)
        in_hi = prefill_wh(active_hi, joule_per_flop_hi)
        basis = f"ecologits {provider}/{name} output + prefill {c.version}"
        return Energy("estimate", out_lo + in_lo, (out_lo + out_hi) / 2 + in_pt, out_hi + in_hi, basis)


@functools.lru_cache(maxsize=4096)
def _ecologits_output(provider: str, name: str, output_tokens: int, latency_s: float | None) -> tuple[float, float, float, float, float | None]:
    """(energy low Wh, high Wh, active params low B, high B, PUE point) from EcoLogits.

    Imported lazily: EcoLogits loads its model table on first use.
    """
    import logging

    from ecologits.model_repository import ParametersMoE, models
    from ecologits.tracers.utils import PROVIDER_CONFIG_MAP, llm_impacts

    # EcoLogits warns once per model about its precision; docs/method says it, the log need not.
    logging.getLogger("ecologits").setLevel(logging.ERROR)

    m = models.find_model(provider=provider, model_name=name)
    if m is None:
        raise ValueError(
            f"EcoLogits has no model {provider}/{name}: configure a frontier model it knows "
            f"(e.g. openai/gpt-4o) so the estimate has a basis"
        )
    # With no measured latency, EcoLogits' own latency model (tps/ttft of the deployment) applies.
    impacts = llm_impacts(provider, name, output_tokens, latency_s if latency_s is not None else 1e9)
    if impacts.energy is None:
        raise ValueError(f"EcoLogits gave no energy for {provider}/{name}: {impacts.errors}")
    lo, hi = _range(impacts.energy.value)
    params = m.architecture.parameters
    active = params.active if isinstance(params, ParametersMoE) else params
    a_lo, a_hi = _range(active)
    pue_lo, pue_hi = _range(PROVIDER_CONFIG_MAP[provider].datacenter_pue)
    # EcoLogits reports kWh.
    return lo * 1000, hi * 1000, a_lo, a_hi, (pue_lo + pue_hi) / 2


def _range(v: object) -> tuple[float, float]:
    if hasattr(v, "min") and hasattr(v, "max"):
        return float(v.min), float(v.max)  # type: ignore[attr-defined]
    return float(v), float(v)  # type: ignore[arg-type]
