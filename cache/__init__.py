"""milliwatt.cache: the semantic cache tier.

Answers a step with a stored answer when a step in the same exact scope (instructions,
tools, tenant, end user, answer-shaping options), with the same conversation before the
last user message and the same tool output after it, asked something close enough in its
last user message, with the same IDs and numbers. Tool calls are replayed only for tools
declared read-only. See docs/cache.md.

Heavy modules (sentence-transformers, torch, faiss) are imported on first use only.
"""

from .embedder import Embedder
from .key import StepKey, literal_tokens, step_key
from .persist import CacheFileError
from .scope import scope_key, uncacheable_reason
from .tier import DEFAULT_THRESHOLD, DEFAULT_TTL_S, CacheTier

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_TTL_S",
    "CacheFileError",
    "CacheTier",
    "Embedder",
    "StepKey",
    "literal_tokens",
    "scope_key",
    "step_key",
    "uncacheable_reason",
]
