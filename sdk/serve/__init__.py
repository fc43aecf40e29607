"""``milliwatt serve``: an OpenAI-compatible HTTP endpoint that answers through the cascade.

    from milliwatt.serve import create_app
    app = create_app(mw, api_keys=["..."])   # any ASGI server; `milliwatt serve` runs uvicorn

Any agent, in any language, points its OpenAI base URL at it (docs/integrations.md).
Starlette is imported on first use of these names (it is the ``serve`` extra), so the CLI
can list the command without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "DEFAULT_MAX_BODY_BYTES", "create_app", "create_app_from_config"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "create_app_from_config", "DEFAULT_MAX_BODY_BYTES"):
        from . import app

        return getattr(app, name)
    if name == "APIError":
        from .openai_compat import APIError

        return APIError
    raise AttributeError(f"module 'milliwatt.serve' has no attribute {name!r}")
