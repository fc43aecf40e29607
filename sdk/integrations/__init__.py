"""In-process drop-ins: milliwatt behind the clients and agent frameworks agents already use.

One module per front door, each imported on its own (``import milliwatt`` imports none of
them, nor the framework they need):

* ``milliwatt.integrations.openai``: ``async_client(mw)`` / ``client(mw)``, a real
  ``openai.AsyncOpenAI`` / ``openai.OpenAI`` whose HTTP goes to ``milliwatt serve``'s app in
  this process. The OpenAI Agents SDK, pydantic-ai and anything else that takes an OpenAI
  client take it as theirs.
* ``milliwatt.integrations.langchain``: ``chat_model(mw)``, a ``langchain_openai.ChatOpenAI``
  over that same client, for LangChain and LangGraph agents.
* ``milliwatt.integrations.litellm``: ``register(mw)``, a litellm custom provider
  (``litellm.acompletion(model="milliwatt/...")`` answers through the cascade), and
  ``LedgerCallback(mw)``, a litellm callback that records calls an agent makes to providers
  directly as remote steps in milliwatt's ledger.

Every step, whichever door it came through, is one ``Milliwatt.step`` and one ledger row.
"""
