"""How easily does a generic reply pass the free-text proxy? (docs/replay.md, "How hard is the
free-text proxy to flatter")

For every free-text step of a recorded trace, in replay order, ask: does the recorded answer of
some earlier free-text step agree with this step's reference? Such an answer is what a cache
could serve for it without knowing anything of this step. Counted twice: against any earlier
answer (the issue's 84%), and against earlier answers of another task only (tau: the task
number of ``tau/trial<T>/task<N>``, so the same task in another trial does not count; other
formats: another session). Prints the share of steps with such an earlier answer, under token
F1 alone (the rule before the value check) and under the judge as it is now
(``milliwatt.quality.text_match``).

    .venv/bin/python benchmarks/text_proxy_flattery.py ../shared/data/tau_airline/trajectories.json
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

from milliwatt.evaluation.importers import load_trace
from milliwatt.quality import TEXT_F1_THRESHOLD, _tokens, salient_values, text_match
from milliwatt.types import content_text


def _group(session: str) -> str:
    m = re.fullmatch(r"tau/trial\d+/(task\d+)", session)
    return m[1] if m else session


def _f1(a: Counter[str], na: int, r: Counter[str], nr: int) -> float:
    common = sum((a & r).values())
    if not na or not nr:
        return float(na == nr)
    return 0.0 if common == 0 else 2 * common / (na + nr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("file", help="a replay file (tau, bfcl, gsm8k or trace)")
    p.add_argument("--tools", help="tau: the tool schemas (default: tools.json next to FILE)")
    args = p.parse_args(argv)
    steps = [s for s in load_trace(args.file, tools=args.tools).steps if s.reference["kind"] == "text"]
    texts = [content_text(s.answer.get("content")) for s in steps]
    bags = [Counter(_tokens(t)) for t in texts]
    sizes = [sum(b.values()) for b in bags]
    values = [salient_values(t) for t in texts]
    groups = [_group(s.session) for s in steps]
    n = len(steps)
    with_values = sum(bool(v) for v in values)
    print(f"{n} free-text steps in {args.file}, {with_values} of whose references carry a salient value")
    for name, unrelated in (
        ("any earlier free-text answer", lambda i, j: True),
        ("an earlier free-text answer of another task", lambda i, j: groups[i] != groups[j]),
    ):
        f1_only, judged = Counter[bool](), Counter[bool]()  # by: does the reference carry a value?
        for i, step in enumerate(steps):
            close = [j for j in range(i) if unrelated(i, j) and _f1(bags[j], sizes[j], bags[i], sizes[i]) >= TEXT_F1_THRESHOLD]
            f1_only[bool(values[i])] += bool(close)
            # The value check only ever takes agreement away: only the F1 passes need the judge.
            judged[bool(values[i])] += any(
                values[j] == values[i] and text_match(steps[j].answer, step.reference["text"]).agrees for j in close
            )  # fmt: skip
        print(f"reference agreed by {name}:")
        for rule, c in ((f"token F1 >= {TEXT_F1_THRESHOLD} alone (the rule before)", f1_only),
                        ("token F1 and the same salient values (text_token_f1 now)", judged)):  # fmt: skip
            print(f"  {rule}: {c.total()} ({100 * c.total() / n:.1f}%); of the {with_values} references with a value: "
                  f"{c[True]} ({100 * c[True] / with_values:.1f}%)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
