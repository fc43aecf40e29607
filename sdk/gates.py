"""The local tier's gate: may a small model's answer stand, or must the step escalate?

Three checks, cheapest first, each naming what failed:

* structure: an empty answer, or one cut off at ``max_tokens``, never stands;
* tool calls: the tool must be offered, ``tool_choice`` respected, and the arguments
  must parse and validate against the tool's JSON schema (``jsonschema``);
* side effects (``SideEffectGate``, wrapping the others): a call to a tool not declared
  read-only would be executed by the agent unverified, so it escalates;
* confidence: a low quantile of the token probabilities, not their mean. Gupta et al.,
  "Language Model Cascades: Token-Level Uncertainty and Beyond", show that the mean hides
  the one or two tokens the model was unsure of (a wrong id in a tool call is one token),
  while a low quantile of per-token probabilities is a better deferral signal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .side_effects import ReadOnlyTools
from .tier import Completion
from .types import Message, Step, content_text


@dataclass(frozen=True)
class GateDecision:
    """``signal`` is the confidence (the token-probability quantile) whatever the verdict,
    so the ledger can show how close a rejected answer came. ``evidence``: what else the gate
    wants kept with the attempt (``attempts.evidence_json``)."""

    accept: bool
    signal: float
    reason: str
    evidence: Mapping[str, Any] | None = None


class Gate(Protocol):
    def check(self, step: Step, completion: Completion) -> GateDecision: ...

    # Optional: ``hopeless(logprobs_so_far, max_tokens)`` lets a backend stop decoding an
    # answer that can no longer pass (see ConfidenceGate.hopeless).


def probability_quantile(logprobs: tuple[float, ...] | list[float], q: float) -> float:
    """The q-quantile of exp(logprob), linearly interpolated (numpy's default method)."""
    if not logprobs:
        raise ValueError("no token log-probabilities")
    ps = sorted(math.exp(lp) for lp in logprobs)
    pos = q * (len(ps) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ps) - 1)
    return ps[lo] + (ps[hi] - ps[lo]) * (pos - lo)


def tool_call_problem(step: Step, message: Message) -> str | None:
    """Why the message's tool calls (or their absence) break the step's contract, or None."""
    calls = message.get("tool_calls") or []
    choice = step.tool_choice
    if choice == "none" and calls:
        return "tool call made although tool_choice is 'none'"
    if choice == "required" and not calls:
        return "no tool call although tool_choice is 'required'"
    forced = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if forced and not calls:
        return f"no tool call although tool_choice requires {forced!r}"
    for call in calls:
        fn = call.get("function") or {}
        name = fn.get("name")
        tool = step.tool(name) if isinstance(name, str) else None
        if tool is None:
            return f"tool call invalid: {name!r} is not an offered tool"
        if forced and name != forced:
            return f"tool call invalid: {name!r} called but tool_choice requires {forced!r}"
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError) as e:
            return f"tool call invalid: arguments of {name!r} are not JSON ({e})"
        if not isinstance(args, dict):
            return f"tool call invalid: arguments of {name!r} are not an object"
        problem = schema_problem(args, tool["function"].get("parameters") or {"type": "object"})
        if problem:
            return f"tool call invalid: {problem}"
    return None


def answer_problem(step: Step, completion: Completion) -> str | None:
    """Why an answer can never stand, whatever its confidence, or None: cut off at
    ``max_tokens`` (or stopped early), empty, breaking the tools contract, or repeating an
    earlier call."""
    msg = completion.message
    if completion.extra.get("aborted"):
        return "stopped early: it could no longer pass"
    if completion.extra.get("finish_reason") == "length":
        return "hit max_tokens before finishing"
    if not msg.get("tool_calls") and not content_text(msg.get("content")).strip():
        return "empty answer"
    return tool_call_problem(step, msg) or repeated_call(step, msg)


def repeated_call(step: Step, message: Message) -> str | None:
    """A tool call identical to one the conversation already made, or None.

    Its result is already in the context, so repeating it is a loop, not progress. Small
    models fall into it readily, and with high confidence (copying is what they do best),
    so the confidence signal alone would let it through.
    """
    made = {_call_key(c) for m in step.messages if m["role"] == "assistant" for c in m.get("tool_calls") or []}
    for call in message.get("tool_calls") or []:
        if _call_key(call) in made:
            return f"repeats the earlier call {call['function']['name']}({call['function'].get('arguments') or ''})"
    return None


def _call_key(call: dict[str, Any]) -> tuple[str, str]:
    fn = call.get("function") or {}
    try:
        args = json.dumps(json.loads(fn.get("arguments") or "{}"), sort_keys=True)
    except (TypeError, json.JSONDecodeError):
        args = str(fn.get("arguments"))
    return str(fn.get("name")), args


