"""The local tier's calibration data (issue 9): a replay in observe mode records every local
answer with its features and the replay's verdict on it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from milliwatt.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.slow
def test_an_observing_replay_records_every_local_answer_with_its_verdict(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"tiers": ["local", "remote"], "local": {"observe": True, "tool_calls": "any"}}))
    ledger = tmp_path / "l.db"
    args = ["replay", str(FIXTURES / "bfcl_mini.jsonl"), "--config", str(config), "--ledger", str(ledger), "--quiet"]
    assert main(args) == 0
    db = sqlite3.connect(ledger)
    assert {t for (t,) in db.execute("select tier from steps")} == {"remote"}  # observing accepts nothing
    local = [json.loads(e) for (e,) in db.execute("select evidence_json from attempts where tier = 'local'")]
    steps = db.execute("select count(*) from steps").fetchone()[0]
    assert len(local) == steps > 0
    for e in local:
        assert e["features_version"] == FEATURES_VERSION and isinstance(e["would_accept"], bool)
        assert e["quality"]["metric"] == "bfcl_ast" and isinstance(e["quality"]["agrees"], bool)
        assert e["decoding"] == "copy"  # the default
    # ... which calibrates a gate file the local tier then starts with (few answers: it
    # certifies nothing, and says so rather than accepting on too little evidence).
    gate_file = tmp_path / "gate.json"
    assert main(["calibrate", str(ledger), "--out", str(gate_file)]) == 0
    gate = load_local_gate(gate_file)
    assert gate.decoding == "copy" and gate.threshold.score is None


# --------------------------------------------------------------------------- the calibrated gate

import math  # noqa: E402
import random  # noqa: E402

from milliwatt import Energy  # noqa: E402
from milliwatt.calibration import CalibrationError  # noqa: E402
from milliwatt.config import load_settings  # noqa: E402
from milliwatt.errors import ConfigError  # noqa: E402
from milliwatt.ids import new_step_id  # noqa: E402
from milliwatt.ledger import Ledger  # noqa: E402
from milliwatt.local_features import FEATURES_VERSION  # noqa: E402
from milliwatt.local_gate import CalibratedGate, LabelledAnswer, LocalGate, fit_local_gate, load_local_gate  # noqa: E402
from milliwatt.tier import Completion  # noqa: E402
from milliwatt.types import Attempt, StepMeta, StepRecord  # noqa: E402
from milliwatt import Step  # noqa: E402


def features(p: float, copied: float) -> dict[str, float]:
    return {"p_q00": p, "p_q10": p, "p_q25": p, "p_q50": p, "choice_p": p, "tool_call": 1.0, "calls": math.log(2),
            "optional": 0.0, "valid": 1.0, "finished": 1.0, "tokens": 2.0, "copied": copied,
            "invented": 0.0 if copied == 1.0 else 1.0}  # fmt: skip


def traffic(n: int, seed: int) -> list[LabelledAnswer]:
    """Answers whose odds of being right rise with confidence and with copying, as a small model's do."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, copied = rng.random(), float(rng.random() < 0.6)
        right = rng.random() < 1 / (1 + math.exp(-(20 * (p - 0.7) + 5 * copied - 3)))
        out.append(LabelledAnswer(f"s{seed}-{i}", features(p, copied), right))
    return out


def test_the_gate_holds_its_precision_on_answers_it_was_not_fitted_on():
    gate = fit_local_gate(traffic(4000, 1), precision=0.95, fitted_on="synthetic")
    t = gate.threshold
    assert t.score is not None and t.upper <= 0.05 and 0 < t.coverage < 1
    fresh = traffic(4000, 2)
    accepted = [a for a in fresh if gate.accepts(a.features)[0]]
    assert len(accepted) > 100 and sum(not a.right for a in accepted) / len(accepted) <= 0.05
    # A copied value counts: the same confidence without it is not accepted.
    assert gate.accepts(features(0.9, 1.0))[0] and not gate.accepts(features(0.9, 0.0))[0]


def test_too_little_data_certifies_nothing_and_no_data_is_an_error():
    small = fit_local_gate(traffic(60, 3), precision=0.98, fitted_on="synthetic")
    assert small.threshold.score is None  # 30 held-out answers cannot show 98% at 95% confidence
    assert not small.accepts(features(1.0, 1.0))[0]
    with pytest.raises(CalibrationError, match="two sessions or more"):
        fit_local_gate(traffic(1, 4), fitted_on="synthetic")


