"""What a rule pack would have done on recorded traffic: ``milliwatt rules what-if``.

Every recorded step (a ledger's steps, or a trace file's) is matched against the rules, as
the rules tier would have matched it. For each rule: how many steps it would have answered,
how many of those answers agree with the answer actually given (judged by the replay's own
measures, ``milliwatt.quality``: exact and proxy kept apart), its disagreement rate with a
Clopper-Pearson upper bound (a rule that disagrees on more than 2% of the steps it answers
is flagged ``BAD``), the energy it would have saved (the step's recorded energy minus the
rule's own measured CPU cost) and which tiers answered those steps. Route rules are routing
decisions: counted, never judged.

Open loop, like the replay: each step is matched with the context it was recorded with.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milliwatt.calibration import clopper_pearson_upper
from milliwatt.energy import CpuCoefficients, CpuTimer, cpu_energy
from milliwatt.errors import InvalidRequestError
from milliwatt.types import Message, Step, StepMeta

from .engine import Rule, RuleSet

BAD_RATE = 0.02  # a rule that disagrees more often than this with the answer given is a bad rule
CONFIDENCE = 0.95


# --------------------------------------------------------------------------- recorded steps


@dataclass(frozen=True)
class RecordedStep:
    """One recorded step: what the agent asked, the answer it got and what that answer cost."""

    id: str
    session: str | None
    step: Step
    answer: Message  # the answer actually given: what a rule's answer is judged against
    tier: str  # the tier that gave it ("remote" for a trace's recorded model)
    energy_wh: tuple[float, float, float] | None  # low, point, high; None when not known
    reference: dict[str, Any] | None = None  # a trace's reference (``milliwatt.quality.judge``)


def steps_from_ledger(ledger: str | os.PathLike[str]) -> list[RecordedStep]:
    """The answered steps of a ledger (errors and cancelled steps have no answer to compare)."""
    from milliwatt.ledger.reader import ledger_steps

    out = []
    for row in ledger_steps(ledger):
        if row["tier"] in ("error", "cancelled") or not row.get("response"):
            continue
        request = dict(row["request"])
        meta = StepMeta(
            session_id=row.get("session_id"), run_id=row.get("run_id"), tenant=row.get("tenant"),
            agent=row.get("agent"), user=row.get("user_id"), extra=dict(row.get("meta") or {}),
        )  # fmt: skip
        messages = request.pop("messages")
        tools, tool_choice = request.pop("tools", None), request.pop("tool_choice", None)
        response_format = request.pop("response_format", None)
        request.pop("user", None)
        try:
            step = Step.create(messages, tools=tools, tool_choice=tool_choice, response_format=response_format, options=request, meta=meta)
        except InvalidRequestError:  # an option this version does not know: the messages are what rules read
            step = Step.create(messages, tools=tools, tool_choice=tool_choice, response_format=response_format, meta=meta)
        energy = (row["energy_wh_low"], row["energy_wh_point"], row["energy_wh_high"])
        out.append(RecordedStep(row["id"], row.get("session_id"), step, row["response"], row["tier"], energy))
    return out


def steps_from_trace(path: str | os.PathLike[str], *, tools: str | os.PathLike[str] | None = None, format: str | None = None) -> list[RecordedStep]:
    """The steps of a trace file (``milliwatt.evaluation.importers.load_trace``): the recorded
    answer is the reference, and its energy is what the accountant charges the model that
    recorded it for that step (the replay's baseline: its tokenizer, its prompt cache)."""
    from milliwatt.accounting import Accountant
    from milliwatt.evaluation.importers import load_trace
    from milliwatt.evaluation.replay import energy_model_for

    trace = load_trace(path, format=format, tools=tools)
    accountants: dict[str, Accountant | None] = {}
    out = []
    for s in trace.steps:  # in trace order: each session's prompt-cache prefix is followed
        if s.model not in accountants:
            try:
                accountants[s.model] = Accountant(energy_model_for(s.model))
            except ValueError:
                accountants[s.model] = None
        meta = StepMeta(session_id=s.session, agent=s.agent, tenant=s.tenant)
        step = Step.create(s.messages, tools=s.tools or None, tool_choice=s.tool_choice, meta=meta)
        accountant, energy = accountants[s.model], None
        if accountant is not None:
            e = accountant.baseline(step, s.answer).energy
            energy = (e.low_wh, e.point_wh, e.high_wh)
        out.append(RecordedStep(s.id, s.session, step, s.answer, "remote", energy, s.reference))
    return out


def load_steps(*, ledger: str | None = None, trace: str | None = None, tools: str | None = None) -> list[RecordedStep]:
    if (ledger is None) == (trace is None):
        raise ValueError("give exactly one of a ledger or a trace file")
    return steps_from_ledger(ledger) if ledger is not None else steps_from_trace(trace, tools=tools)  # type: ignore[arg-type]


def judge_answer(answer: Message, recorded: RecordedStep) -> Any:
    """The Quality of a rule's answer against the step's reference (a trace's) or, for a
    ledger, against the answer actually given."""
    from milliwatt.quality import agreement, judge

    if recorded.reference is not None:
        return judge(answer, recorded.reference, recorded.step.tools)
    return agreement(answer, recorded.answer)


# --------------------------------------------------------------------------- the report


@dataclass
class RuleFigures:
    """What one rule would have done."""

    rule: str  # "pack/id"
    action: str  # reply, refuse, tool_call, route
    path: str = ""
    line: int | None = None
    fired: int = 0
    exact: int = 0  # answers judged by an exact measure
    exact_agree: int = 0
    proxy: int = 0  # answers judged by the proxy (free text)
    proxy_agree: int = 0
    saved_wh: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # low, point, high
    unknown_energy: int = 0  # steps whose recorded energy is not known (not in saved_wh)
    rule_cpu_wh: float = 0.0  # point estimate of the rules' own CPU cost on the steps it answered
    from_tiers: Counter[str] = field(default_factory=Counter)
    routes_to: str | None = None
    disagreements: list[dict[str, str]] = field(default_factory=list)  # the first few, with why
    sessions: set[str] = field(default_factory=set)

    @property
    def judged(self) -> int:
        return self.exact + self.proxy

    @property
    def agree(self) -> int:
        return self.exact_agree + self.proxy_agree

    @property
    def disagree(self) -> int:
        return self.judged - self.agree

    @property
    def disagreement_rate(self) -> float | None:
        return self.disagree / self.judged if self.judged else None

    @property
    def disagreement_upper(self) -> float | None:
        return clopper_pearson_upper(self.disagree, self.judged, CONFIDENCE) if self.judged else None

    @property
    def bad(self) -> bool:
        rate = self.disagreement_rate
        return rate is not None and rate > BAD_RATE

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "action": self.action, "path": self.path, "line": self.line,
            "fired": self.fired, "sessions": len(self.sessions),
            "agree": self.agree, "disagree": self.disagree,
            "exact": {"judged": self.exact, "agree": self.exact_agree},
            "proxy": {"judged": self.proxy, "agree": self.proxy_agree},
            "disagreement_rate": self.disagreement_rate,
            "disagreement_upper_95": self.disagreement_upper,
            "bad": self.bad,
            "saved_wh": dict(zip(("low", "point", "high"), self.saved_wh)),
            "unknown_energy_steps": self.unknown_energy,
            "rule_cpu_wh": self.rule_cpu_wh,
            "from_tiers": dict(self.from_tiers),
            "routes_to": self.routes_to,
            "disagreements": self.disagreements,
        }  # fmt: skip