def schema_problem(args: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """The first schema violation as ``arguments.<path> <what>``, or None."""
    import jsonschema  # imported here: only gated tiers need it

    cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(args))
    if error is None:
        return None
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    if error.validator == "required":
        missing = next(
            (r for r in error.validator_value if isinstance(error.instance, dict) and r not in error.instance),
            None,
        )
        if missing is not None:
            return f"arguments{path}.{missing} missing"
    return f"arguments{path}: {error.message}"


@dataclass(frozen=True)
class ConfidenceGate:
    """Accepts an answer that is well formed, honours the tools contract, and whose
    ``quantile``-th token probability reaches ``threshold``.

    The defaults (10th percentile >= 0.5) reject an answer when more than one token in ten
    was a coin flip or worse; tune them on held-out traffic, not on the replayed set.
    """

    quantile: float = 0.1
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @property
    def label(self) -> str:
        return f"q{round(self.quantile * 100):02d}"

    def hopeless(self, logprobs: Sequence[float], max_tokens: int) -> bool:
        """True once more tokens fell below the threshold than the quantile allows in an
        answer of at most ``max_tokens``: however it goes on, the answer will be rejected,
        so decoding the rest only burns CPU (seconds per step for a long answer)."""
        low = sum(1 for lp in logprobs if lp < self._log_threshold)
        return low > self.quantile * max_tokens

    @property
    def _log_threshold(self) -> float:
        return math.log(self.threshold) if self.threshold > 0 else -math.inf

    def check(self, step: Step, completion: Completion) -> GateDecision:
        signal = probability_quantile(completion.token_logprobs, self.quantile) if completion.token_logprobs else 0.0
        if completion.extra.get("aborted"):
            return GateDecision(False, signal, f"stopped early: too many tokens below p={self.threshold:.2f} to pass")
        problem = answer_problem(step, completion)
        if problem:
            return GateDecision(False, signal, problem)
        if not completion.token_logprobs and not completion.choice_logprobs:
            return GateDecision(False, signal, "no token log-probabilities to judge confidence")
        # Each closed choice (tool or text, which tool) must pass on its own: one wrong
        # choice makes the whole answer wrong, however sure the argument tokens are.
        parts: list[tuple[str, float]] = []
        if completion.choice_logprobs:
            parts.append(("choice p", math.exp(min(completion.choice_logprobs))))
        if completion.token_logprobs:
            parts.append((f"confidence {self.label}", signal))
        weakest = min(p for _, p in parts)
        reason = ", ".join(f"{name}={p:.2f} {'>=' if p >= self.threshold else '<'} {self.threshold:.2f}" for name, p in parts)
        return GateDecision(weakest >= self.threshold, weakest, reason)


@dataclass(frozen=True)
class SideEffectGate:
    """Wraps a gate: an answer that calls a tool not declared read-only escalates, however
    confident the model. The agent executes the calls it is given; a small model's call to a
    tool that writes (cancel, book, update) would change the world unverified, so only the
    tier that answers as well as the reference may make it (``local.tool_calls: any`` lifts
    this where calls are judged, never executed, as in a BFCL replay)."""

    inner: Gate
    tools: ReadOnlyTools

    def check(self, step: Step, completion: Completion) -> GateDecision:
        decision = self.inner.check(step, completion)
        unsafe = self.tools.first_unsafe(completion.message, step) if decision.accept else None
        if unsafe is None:
            return decision
        return GateDecision(False, decision.signal, f"calls {unsafe}, which is not declared read-only", decision.evidence)

    def hopeless(self, logprobs: Sequence[float], max_tokens: int) -> bool:
        hopeless = getattr(self.inner, "hopeless", None)
        return bool(hopeless and hopeless(logprobs, max_tokens))

    def observe_check(self, agrees: bool) -> None:
        observe = getattr(self.inner, "observe_check", None)
        if observe is not None:
            observe(agrees)


@dataclass(frozen=True)
class ObservingGate:
    """Wraps a gate: judge every answer, accept none (``local.observe``). The step goes on to
    the next tier, whose answer is the reference every recorded local answer can be judged
    against: a replay in this mode is calibration data for ``milliwatt calibrate``. Decoding
    is never cut short (no ``hopeless``): the features of the whole answer are recorded."""

    inner: Gate

    def check(self, step: Step, completion: Completion) -> GateDecision:
        d = self.inner.check(step, completion)
        evidence = {**(d.evidence or {}), "would_accept": d.accept}
        return GateDecision(False, d.signal, f"observe: would {'accept' if d.accept else 'pass'} ({d.reason})", evidence)