def test_a_gate_file_round_trips_and_is_recertified_for_another_precision(tmp_path):
    gate = fit_local_gate(traffic(4000, 1), precision=0.95, fitted_on="synthetic")
    path = tmp_path / "g.json"
    gate.save(path)
    again = load_local_gate(path, 0.95)
    assert again.id == gate.id and again.threshold == gate.threshold
    stricter = load_local_gate(path, 0.99)
    assert stricter.threshold.target_error == pytest.approx(0.01)
    assert stricter.threshold.score is None or stricter.threshold.score >= gate.threshold.score


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "local gate file not found"), ("{not json", "not valid JSON"), ('{"format": "other"}', "not a milliwatt local gate")],
)
def test_a_missing_or_corrupt_gate_file_stops_the_start_up_naming_it(tmp_path, content, problem):
    path = tmp_path / "g.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=problem) as e:
        load_local_gate(path)
    assert str(path) in str(e.value)


def test_a_gate_holds_only_for_the_decoding_it_was_calibrated_on(tmp_path):
    from dataclasses import replace

    from milliwatt.registry import build_tier

    copied = [replace(a, decoding="copy") for a in traffic(400, 1)]
    gate = fit_local_gate(copied, precision=0.9, fitted_on="synthetic")
    assert gate.decoding == "copy"
    path = tmp_path / "g.json"
    gate.save(path)
    assert load_local_gate(path, 0.9, decoding="copy").id == gate.id
    with pytest.raises(ConfigError, match="calibrated on answers with copy tool arguments") as e:
        load_local_gate(path, 0.9, decoding="free")
    assert str(path) in str(e.value) and "local.copy_values" in str(e.value)
    with pytest.raises(ConfigError, match="copy tool arguments"):
        build_tier("local", load_settings({"local": {"gate": str(path), "precision": 0.9, "copy_values": False}}))
    mixed = copied[:200] + [replace(a, decoding="free") for a in copied[200:]]
    with pytest.raises(CalibrationError, match="decoded copy and free"):
        fit_local_gate(mixed, fitted_on="synthetic")


def test_a_configured_gate_file_is_read_when_the_local_tier_is_built(tmp_path):
    from milliwatt.registry import build_tier

    with pytest.raises(ConfigError, match="local gate file not found"):
        build_tier("local", load_settings({"local": {"gate": str(tmp_path / "missing.json")}}))


