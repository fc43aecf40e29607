"""The step types: what goes into a step, what each tier returns, what comes out.

These are plain dataclasses so rules/, cache/ and adapters/ can share them without
depending on each other. OpenAI-format messages stay plain dicts (what agent code
already holds); ``Step.create`` validates them once, naming the bad field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import InvalidRequestError

Message = dict[str, Any]
TierName = str  # "rules", "cache", "local", "remote", or a registered plugin tier


@dataclass(frozen=True)
class Observed:
    """What was observed of a piece of work: what its energy figure is computed from, so the
    figure can be recomputed with other coefficients (``milliwatt report --recompute``).

    ``cpu_seconds``: measured CPU time; ``joules`` and ``meter``: a hardware counter's reading
    (``rapl``, ``nvml``); ``model``: the model a remote estimate is for; ``cached_tokens``:
    input tokens a provider's prompt cache served (reported, or estimated from the prefix)."""

    cpu_seconds: float | None = None
    joules: float | None = None
    meter: str | None = None
    model: str | None = None
    cached_tokens: int | None = None

    def __add__(self, other: Observed) -> Observed:
        def add(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else a + b

        def same(a: str | None, b: str | None) -> str | None:
            return b if a is None else a if b is None or a == b else None

        return Observed(
            add(self.cpu_seconds, other.cpu_seconds),
            add(self.joules, other.joules),
            same(self.meter, other.meter),
            same(self.model, other.model),
            add(self.cached_tokens, other.cached_tokens),
        )


@dataclass(frozen=True)
class Energy:
    """Energy in watt-hours, with how it was obtained and a low/point/high range.

    ``method`` is one of ``"cpu-time"`` (CPU seconds x watts per vCPU), ``"estimate"``
    (a model of a remote deployment, e.g. EcoLogits), ``"measured"`` (a hardware counter),
    ``"mixed"`` (a sum of several methods) or ``"none"`` (no work was done).
    ``basis`` says which coefficients were used, so a figure can be re-derived; ``version``
    is the coefficient set's (``milliwatt.coefficients``) and ``observed`` what the figure was
    computed from.
    """

    method: str
    low_wh: float
    point_wh: float
    high_wh: float
    basis: str = ""
    observed: Observed | None = field(default=None, compare=False)
    version: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (0 <= self.low_wh <= self.point_wh <= self.high_wh):
            raise ValueError(
                f"energy range must satisfy 0 <= low <= point <= high, got "
                f"{self.low_wh}, {self.point_wh}, {self.high_wh}"
            )

    @classmethod
    def zero(cls) -> Energy:
        return cls("none", 0.0, 0.0, 0.0)

    def __add__(self, other: Energy) -> Energy:
        if self.method == "none":
            return other
        if other.method == "none":
            return self
        method = self.method if self.method == other.method else "mixed"
        basis = self.basis if self.basis == other.basis else "; ".join(
            b for b in dict.fromkeys((self.basis, other.basis)) if b
        )
        observed = other.observed if self.observed is None else self.observed if other.observed is None else self.observed + other.observed
        version = self.version if self.version == other.version else "; ".join(v for v in dict.fromkeys((self.version, other.version)) if v) or None
        return Energy(
            method,
            self.low_wh + other.low_wh,
            self.point_wh + other.point_wh,
            self.high_wh + other.high_wh,
            basis,
            observed,
            version,
        )


def savings_factor(baseline: Energy, cascade: Energy) -> dict[str, float | None]:
    """The factor baseline / cascade as a range: low = base.low / casc.high, high = base.high / casc.low."""

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    return {
        "low": ratio(baseline.low_wh, cascade.high_wh),
        "point": ratio(baseline.point_wh, cascade.point_wh),
        "high": ratio(baseline.high_wh, cascade.low_wh),
    }


# --------------------------------------------------------------------------- the request

_ROLES = {"system", "developer", "user", "assistant", "tool"}
_OPTION_KEYS = {"temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty",
                "frequency_penalty", "n", "logprobs", "top_logprobs", "parallel_tool_calls",
                # What agents send today, passed through to the remote tier (``Step.create``):
                "max_completion_tokens", "reasoning_effort", "extra_headers", "extra_body", "user"}


@dataclass(frozen=True)
class StepMeta:
    """Who is asking: used by rules (match on agent or tenant), the cache (tenant and user
    are part of the scope, so no hit ever crosses tenants or end users) and the ledger.

    ``user`` is the end user the agent acts for, as OpenAI's ``user`` parameter: an opaque
    id the caller chooses (a hash of an account id, not an email)."""

    session_id: str | None = None
    run_id: str | None = None
    tenant: str | None = None
    agent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    user: str | None = None


@dataclass(frozen=True)
class Step:
    """One validated agent step: the OpenAI chat request the agent would have sent."""

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    meta: StepMeta = field(default_factory=StepMeta)

    @classmethod
    def create(
        cls,
        messages: Any,
        *,
        tools: Any = None,
        tool_choice: Any = None,
        response_format: Any = None,
        options: dict[str, Any] | None = None,
        meta: StepMeta | None = None,
    ) -> Step:
        """Validate an OpenAI-format request; raise ``InvalidRequestError`` naming the field.

        ``options``: the sampling options, and what agents send beside them, passed through:
        ``max_completion_tokens`` (a cap on the answer for every tier, like ``max_tokens``),
        ``reasoning_effort``, ``extra_headers`` and ``extra_body`` (sent by the remote tier only,
        as litellm takes them; the headers are never recorded), and ``user`` (the end user:
        it becomes ``meta.user``). Any other key is refused, named. ``meta``'s ids (tenant, user,
        session, run, agent) must be strings or None and ``meta.extra`` an object with string
        keys, since the ledger stores and the cache keys on them."""
        msgs = validate_messages(messages)
        tls = validate_tools(tools)
        names = {t["function"]["name"] for t in tls}
        _validate_tool_choice(tool_choice, names)
        if response_format is not None and not (
            isinstance(response_format, dict) and isinstance(response_format.get("type"), str)
        ):
            raise InvalidRequestError("response_format", "must be an object with a string 'type'")
        opts = dict(options or {})
        unknown = sorted(set(opts) - _OPTION_KEYS, key=str)
        if unknown:
            raise InvalidRequestError(f"options.{unknown[0]}", f"unknown sampling option (known: {', '.join(sorted(_OPTION_KEYS))})")
        for key, value in opts.items():
            _validate_option(key, value)
        meta = meta or StepMeta()
        _validate_meta(meta)
        if "user" in opts:  # OpenAI's ``user`` is who the agent acts for: the step's end user
            user = opts.pop("user")
            if user is not None and meta.user is not None and user != meta.user:
                raise InvalidRequestError("options.user", f"{user!r} differs from the step's user {meta.user!r}")
            if user is not None:
                meta = replace(meta, user=user)
        return cls(tuple(msgs), tuple(tls), tool_choice, response_format, opts, meta)

    # Conveniences the tiers all need.
    @property
    def last_user_text(self) -> str:
        for m in reversed(self.messages):
            if m["role"] == "user":
                return content_text(m.get("content"))
        return ""

    @property
    def system_text(self) -> str:
        return "\n".join(content_text(m.get("content")) for m in self.messages if m["role"] in ("system", "developer"))

    def tool(self, name: str) -> dict[str, Any] | None:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t
        return None

    def with_messages(self, messages: list[Message] | tuple[Message, ...]) -> Step:
        return Step(tuple(messages), self.tools, self.tool_choice, self.response_format, self.options, self.meta)

    @property
    def max_tokens(self) -> int | None:
        """The cap on the answer's tokens: the smaller of ``max_tokens`` and
        ``max_completion_tokens`` where both are given, None where neither is."""
        caps = [v for k in ("max_tokens", "max_completion_tokens") if (v := self.options.get(k)) is not None]
        return min(caps) if caps else None

    def to_openai(self) -> dict[str, Any]:
        """The request as OpenAI chat-completions keyword arguments (what the ledger records:
        without ``extra_headers``, which may carry credentials; the remote tier adds them)."""
        req: dict[str, Any] = {"messages": list(self.messages)}
        if self.tools:
            req["tools"] = list(self.tools)
        if self.tool_choice is not None:
            req["tool_choice"] = self.tool_choice
        if self.response_format is not None:
            req["response_format"] = self.response_format
        req.update((k, v) for k, v in self.options.items() if k != "extra_headers")
        return req


_NUMBER_OPTIONS = {"temperature", "top_p", "presence_penalty", "frequency_penalty"}
_INT_OPTIONS = {"max_tokens", "max_completion_tokens", "seed", "n", "top_logprobs"}
_BOOL_OPTIONS = {"logprobs", "parallel_tool_calls"}
_STR_OPTIONS = {"reasoning_effort", "user"}


def _validate_option(key: str, value: Any) -> None:
    """Types checked here, so a wrong one is named now, not failing deep inside a tier."""
    if value is None:
        return
    where = f"options.{key}"
    if key in _NUMBER_OPTIONS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InvalidRequestError(where, f"must be a number, got {value!r}")
    if key in _INT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequestError(where, f"must be a whole number, got {value!r}")
    if key in _BOOL_OPTIONS and not isinstance(value, bool):
        raise InvalidRequestError(where, f"must be true or false, got {value!r}")
    if key == "stop" and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))):
        raise InvalidRequestError(where, f"must be a string or a list of strings, got {value!r}")
    if key in _STR_OPTIONS and not (isinstance(value, str) and value):
        raise InvalidRequestError(where, f"must be a non-empty string, got {value!r}")
    if key == "extra_headers":
        if not isinstance(value, dict):
            raise InvalidRequestError(where, f"must be an object of header names to string values, got {type(value).__name__}")
        for name, v in value.items():
            if not (isinstance(name, str) and name) or not isinstance(v, str):
                raise InvalidRequestError(f"{where}.{name}", f"a header needs a name and a string value, got {v!r}")
    if key == "extra_body":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise InvalidRequestError(where, f"must be an object with string keys, got {type(value).__name__}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(where, f"must be JSON (it is sent as the request body): {e}") from None


def _validate_meta(meta: StepMeta) -> None:
    """Who is asking: ids the ledger stores as text and the cache keys on, so strings or None
    (named as ``Milliwatt.step`` takes them)."""
    if not isinstance(meta, StepMeta):
        raise InvalidRequestError("meta", f"must be a StepMeta, got {type(meta).__name__}")
    for name in ("session_id", "run_id", "tenant", "agent", "user"):
        value = getattr(meta, name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(name, f"must be a string or None, got {type(value).__name__}")
    if not isinstance(meta.extra, dict) or not all(isinstance(k, str) for k in meta.extra):
        raise InvalidRequestError("metadata", "must be an object with string keys")


def content_text(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def validate_messages(messages: Any, *, answered: bool = True) -> list[Message]:
    """Check OpenAI chat messages; raise ``InvalidRequestError`` naming the first wrong field.

    ``answered``: every tool call must have its result later in the list, as a request sent
    to a provider must (False for an answer on its own, whose calls the agent has yet to run).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of message objects")
    out: list[Message] = []
    open_calls: dict[str, int] = {}  # call id -> the assistant message making it
    results: set[str] = set()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(where, f"must be an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequestError(f"{where}.role", f"must be one of {sorted(_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(f"{where}.content", "must be a string, a list of content parts, or null")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise InvalidRequestError(f"{where}.content[{j}]", "must be an object with a string 'type'")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"{where}.content[{j}].text", "a text part needs its text as a string")
        if role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise InvalidRequestError(f"{where}.tool_calls", "must be a list")
            if content is None and not calls:
                raise InvalidRequestError(f"{where}.content", "an assistant message needs content or tool_calls")
            for j, call in enumerate(calls):
                _validate_tool_call(call, f"{where}.tool_calls[{j}]")
                open_calls[call["id"]] = i
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequestError(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
            if call_id not in open_calls:
                raise InvalidRequestError(f"{where}.tool_call_id", f"{call_id!r} answers no earlier assistant tool call")
            results.add(call_id)
        elif content is None:
            raise InvalidRequestError(f"{where}.content", f"a {role} message needs content")
        out.append(m)
    # Providers reject a tool call without its result, and trimming keeps the two together.
    for call_id, i in open_calls.items() if answered else ():
        if call_id not in results:
            j = next(k for k, c in enumerate(out[i]["tool_calls"]) if c["id"] == call_id)
            raise InvalidRequestError(f"messages[{i}].tool_calls[{j}]", f"call {call_id!r} has no tool result after it")
    return out


def _validate_tool_call(call: Any, where: str) -> None:
    if not isinstance(call, dict):
        raise InvalidRequestError(where, "must be an object")
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise InvalidRequestError(f"{where}.id", "must be a non-empty string")
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequestError(f"{where}.function.name", "must be a non-empty string")
    args = fn.get("arguments")
    if not isinstance(args, str):
        raise InvalidRequestError(f"{where}.function.arguments", "must be a JSON string")
    try:
        json.loads(args or "{}")
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{where}.function.arguments", f"is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise InvalidRequestError(f"{where}.function.arguments", "is nested too deeply to read") from None


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise InvalidRequestError("tools", "must be a list of tool objects")
    seen: set[str] = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise InvalidRequestError(f"{where}.type", "must be 'function'")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function", "must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"{where}.function.name", "must be a non-empty string")
        if name in seen:
            raise InvalidRequestError(f"{where}.function.name", f"duplicate tool name {name!r}")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise InvalidRequestError(f"{where}.function.parameters", "must be a JSON schema of type 'object'")
        if "properties" in params and not isinstance(params["properties"], dict):
            raise InvalidRequestError(f"{where}.function.parameters.properties", "must be an object")
    return list(tools)


def _validate_tool_choice(choice: Any, names: set[str]) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequestError("tool_choice", f"must be 'auto', 'none', 'required' or a function object, got {choice!r}")
        if choice == "required" and not names:
            raise InvalidRequestError("tool_choice", "'required' needs at least one tool")
        return
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InvalidRequestError("tool_choice.function.name", "must name a function")
    if name not in names:
        raise InvalidRequestError("tool_choice.function.name", f"{name!r} is not one of the tools")


# --------------------------------------------------------------------------- tier results

Outcome = Literal["answered", "passed", "skipped", "error", "cancelled", "shadow"]


@dataclass(frozen=True)
class TierResult:
    """What one tier made of a step: an answer, or a pass with the reason.

    ``signal`` is the number the tier decided on (rule id hit = 1.0, cache similarity,
    local confidence); ``reason`` says in words why it answered or passed.
    """

    tier: TierName
    message: Message | None
    reason: str
    energy: Energy
    signal: float | None = None
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    label: str | None = None  # e.g. "stand-in" for the demo's loopback remote
    cacheable: bool = True  # may this answer be written back to the cache?
    skip_to: TierName | None = None  # a routing decision: pass straight to this tier
    # Tiers not to ask for this step (a rule's ``route: {forbid: [...]}``), each with the reason
    # its ``skipped`` attempt records; the last resort is asked whatever this says.
    forbid: Mapping[TierName, str] = field(default_factory=dict)
    # A cap on the input tokens of every later tier of this step (a rule's ``budget``): each is
    # trimmed to the smaller of this and its own budget, and not asked if the step cannot fit.
    token_budget: int | None = None
    # What the tier decided on, kept in the ledger (attempts.evidence_json) so the decision
    # can be judged and recalibrated later: e.g. the cache's candidate and its gate score.
    evidence: Mapping[str, Any] | None = None
    # Ask the cascade to check this answer: the next tiers answer the step too, off the
    # critical path, and the answer is handed to this tier's ``remember`` (a shadow check).
    shadow: bool = False

    @property
    def answered(self) -> bool:
        return self.message is not None

    @classmethod
    def passed(cls, tier: TierName, reason: str, *, energy: Energy | None = None, **kw: Any) -> TierResult:
        return cls(tier, None, reason, energy or Energy.zero(), **kw)


@dataclass(frozen=True)
class Attempt:
    """One tier's try at a step, as the ledger stores it."""

    tier: TierName
    outcome: Outcome
    reason: str
    signal: float | None
    model: str | None
    input_tokens: int
    output_tokens: int
    latency_s: float
    energy: Energy
    cost_usd: float
    label: str | None = None
    evidence: Mapping[str, Any] | None = None  # TierResult.evidence, and what trimming did ("trim")
    prefix_tokens: int = 0  # input tokens repeating the start of this tier's previous request in the session


@dataclass(frozen=True)
class Quality:
    """How a step's answer compares with a reference (the frontier model's recorded answer,
    or a ground truth). ``kind`` keeps exact measures and proxies apart: an exact measure
    (a tool call JSON-equal to the reference, the right final number) is never averaged
    with a proxy (text similarity) without saying so."""

    metric: str  # e.g. "tool_call_match", "bfcl_ast", "gsm8k_final_number", "text_similarity"
    kind: Literal["exact", "proxy"]
    agrees: bool
    score: float  # 1.0/0.0 for exact measures; the proxy's value otherwise
    detail: str = ""


@dataclass(frozen=True)
class StepRecord:
    """Everything the ledger keeps about one step."""

    step_id: str
    started_at: float  # unix seconds
    meta: StepMeta
    tier: TierName
    model: str | None
    label: str | None
    input_tokens_raw: int
    input_tokens_sent: int
    output_tokens: int
    latency_s: float
    energy: Energy
    cost_usd: float
    baseline_energy: Energy  # the untrimmed step sent to the frontier model
    baseline_cost_usd: float
    baseline_model: str
    attempts: tuple[Attempt, ...]
    request: dict[str, Any] = field(default_factory=dict, compare=False)
    response: Message = field(default_factory=dict, compare=False)
    quality: Quality | None = None  # set by replays, which know the reference answer
    input_tokens_prefix: int = 0  # of input_tokens_sent, those repeating the answering tier's previous request in the session
    # The answering tier's trimming (``milliwatt.trimming.Trimmed``), in memory only: a replay
    # audits it against the reference answer. Not stored.
    trimmed: Any = field(default=None, compare=False, repr=False)
    # The baseline's observations: its input tokens (counted with ``baseline_tokenizer``), those
    # its provider's prompt cache would have served, and its answer's length.
    baseline_input_tokens: int | None = None
    baseline_cached_tokens: int = 0
    baseline_output_tokens: int | None = None
    baseline_tokenizer: str | None = None
    coefficients: str | None = None  # version of the coefficient set every figure was computed with
    hardware: str | None = None  # the machine the cheap tiers ran on
    # Background work recorded with this step (``milliwatt.overheads``): (what, its energy).
    overheads: tuple[tuple[Any, Energy], ...] = ()


@dataclass(frozen=True)
class StepResult:
    """What ``Milliwatt.step`` returns: the OpenAI assistant message plus its record."""

    message: Message
    record: StepRecord

    @property
    def tier(self) -> TierName:
        return self.record.tier

    @property
    def content(self) -> str | None:
        return self.message.get("content")

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.message.get("tool_calls") or [])
