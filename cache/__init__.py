"""milliwatt.cache: the semantic cache tier.

Answers a step with a stored answer when a step in the same exact scope (instructions,
tools, tenant, end user, answer-shaping options), with the same conversation before the
last user message and the same tool output after it, asked something close enough in its
last user message, with the same IDs and numbers; or with a templated answer re-bound to
the step's own values, when a step in the same situation made it. A calibrated gate decides
every hit, so the share of wrong hits stays under a bound the user sets. Tool calls are
replayed only for tools declared read-only. See docs/cache.md.

Heavy modules (sentence-transformers, torch, faiss) are imported on first use only.
"""

from .embedder import Embedder
from .key import StepKey, literal_tokens, step_key
from .persist import CacheFileError, CacheLockedError
from .scope import scope_key, uncacheable_reason
from .evidence import HitGate, default_gate, text_features
from .template import BindError, Template, make_template
from .tier import DEFAULT_TTL_S, CacheTier

__all__ = [
    "DEFAULT_TTL_S",
    "BindError",
    "CacheFileError",
    "CacheLockedError",
    "CacheTier",
    "Embedder",
    "HitGate",
    "StepKey",
    "Template",
    "default_gate",
    "make_template",
    "text_features",
    "literal_tokens",
    "scope_key",
    "step_key",
    "uncacheable_reason",
]