@dataclass
class WhatIf:
    steps: int
    rules: list[RuleFigures]  # the rules that fired, in order of first match
    silent: list[str]  # rules that never fired

    @property
    def answering(self) -> list[RuleFigures]:
        return [r for r in self.rules if r.routes_to is None]

    @property
    def routing(self) -> list[RuleFigures]:
        return [r for r in self.rules if r.routes_to is not None]

    def totals(self) -> dict[str, Any]:
        ans = self.answering
        judged = sum(r.judged for r in ans)
        agree = sum(r.agree for r in ans)
        return {
            "steps": self.steps,
            "answered": sum(r.fired for r in ans),
            "agree": agree,
            "disagree": judged - agree,
            "exact": {"judged": sum(r.exact for r in ans), "agree": sum(r.exact_agree for r in ans)},
            "proxy": {"judged": sum(r.proxy for r in ans), "agree": sum(r.proxy_agree for r in ans)},
            "disagreement_rate": (judged - agree) / judged if judged else None,
            "routed": sum(r.fired for r in self.routing),
            "saved_wh": {k: sum(r.saved_wh[i] for r in ans) for i, k in enumerate(("low", "point", "high"))},
            "bad_rules": [r.rule for r in ans if r.bad],
        }

    def to_json(self) -> dict[str, Any]:
        return {"totals": self.totals(), "rules": [r.to_json() for r in self.rules], "silent": self.silent,
                "bad_rate": BAD_RATE, "confidence": CONFIDENCE}  # fmt: skip

    def format(self) -> str:
        return format_what_if(self)


def _action_name(rule: Rule) -> str:
    from .actions import Reply, Route, ToolCall

    a = rule.action
    if isinstance(a, Route):
        return "route"
    if isinstance(a, ToolCall):
        return "tool_call"
    if isinstance(a, Reply):
        return "refuse" if a.label == "refusal" else "reply"
    return type(a).__name__.lower()


