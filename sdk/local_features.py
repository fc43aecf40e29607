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
* ``tool_call``: 1 for a tool call, 0 for text;
* ``valid``: 1 when the answer honours the tools contract (offered tool, arguments that parse
  and validate, ``tool_choice`` respected, not a repeat of an earlier call);
* ``finished``: 1 when decoding ended on its own (not at ``max_tokens``, not stopped early);
* ``tokens``: log(1 + output tokens);
* ``copied``: the share of the answer's values (ids, names, numbers, dates:
  ``milliwatt.quality.answer_values``) that the context holds; 1 when it states none;
  ``invented``: log(1 + the number it does not hold).
"""

from __future__ import annotations

import math

from .gates import probability_quantile, repeated_call, tool_call_problem
from .quality import answer_values, context_values
from .tier import Completion
from .types import Step

FEATURES = ("p_q00", "p_q10", "p_q25", "p_q50", "choice_p", "tool_call", "valid", "finished", "tokens", "copied", "invented")
FEATURES_VERSION = "local-1"


def answer_features(step: Step, completion: Completion) -> dict[str, float]:
    lps = completion.token_logprobs
    msg = completion.message
    out = {f"p_q{round(q * 100):02d}": probability_quantile(lps, q) if lps else 0.0 for q in (0.0, 0.1, 0.25, 0.5)}
    out["choice_p"] = math.exp(min(completion.choice_logprobs)) if completion.choice_logprobs else 1.0
    out["tool_call"] = 1.0 if msg.get("tool_calls") else 0.0
    out["valid"] = 0.0 if (tool_call_problem(step, msg) or repeated_call(step, msg)) else 1.0
    stopped = completion.extra.get("aborted") or completion.extra.get("finish_reason") == "length"
    out["finished"] = 0.0 if stopped else 1.0
    out["tokens"] = math.log1p(completion.output_tokens)
    values = answer_values(msg)
    missing = values - context_values(step.messages) if values else set()
    out["copied"] = 1.0 - len(missing) / len(values) if values else 1.0
    out["invented"] = math.log1p(len(missing))
    return out
