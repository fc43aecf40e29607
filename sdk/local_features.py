"""What a local answer looks like, as numbers a calibrated gate can learn from (issue 9).

A small model's answer is right more often when it was sure of every token that mattered,
chose its tool with a wide margin, produced a call its schema accepts, and copied its values
from the context instead of inventing them. ``answer_features`` measures each of those on one
completion; the local tier records them with every answer it makes, accepted or not
(``attempts.evidence_json`` → ``features``), so any replay's ledger is calibration data.

* ``p_q00``, ``p_q10``, ``p_q25``, ``p_q50``: quantiles of the generated tokens' probabilities
  (Gupta et al., ICLR 2024: a low quantile, not the mean, finds the one token the model
  guessed); 0 when the backend gave none;
* ``choice_p``: the probability of the weakest closed choice (tool or text, which tool); 1
  when the answer made none;
* ``tool_call``: 1 for a tool call, 0 for text; ``calls``: log(1 + the number of calls);
* ``optional``: log(1 + the number of optional arguments the calls set). Measured on BFCL
  simple_python with copy-constrained decoding: 30% of answers that set one are right, 49% of
  those that set none (a small model fills what it was not asked for);
* ``valid``: 1 when the answer honours the tools contract (offered tool, arguments that parse
  and validate, ``tool_choice`` respected, not a repeat of an earlier call);
* ``finished``: 1 when decoding ended on its own (not at ``max_tokens``, not stopped early);
* ``tokens``: log(1 + output tokens);
* ``copied``: the share of the answer's values (ids, names, numbers, dates:
  ``milliwatt.quality.answer_values``) that the context holds; 1 when it states none;
  ``invented``: log(1 + the number it does not hold);
* ``unused``: the share of the values of the latest user message that the answer does not
  use ("in red", "in km/h": a small model drops what it was asked for);
* ``reused``: log(1 + the times an argument value is used beyond the times the context writes
  it). Copying the same number into two arguments is a small model's typical slip; on BFCL
  simple_python all 55 answers that did so were wrong ("3, 3 and 3" may fill three).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

from .gates import probability_quantile, repeated_call, tool_call_problem
from .quality import answer_values, context_values, json_leaves
from .tier import Completion
from .types import Step, content_text

FEATURES = (
    "p_q00", "p_q10", "p_q25", "p_q50", "choice_p", "tool_call", "calls", "optional", "valid", "finished", "tokens",
    "copied", "invented", "unused", "reused",
)  # fmt: skip
FEATURES_VERSION = "local-3"


def answer_features(step: Step, completion: Completion) -> dict[str, float]:
    lps = completion.token_logprobs
    msg = completion.message
    out = {f"p_q{round(q * 100):02d}": probability_quantile(lps, q) if lps else 0.0 for q in (0.0, 0.1, 0.25, 0.5)}
    out["choice_p"] = math.exp(min(completion.choice_logprobs)) if completion.choice_logprobs else 1.0
    calls = msg.get("tool_calls") or []
    out["tool_call"] = 1.0 if calls else 0.0
    out["calls"] = math.log1p(len(calls))
    out["optional"] = math.log1p(sum(_optional_arguments(step, c) for c in calls))
    out["valid"] = 0.0 if (tool_call_problem(step, msg) or repeated_call(step, msg)) else 1.0
    stopped = completion.extra.get("aborted") or completion.extra.get("finish_reason") == "length"
    out["finished"] = 0.0 if stopped else 1.0
    out["tokens"] = math.log1p(completion.output_tokens)
    values = answer_values(msg)
    missing = values - context_values(step.messages) if values else set()
    out["copied"] = 1.0 - len(missing) / len(values) if values else 1.0
    out["invented"] = math.log1p(len(missing))
    asked = context_values(m for m in step.messages[-1:] if m["role"] == "user")
    out["unused"] = len(asked - values) / len(asked) if asked else 0.0
    out["reused"] = math.log1p(_reused(step, calls))
    return out


def _arguments(call: dict) -> dict:
    try:
        args = json.loads((call.get("function") or {}).get("arguments") or "{}")
    except (TypeError, ValueError):
        return {}
    return args if isinstance(args, dict) else {}


def _reused(step: Step, calls: list[dict]) -> int:
    uses = Counter(str(v) for call in calls for v in json_leaves(_arguments(call)) if str(v).strip())
    repeated = {v: n for v, n in uses.items() if n > 1}
    if not repeated:
        return 0
    text = "\n".join(content_text(m.get("content")) for m in step.messages)
    excess = 0
    for value, n in repeated.items():
        written = len(re.findall(rf"(?<![\w.]){re.escape(value)}(?!\w)", text))
        excess += max(n - max(written, 1), 0)
    return excess


def _optional_arguments(step: Step, call: dict) -> int:
    fn = call.get("function") or {}
    tool = step.tool(fn.get("name")) if isinstance(fn.get("name"), str) else None
    args = _arguments(call)
    if tool is None:
        return 0
    required = set((tool["function"].get("parameters") or {}).get("required") or ())
    return sum(name not in required for name in args)