def test_the_calibrated_gate_refuses_what_can_never_stand_and_records_its_score():
    gate = CalibratedGate(fit_local_gate(traffic(4000, 1), precision=0.95, fitted_on="synthetic"))
    tool = {"type": "function", "function": {"name": "get_user", "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}}}}
    step = Step.create([{"role": "user", "content": "Look up mia_li_3668"}], tools=[tool])
    call = {"id": "c", "type": "function", "function": {"name": "get_user", "arguments": json.dumps({"user_id": "mia_li_3668"})}}
    good = Completion({"role": "assistant", "content": None, "tool_calls": [call]}, "m", 10, 5, token_logprobs=(-0.001,) * 5,
                      choice_logprobs=(-0.001,), extra={"finish_reason": "stop"})  # fmt: skip
    d = gate.check(step, good)
    assert d.accept and d.evidence["gate"] == gate.gate.id and d.reason.startswith(f"calibrated gate {gate.gate.id}: score")
    cut = Completion(good.message, "m", 10, 5, token_logprobs=(-0.001,) * 5, extra={"finish_reason": "length"})
    refused = gate.check(step, cut)
    assert not refused.accept and refused.reason == "hit max_tokens before finishing" and "score" in refused.evidence


def _answer_record(session: str, right: bool, p: float, at: float) -> StepRecord:
    answer = {"role": "assistant", "content": "ok"}
    local = Attempt("local", "passed", "observe", p, "m", 10, 2, 0.1, Energy.zero(), 0.0,
                    evidence={"answer": answer, "features": features(p, 1.0), "features_version": FEATURES_VERSION,
                              "would_accept": True, "quality": {"metric": "bfcl_ast", "kind": "exact", "agrees": right}})  # fmt: skip
    remote = Attempt("remote", "answered", "ok", None, "gpt-4o", 10, 2, 0.1, Energy.zero(), 0.0)
    return StepRecord(new_step_id(at), at, StepMeta(session_id=session), "remote", "gpt-4o", None, 10, 10, 2, 0.2, Energy.zero(),
                      0.0, Energy.zero(), 0.0, "openai/gpt-4o", (local, remote), {"messages": []}, answer)  # fmt: skip


def test_calibrate_fits_a_gate_file_from_ledgers_pooled(tmp_path, capsys):
    ledgers = [tmp_path / "a.db", tmp_path / "b.db"]  # e.g. the replays of two workloads
    rng = random.Random(5)
    for k, ledger in enumerate(ledgers):
        with Ledger(ledger) as writer:
            for i in range(450):
                p = rng.random()
                writer.write_sync(_answer_record(f"s{k}-{i}", rng.random() < (0.998 if p > 0.7 else 0.4), p, 1.7e9 + i))
    out = tmp_path / "gate.json"
    assert main(["calibrate", *map(str, ledgers), "--target", "0.95", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "900 labelled local answers" in printed and "held-out answers accepted" in printed
    gate = LocalGate.load(out)
    assert gate.threshold.score is not None and gate.threshold.upper <= 0.05
    assert gate.fitted_on.startswith("a.db, b.db: 900 labelled local answers")
    assert main(["calibrate", str(tmp_path / "none.db"), "--out", str(out)]) == 2  # not a ledger: a clean error


# --------------------------------------------------------------------------- live shadow checks

from milliwatt import Milliwatt  # noqa: E402
from milliwatt.local_gate import LiveChecks  # noqa: E402
from milliwatt.model_tier import ModelTier  # noqa: E402
from milliwatt.reports.summary import summarize  # noqa: E402
from milliwatt.testing import ScriptedTier  # noqa: E402
from milliwatt.tier import ModelBackend  # noqa: E402


class RecordedAnswer(ModelBackend):
    """A backend that gives one recorded completion: what the real model returned is not the
    subject here, the wiring of its verdicts is (the real model: test_local.py)."""

    model = "recorded"

    def __init__(self, completion: Completion) -> None:
        self.completion = completion

    async def complete(self, step, *, abort=None):  # noqa: ANN001, ANN201
        return self.completion


def test_live_checks_suspend_only_when_precision_is_shown_below_target():
    ok = LiveChecks(0.95)
    for _ in range(40):
        ok.add(True)
    ok.add(False)
    assert not ok.suspended
    bad = LiveChecks(0.95)
    for i in range(30):
        bad.add(i % 3 == 0)
        assert bad.suspended == (bad.checked >= LiveChecks.MIN_CHECKS)  # 1 in 3 agreeing: far below 95% once counted


@pytest.mark.asyncio
async def test_checked_local_answers_report_live_precision_and_a_failing_gate_suspends_itself(tmp_path):
    gate = CalibratedGate(fit_local_gate(traffic(4000, 1), precision=0.95, fitted_on="synthetic"))
    tool = {"type": "function", "function": {"name": "get_user", "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}}}}
    call = {"id": "c", "type": "function", "function": {"name": "get_user", "arguments": json.dumps({"user_id": "mia_li_3668"})}}
    confident = Completion({"role": "assistant", "content": None, "tool_calls": [call]}, "m", 10, 5, token_logprobs=(-0.001,) * 5,
                           choice_logprobs=(-0.001,), cpu_seconds=0.01, extra={"finish_reason": "stop"})  # fmt: skip
    local = ModelTier("local", RecordedAnswer(confident), gate=gate, shadow_share=1.0)
    remote = ScriptedTier("remote", lambda s: {"role": "assistant", "content": "I need your user id first."})
    ledger = tmp_path / "l.db"
    from milliwatt.ledger import Ledger as _Ledger

    tiers_seen = []
    async with Milliwatt([local, remote], ledger=_Ledger(ledger)) as mw:
        for i in range(LiveChecks.MIN_CHECKS + 2):
            result = await mw.step([{"role": "user", "content": f"Look up mia_li_3668 ({i})"}], tools=[tool], session_id=f"s{i}")
            tiers_seen.append(result.tier)
            await asyncio.sleep(0.05)  # let the shadow check come back before the next step
    assert tiers_seen[0] == "local" and tiers_seen[-1] == "remote"  # the gate suspended itself
    assert gate.live.suspended and gate.live.agreed == 0 and gate.live.checked >= LiveChecks.MIN_CHECKS
    checks = summarize(ledger)["shadow_checks"]["local"]
    assert checks["agreed"] == 0 and checks["checked"] == gate.live.checked and checks["precision_high"] < 0.2
