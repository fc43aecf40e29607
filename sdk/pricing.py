"""List prices per token, through litellm's public API (``litellm.get_model_info``).

Every step's counterfactual cost needs the frontier model's price, even when no remote
call is made, and ``import litellm`` takes seconds: so prices are looked up once, at
start (``load``, from a worker thread when an event loop is running), and kept. A step
then reads the kept price. litellm is imported through ``_offline.import_litellm``, so its
bundled price map is used (no download) and the environment is left as it was.

The frontier model (the baseline every step is compared with) must have a price:
``require_price`` refuses one litellm does not price, naming the setting, rather than
pricing it at zero. A model that answers (a local stand-in, a replay provider) may be
unpriced: it costs 0.0, as nothing known.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ._offline import import_litellm
from .errors import ConfigError


@dataclass(frozen=True)
class Price:
    model: str
    input_per_token: float
    output_per_token: float
    # litellm's cache_read_input_token_cost; None: the model lists none.
    cached_input_per_token: float | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0, cached_weight: float = 1.0) -> float:
        """List price; ``cached_tokens`` of the input at the cached price (or, where none is
        listed, at ``cached_weight`` x the input price)."""
        cached_price = self.cached_input_per_token
        if cached_price is None:
            cached_price = self.input_per_token * cached_weight
        fresh = input_tokens - cached_tokens
        return fresh * self.input_per_token + cached_tokens * cached_price + output_tokens * self.output_per_token


_lock = threading.Lock()
_prices: dict[str, Price | None] = {}


def _lookup(model: str) -> Price | None:
    litellm = import_litellm()
    candidates = [model]
    if "/" in model:  # "milliwatt-replay/gpt-4o": the model behind a provider litellm does not price
        candidates.append(model.split("/", 1)[1])
    for name in candidates:
        try:
            info = litellm.get_model_info(name)
        except Exception:  # noqa: BLE001 - litellm raises a plain Exception for an unmapped model
            info = None
        if not info:
            continue
        inp, out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
        if inp is None and out is None:
            continue
        cached = info.get("cache_read_input_token_cost")
        return Price(model, float(inp or 0.0), float(out or 0.0), None if cached is None else float(cached))
    return None


def load(*models: str) -> None:
    """Look the models' prices up now (imports litellm: seconds, the first time) and keep them.

    Blocking: from async code, ``await asyncio.to_thread(pricing.load, model)``.
    """
    for model in models:
        if model in _prices:
            continue
        found = _lookup(model)
        with _lock:
            _prices.setdefault(model, found)


def price(model: str) -> Price | None:
    """The list price of a litellm model id ("openai/gpt-4o" or "gpt-4o"), or None if unpriced.

    Kept after the first look-up; a model not loaded yet is looked up now (blocking).
    """
    try:
        return _prices[model]
    except KeyError:
        load(model)
        return _prices[model]


def require_price(model: str, where: str = "frontier_model") -> Price:
    """The price of ``model``, or a ``ConfigError`` naming the setting ``where`` if litellm has none."""
    p = price(model)
    if p is None:
        raise ConfigError(
            where,
            f"litellm has no price for {model!r}; set {where} to a priced model "
            f"(a litellm model id such as 'openai/gpt-4o'): the baseline of every step is priced with it",
        )
    if p.input_per_token <= 0 and p.output_per_token <= 0:
        raise ConfigError(
            where,
            f"litellm prices {model!r} at zero; set {where} to a priced frontier model such as 'openai/gpt-4o'",
        )
    return p


def cost_usd(model: str, input_tokens: int, output_tokens: int, cached_tokens: int = 0, cached_weight: float = 1.0) -> float:
    """List-price cost; 0.0 for models litellm does not price (local, stand-ins)."""
    p = price(model)
    return p.cost(input_tokens, output_tokens, cached_tokens, cached_weight) if p else 0.0
