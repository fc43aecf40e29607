"""LangChain's chat model as a drop-in: ``chat_model(mw)`` is a ``langchain_openai.ChatOpenAI``
whose OpenAI clients are answered in this process by ``mw`` (``milliwatt.integrations.openai``).

    from milliwatt.integrations.langchain import chat_model
    llm = chat_model(mw, agent="support", tenant="acme", session_id="s-1")
    agent = langchain.agents.create_agent(llm, tools=[get_order_status])   # a LangGraph graph
    await agent.ainvoke({"messages": [("user", "Where is my order 48213?")]})

It is LangChain's own OpenAI chat model, so its mapping of messages and ``bind_tools`` to the
chat-completions API is LangChain's, and the answer comes back as LangChain builds it from
OpenAI's: an ``AIMessage`` with ``tool_calls`` (their ids), ``usage_metadata`` (the tokens the
ledger counted) and ``response_metadata["finish_reason"]``. Streaming (``astream``) works (the
in-process transport hands the chunks over together, once the step has ended).

Async use (``ainvoke``, ``astream``, LangGraph's async agents) runs the cascade on the caller's
event loop. Sync use (``invoke``) runs it on the sync client's own loop thread: use one
``Milliwatt`` either from sync code or from one event loop, not both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .openai import API_KEY, BASE_URL, app_for, async_http_client, http_client, identity_headers

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

    from milliwatt.client import Milliwatt


def chat_model(
    mw: Milliwatt,
    *,
    model: str = "milliwatt",
    session_id: str | None = None,
    run_id: str | None = None,
    tenant: str | None = None,
    agent: str | None = None,
    user: str | None = None,
    default_headers: Mapping[str, str] | None = None,
    **kw: Any,
) -> ChatOpenAI:
    """A ``ChatOpenAI`` answered by ``mw``; other keyword arguments go to ``ChatOpenAI``
    (``temperature``, ``max_tokens``, ``stream_usage``...). Identity as in ``async_client``."""
    from langchain_openai import ChatOpenAI

    app = app_for(mw)
    headers = {**identity_headers(session_id=session_id, run_id=run_id, tenant=tenant, agent=agent, user=user), **dict(default_headers or {})}
    kw.setdefault("max_retries", 0)  # the cascade retries its provider itself
    kw.setdefault("stream_usage", True)
    return ChatOpenAI(
        model=model,
        api_key=API_KEY,
        base_url=BASE_URL,
        default_headers=headers,
        http_async_client=async_http_client(mw, app=app),
        http_client=http_client(mw, app=app),
        **kw,
    )
