"""The energy coefficients: a versioned data file, one source per figure.

Every energy figure milliwatt writes is computed from what was observed (CPU seconds, a
counter's joules, tokens in / cached / out) and a set of coefficients. The set lives in a
YAML file (``sdk/data/coefficients/<version>.yaml`` ships the current one and its
predecessors), so a figure can be recomputed when a better coefficient is published
(``milliwatt report --recompute --coefficients FILE``) without touching the observations,
and every row of the ledger names the version it was computed with.

A file that does not parse, or holds a wrong key or value, is refused with a
``ConfigError`` naming the file, the line and the key.
"""

from __future__ import annotations

import datetime
import functools
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

SHIPPED = Path(__file__).parent / "data" / "coefficients"
CURRENT = "mw-2026.12"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Value(_Strict):
    value: float = Field(ge=0)
    source: str = Field(min_length=1)


class Flag(_Strict):
    value: bool
    source: str = Field(min_length=1)


class Span(_Strict):
    """A coefficient known as a range: low and high bracket it, point is the estimate."""

    low: float = Field(ge=0)
    point: float = Field(ge=0)
    high: float = Field(ge=0)
    source: str = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if not self.low <= self.point <= self.high:
            raise ValueError(f"low <= point <= high must hold, got {self.low}, {self.point}, {self.high}")
        return self


class Cpu(_Strict):
    watts_per_vcpu: Span


class Facility(_Strict):
    server_overhead: Value
    site_pue: Value
    default_provider_pue: Value
    # False only in mw-2026.11: the facility factors were applied to the remote estimate alone.
    own_tiers: Flag = Flag(value=True, source="the same facility factors for every tier")


class Output(_Strict):
    method: str = Field(pattern="^ecologits$")
    source: str


class Latency(_Strict):
    use_measured: bool
    source: str


class Remote(_Strict):
    output: Output
    latency: Latency
    gpu_watts: Value
    gpu_peak_flops: Value
    utilisation: Span


class PromptCache(_Strict):
    min_tokens: Value
    block_tokens: Value
    energy_weight: Span
    price_weight: Value

    def cached(self, prefix_tokens: int) -> int:
        """Of a request's prefix-stable tokens, those a provider's prompt cache serves: none
        below the minimum, else whole blocks."""
        block = max(int(self.block_tokens.value), 1)
        if prefix_tokens < self.min_tokens.value:
            return 0
        return prefix_tokens // block * block


class Measured(_Strict):
    counter_error: Value


class ModelEntry(_Strict):
    """A model EcoLogits does not list: its parameters in billions (a range when undisclosed)."""

    active_params_b: tuple[float, float] = Field(description="[low, high]")
    total_params_b: tuple[float, float] | None = None
    pue: float | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ModelEntry:
        for name in ("active_params_b", "total_params_b"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not 0 < lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high, got {list(lo_hi)}")
        return self


class Coefficients(_Strict):
    version: str = Field(min_length=1)
    date: datetime.date | str | None = None
    supersedes: str | None = None
    cpu: Cpu
    facility: Facility
    remote: Remote
    prompt_cache: PromptCache
    measured: Measured
    models: dict[str, ModelEntry] = Field(default_factory=dict)

    def with_models(self, models: dict[str, ModelEntry]) -> Coefficients:
        """This set, with more models for the estimate (the configuration's ``energy.models``)."""
        return self.model_copy(update={"models": {**self.models, **models}}) if models else self

    def with_site_pue(self, pue: float | None) -> Coefficients:
        if pue is None:
            return self
        site = Value(value=pue, source="energy.site_pue in the configuration")
        return self.model_copy(update={"facility": self.facility.model_copy(update={"site_pue": site})})

    @property
    def own_facility(self) -> float:
        """The factor on energy spent on the user's machines (CPU time, counters)."""
        f = self.facility
        return f.server_overhead.value * f.site_pue.value if f.own_tiers.value else 1.0


def load(source: str | os.PathLike[str] | None = None) -> Coefficients:
    """A coefficient set: a shipped version ("mw-2026.12"), a YAML file, or the current one."""
    if source is None:
        return current()
    path = Path(source)
    if not path.exists():
        path = SHIPPED / f"{source}.yaml"
        if not path.is_file():
            raise ConfigError(str(source), f"no such coefficient file, nor a shipped version (shipped: {', '.join(shipped_versions())})")
    return _load_file(path)


@functools.lru_cache(maxsize=1)
def current() -> Coefficients:
    """The shipped current set (read once)."""
    return _load_file(SHIPPED / f"{CURRENT}.yaml")


def shipped_versions() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def _load_file(path: Path) -> Coefficients:
    import yaml

    if not path.is_file():
        raise ConfigError(str(path), "no such coefficient file")
    text = path.read_text()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(where, f"cannot parse: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a coefficient file holds a mapping (version, cpu, facility, remote, ...)")
    try:
        return Coefficients.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [p for p in err["loc"] if not str(p).startswith("function-")]
        key = ".".join(str(p) for p in loc) or "(root)"
        line = _line_of(root, loc)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {key}", err["msg"]) from None


def _line_of(node: Any, loc: list[Any]) -> int | None:
    """The 1-based line of the deepest node of ``loc`` the file has (a missing key: its parent)."""
    import yaml

    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if k.value == str(part)), None)
            key = next((k for k, _ in node.value if k.value == str(part)), None)
            if found is None:
                return line
            line, node = key.start_mark.line + 1, found
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
