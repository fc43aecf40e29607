"""Model backends, imported lazily.

``import milliwatt.adapters`` stays cheap: llama-cpp-python and litellm (about 5 s to
import) load only when a backend is first used, not when this package is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .litellm_backend import LiteLLMBackend
    from .llama_cpp import LlamaCppBackend, default_gguf_path

__all__ = ["LiteLLMBackend", "LlamaCppBackend", "default_gguf_path"]

_WHERE = {
    "LiteLLMBackend": ".litellm_backend",
    "LlamaCppBackend": ".llama_cpp",
    "default_gguf_path": ".llama_cpp",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'milliwatt.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