def what_if(rules: RuleSet, steps: Iterable[RecordedStep], *, keep_disagreements: int = 3, cpu: CpuCoefficients | None = None) -> WhatIf:
    """Match every step against ``rules``; judge and account each rule's answers (module doc)."""
    cpu = cpu or CpuCoefficients.of()
    figures: dict[str, RuleFigures] = {}
    n = 0
    for rec in steps:
        n += 1
        timer = CpuTimer("thread")
        with timer.measure():
            evaluation = rules.evaluate(rec.step)
        m = evaluation.match
        if m is None:
            continue
        cost = cpu_energy(timer.seconds, cpu)
        name = m.rule.qualified_id
        f = figures.get(name)
        if f is None:
            f = figures[name] = RuleFigures(name, _action_name(m.rule), m.rule.path, m.rule.line)
        f.fired += 1
        f.from_tiers[rec.tier] += 1
        if rec.session:
            f.sessions.add(rec.session)
        if m.skip_to is not None or m.message is None:
            f.routes_to = m.skip_to
            continue
        q = judge_answer(m.message, rec)
        if q.kind == "exact":
            f.exact += 1
            f.exact_agree += int(q.agrees)
        else:
            f.proxy += 1
            f.proxy_agree += int(q.agrees)
        if not q.agrees and len(f.disagreements) < keep_disagreements:
            f.disagreements.append({"step": rec.id, "why": q.detail})
        f.rule_cpu_wh += cost.point_wh
        if rec.energy_wh is None:
            f.unknown_energy += 1
        else:
            low, point, high = rec.energy_wh
            f.saved_wh[0] += low - cost.high_wh
            f.saved_wh[1] += point - cost.point_wh
            f.saved_wh[2] += high - cost.low_wh
    fired = list(figures.values())
    silent = [r.qualified_id for r in rules.rules if r.qualified_id not in figures]
    return WhatIf(n, fired, silent)


# --------------------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _wh(x: float) -> str:
    return f"{x:.3g}"


def format_what_if(w: WhatIf) -> str:
    lines = [f"what-if on {w.steps} recorded steps (a rule whose answers disagree with the answer given on more than "
             f"{100 * BAD_RATE:g}% of the steps it answers is BAD; 'upper' is the {100 * CONFIDENCE:g}% Clopper-Pearson upper bound)"]  # fmt: skip
    lines.append("")
    header = ("rule", "action", "fired", "agree", "exact", "proxy", "disagree", "rate", "upper", "saved Wh (low/point/high)", "from tiers", "")
    rows = []
    for r in w.answering:
        rows.append((
            r.rule, r.action, str(r.fired), str(r.agree), f"{r.exact_agree}/{r.exact}", f"{r.proxy_agree}/{r.proxy}",
            str(r.disagree), _pct(r.disagreement_rate), _pct(r.disagreement_upper),
            "/".join(_wh(x) for x in r.saved_wh) + (f" (+{r.unknown_energy} unknown)" if r.unknown_energy else ""),
            ", ".join(f"{t} {c}" for t, c in r.from_tiers.most_common()), "BAD" if r.bad else "",
        ))  # fmt: skip
    if rows:
        lines += _table(header, rows)
    else:
        lines.append("no answering rule fired")
    if w.routing:
        lines += ["", "routing decisions (not judged):"]
        lines += _table(("rule", "routes to", "fired", "from tiers"),
                        [(r.rule, r.routes_to or "", str(r.fired), ", ".join(f"{t} {c}" for t, c in r.from_tiers.most_common())) for r in w.routing])  # fmt: skip
    for r in w.answering:
        for d in r.disagreements:
            lines.append(f"  {r.rule} disagrees on step {d['step']}: {d['why']}")
    t = w.totals()
    lines += [
        "",
        f"total: rules would answer {t['answered']} of {t['steps']} steps; {t['agree']} agree, {t['disagree']} disagree "
        f"({_pct(t['disagreement_rate'])}; exact {t['exact']['agree']}/{t['exact']['judged']}, proxy {t['proxy']['agree']}/{t['proxy']['judged']}); "
        f"{t['routed']} routed; energy saved {'/'.join(_wh(t['saved_wh'][k]) for k in ('low', 'point', 'high'))} Wh (low/point/high)",
    ]  # fmt: skip
    if t["bad_rules"]:
        lines.append(f"BAD rules (disagree on more than {100 * BAD_RATE:g}%): {', '.join(t['bad_rules'])}")
    if w.silent:
        lines.append(f"never fired: {', '.join(w.silent)}")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def write_json(w: WhatIf, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(w.to_json(), indent=2) + "\n", encoding="utf-8")
