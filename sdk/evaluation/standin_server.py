"""llama-cpp-python's OpenAI server, with a chat format that renders agent traffic.

Agent requests carry assistant messages with tool calls and no content, and tool results.
SmolLM2's own template and llama-cpp-python's ``chatml-function-calling`` fail on those
(StrictUndefined ``content``, no ``tool`` role), so this module registers a ChatML format
that flattens them the way the local backend does, then runs the stock server:

    python -m milliwatt.evaluation.standin_server --model X.gguf --chat_format milliwatt-chatml
"""

from __future__ import annotations

from typing import Any

from llama_cpp.llama_chat_format import ChatFormatterResponse, register_chat_format

from milliwatt.adapters.tool_grammar import flatten_messages

CHAT_FORMAT = "milliwatt-chatml"


@register_chat_format(CHAT_FORMAT)
def format_agent_chatml(messages: list[dict[str, Any]], **kwargs: Any) -> ChatFormatterResponse:
    turns = flatten_messages(messages)
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
    return ChatFormatterResponse(prompt=prompt + "<|im_start|>assistant\n", stop=["<|im_end|>"])


def main() -> None:
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    main()
