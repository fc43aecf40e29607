"""Offline defaults, applied at import: nothing may download at run time.

Only environment defaults are set (a user's own settings win), and no heavy module is
imported: the spec lookup finds litellm's bundled tokenizer files without running litellm.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def litellm_package_dir() -> str | None:
    """Where litellm is installed, found without importing it (the import takes seconds)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def litellm_tokenizers_dir() -> str | None:
    """litellm ships tiktoken's cl100k_base and o200k_base files here, named as tiktoken caches them."""
    pkg = litellm_package_dir()
    path = Path(pkg) / "litellm_core_utils" / "tokenizers" if pkg else None
    return str(path) if path and path.is_dir() else None


def apply_offline_defaults() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        tok_dir = litellm_tokenizers_dir()
        if tok_dir:
            os.environ["TIKTOKEN_CACHE_DIR"] = tok_dir
