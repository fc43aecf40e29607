"""List prices per token, from the price map litellm ships (read as JSON, offline).

Reading the file directly keeps ``import litellm`` (about 5 s) off the path of every step:
the counterfactual cost of each step needs the frontier model's price, even when no
remote call is made.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from ._offline import litellm_package_dir

_PRICE_FILE = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True)
class Price:
    model: str
    input_per_token: float
    output_per_token: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens * self.input_per_token + output_tokens * self.output_per_token


@functools.lru_cache(maxsize=1)
def _price_map() -> dict[str, dict]:
    pkg = litellm_package_dir()
    if pkg is None:
        return {}
    path = Path(pkg) / _PRICE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=256)
def price(model: str) -> Price | None:
    """The list price of a litellm model id ("openai/gpt-4o" or "gpt-4o"), or None if unknown."""
    table = _price_map()
    candidates = [model]
    if "/" in model:
        candidates.append(model.split("/", 1)[1])
    for name in candidates:
        entry = table.get(name)
        if entry and "input_cost_per_token" in entry:
            return Price(model, float(entry["input_cost_per_token"]), float(entry.get("output_cost_per_token", 0.0)))
    return None


def cost_usd(model: str, input_tokens: int, output_tokens: int) -> float:
    """List-price cost; 0.0 for models litellm does not price (local, stand-ins)."""
    p = price(model)
    return p.cost(input_tokens, output_tokens) if p else 0.0
