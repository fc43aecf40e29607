"""A litellm custom provider that answers with recorded answers: the remote tier of a replay.

Registered in ``litellm.custom_provider_map`` as ``milliwatt-replay``, so a replay's remote
tier is the ordinary one (``LiteLLMBackend`` -> ``litellm.acompletion`` -> a provider) with
only the provider swapped. The answer is found by the step's replay id, which reaches the
provider as ``metadata["replay_id"]`` (``LiteLLMBackend`` forwards ``StepMeta.extra``).
Usage is counted with the same tokenizer as the rest of milliwatt, on what was sent, so the
energy estimate sees the trimmed input the frontier model would have read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from milliwatt._offline import import_litellm

litellm = import_litellm()  # offline: litellm's bundled price map, never a download

from litellm import CustomLLM, ModelResponse  # noqa: E402
from litellm.llms.custom_llm import CustomLLMError  # noqa: E402

from milliwatt.evaluation.replay import REPLAY_ID  # noqa: E402
from milliwatt.tokens import count_completion, count_request  # noqa: E402
from milliwatt.types import Message  # noqa: E402

PROVIDER = "milliwatt-replay"


class ReplayProvider(CustomLLM):
    """Serves ``answers[metadata["replay_id"]]`` for any model name."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Message] = {}

    def _respond(self, model: str, messages: list[Message], optional_params: dict[str, Any], litellm_params: Any) -> ModelResponse:
        replay_id = ((litellm_params or {}).get("metadata") or {}).get(REPLAY_ID)
        answer = self.answers.get(replay_id) if isinstance(replay_id, str) else None
        if answer is None:
            # 404: litellm maps it to NotFoundError, which the backend reports as a bad request.
            raise CustomLLMError(404, f"{PROVIDER}: no recorded answer for replay id {replay_id!r}")
        message = copy.deepcopy(answer)
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        prompt = count_request(messages, optional_params.get("tools") or ())
        completion = count_completion(message)
        return ModelResponse(
            model=model,
            choices=[{"index": 0, "message": message, "finish_reason": finish}],
            usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        )

    def completion(self, model: str, messages: list, *args: Any, **kw: Any) -> ModelResponse:  # type: ignore[override]
        return self._respond(model, messages, kw.get("optional_params") or {}, kw.get("litellm_params"))

    async def acompletion(self, model: str, messages: list, *args: Any, **kw: Any) -> ModelResponse:  # type: ignore[override]
        return self._respond(model, messages, kw.get("optional_params") or {}, kw.get("litellm_params"))


_PROVIDER = ReplayProvider()


def provider() -> ReplayProvider:
    """The registered provider (registering it on first call)."""
    entries = [e for e in litellm.custom_provider_map if e.get("provider") == PROVIDER]
    if not entries or entries[0].get("custom_handler") is not _PROVIDER:
        litellm.custom_provider_map = [
            e for e in litellm.custom_provider_map if e.get("provider") != PROVIDER
        ] + [{"provider": PROVIDER, "custom_handler": _PROVIDER}]
    return _PROVIDER


@contextmanager
def serving(answers: Mapping[str, Message]) -> Iterator[ReplayProvider]:
    """Serve ``answers`` (replay id -> recorded assistant message) for the duration."""
    p = provider()
    p.answers.update(answers)
    try:
        yield p
    finally:
        for key in answers:
            p.answers.pop(key, None)
