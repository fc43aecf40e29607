"""Configuration: one YAML or TOML file (or a dict), environment overrides, defaults that run offline.

Each tier's section is handed as-is to that tier's ``from_settings``, which validates its
own keys; this module checks the shape around them and names the file and key on error.

Environment overrides (a provider configured through the environment wins over the file):
``MILLIWATT_REMOTE_MODEL``, ``MILLIWATT_REMOTE_API_BASE``, ``MILLIWATT_REMOTE_API_KEY_ENV``,
``MILLIWATT_FRONTIER_MODEL``, ``MILLIWATT_LEDGER``, ``MILLIWATT_CACHE_PATH``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

DEFAULT_FRONTIER = "openai/gpt-4o"
DEFAULT_CACHE_PATH = ".milliwatt/cache"


class TrimSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_tool_results: int = Field(3, ge=0)
    encoding: str = "o200k_base"


class EnergySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpu_watts_low: float = Field(1.5, gt=0)
    cpu_watts_point: float = Field(2.5, gt=0)
    cpu_watts_high: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> EnergySettings:
        if not self.cpu_watts_low <= self.cpu_watts_point <= self.cpu_watts_high:
            raise ValueError("cpu_watts_low <= cpu_watts_point <= cpu_watts_high must hold")
        return self


class Settings(BaseModel):
    """The whole configuration. ``tiers`` lists the cascade order by registered name."""

    model_config = ConfigDict(extra="forbid")

    frontier_model: str = DEFAULT_FRONTIER
    tiers: list[str] = Field(default_factory=lambda: ["rules", "cache", "local", "remote"], min_length=1)
    rules: dict[str, Any] = Field(default_factory=dict)
    cache: dict[str, Any] = Field(default_factory=dict)
    local: dict[str, Any] = Field(default_factory=dict)
    remote: dict[str, Any] = Field(default_factory=dict)
    # Sections of plugin tiers registered under other names.
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    ledger: str | None = "sqlite:///milliwatt.db"
    trim: TrimSettings = Field(default_factory=TrimSettings)
    energy: EnergySettings = Field(default_factory=EnergySettings)

    @field_validator("cache")
    @classmethod
    def _cache_persists_by_default(cls, v: dict[str, Any]) -> dict[str, Any]:
        # A cache section that sets only its threshold must not turn persistence off;
        # ``path: null`` does, on purpose.
        return {"path": DEFAULT_CACHE_PATH, **v}

    def section(self, tier: str) -> dict[str, Any]:
        if tier in ("rules", "cache", "local", "remote"):
            return dict(getattr(self, tier))
        return dict(self.plugins.get(tier, {}))


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
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ConfigError(f"{where}: {key}", err["msg"]) from None


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
