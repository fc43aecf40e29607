"""An OpenAI chat request, as litellm hands it to a provider or a callback, made into
``Milliwatt.step`` arguments.

One mapping, one home: the request goes through ``milliwatt serve``'s own
``openai_compat.parse_request`` (the HTTP endpoint's, which the OpenAI client and LangChain
reach too), with identity sent the way the endpoint reads it, as ``X-Milliwatt-*`` headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from milliwatt.serve.openai_compat import IDENTITY_HEADERS, OPENAI_PARAMS, parse_request

# Who is asking, as a caller names it in litellm's ``metadata=``.
IDENTITY_KEYS = tuple(IDENTITY_HEADERS.values())
_ENVELOPE = {"model", "messages", "stream", "stream_options", "metadata"}


def step_arguments(messages: Any, params: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``mw.step(**step_arguments(...))``: messages, tools, tool_choice, response_format and
    the OpenAI sampling options from ``params`` (provider-specific parameters litellm adds are
    left out); identity (session_id, run_id, tenant, agent, user) from ``metadata``; OpenAI's
    ``user`` parameter counts as the user. Raises ``milliwatt.serve.APIError`` (400) for a
    request OpenAI's API would reject."""
    body = {k: v for k, v in params.items() if k in OPENAI_PARAMS and k not in _ENVELOPE and v is not None}
    body.update(model="milliwatt", messages=list(messages))
    meta = metadata or {}
    headers = {header: str(meta[key]) for header, key in IDENTITY_HEADERS.items() if meta.get(key) is not None}
    return parse_request(body, headers).kwargs
