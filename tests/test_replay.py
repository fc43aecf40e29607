"""`milliwatt replay`: the importers, bad input stopped before any step runs, the replay
provider behind the real litellm path, and a small replay through the real cascade."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from milliwatt.cli import main
from milliwatt.errors import RemoteBadRequest
from milliwatt.evaluation.importers import TraceError, detect_format, load_trace
from milliwatt.types import Step, StepMeta

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SUPPORT = FIXTURES / "support_trace.jsonl"


# --------------------------------------------------------------------------- importers


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("tau_mini.json", "tau"), ("bfcl_mini.jsonl", "bfcl"), ("gsm8k_mini.csv", "gsm8k"), ("support_trace.jsonl", "trace")],
)
def test_format_is_detected_from_content(name, fmt):
    assert detect_format(FIXTURES / name) == fmt


def test_tau_steps_run_trial_by_trial_with_export_quirks_normalised():
    trace = load_trace(FIXTURES / "tau_mini.json", tools=FIXTURES / "tau_tools.json")
    # The file lists trial 1 first; replays take every task of trial 0, then trial 1.
    assert [s.id for s in trace.steps] == [
        "tau-trial0-task0-m2", "tau-trial0-task0-m4", "tau-trial0-task0-m6",
        "tau-trial0-task1-m2", "tau-trial0-task1-m4", "tau-trial0-task1-m6",
        "tau-trial1-task0-m2", "tau-trial1-task0-m4", "tau-trial1-task0-m6",
    ]  # fmt: skip
    quirky = trace.steps[7]  # tool_calls as a Python repr string and content 'None'
    assert quirky.answer["content"] is None
    assert quirky.answer["tool_calls"][0]["function"] == {"name": "get_user_details", "arguments": '{"user_id": "mia_li_3668"}'}
    assert quirky.reference == {"kind": "tool_call", "calls": [{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}]}
    assert [m["role"] for m in quirky.messages] == ["system", "user", "assistant", "user"]
    last = trace.steps[8]
    assert last.messages[-1]["role"] == "tool" and last.reference["kind"] == "text"
    assert {(s.model, s.label, s.session) for s in trace.steps[6:]} == {("gpt-4o", "replay", "tau/trial1/task0")}
    assert len(trace.steps[0].tools) == 2


def test_bfcl_schemas_become_json_schema_and_the_oracle_answers_the_ground_truth():
    steps = load_trace(FIXTURES / "bfcl_mini.jsonl").steps  # answers found next to the file
    params = steps[1].tools[0]["function"]["parameters"]
    assert params["type"] == "object" and params["properties"]["budget"]["type"] == "object"
    assert "type" not in params["properties"]["anything"]  # BFCL's "any"
    assert steps[0].tools[0]["function"]["parameters"]["properties"]["height"]["type"] == "number"
    args = [json.loads(s.answer["tool_calls"][0]["function"]["arguments"]) for s in steps]
    # First acceptable value of each argument; "" first means the argument may be left out.
    assert args == [{"base": 10, "height": 5.0}, {"location": "Austin, TX", "budget": {"min": 300000, "max": 400000}}]
    assert {(s.label, s.model) for s in steps} == {("oracle", "gpt-4o")}
    assert steps[0].reference["kind"] == "bfcl"


def test_gsm8k_rows_become_one_user_turn_with_the_strong_models_answer():
    steps = load_trace(FIXTURES / "gsm8k_mini.csv").steps
    assert [s.id for s in steps] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert steps[1].messages == [{"role": "user", "content": "A car costs $1,000 per month. What does it cost over a year?"}]
    assert steps[1].answer["content"].endswith("$12,000.00.") and steps[1].model == "gpt-4-1106-preview"
    assert steps[1].reference == {"kind": "gsm8k", "answer": "12,000", "recorded_correct": False}


def test_a_saved_trace_reads_back_as_the_same_steps(tmp_path):
    from milliwatt.evaluation.replay import write_trace

    steps = load_trace(FIXTURES / "tau_mini.json", tools=FIXTURES / "tau_tools.json").steps
    write_trace(steps, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl").steps == steps


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_the_shared_workloads_import_whole():
    tau = load_trace(SHARED / "tau_airline" / "trajectories.json", tools=SHARED / "tau_airline" / "tools.json")
    assert len(tau.steps) == 1381 and tau.steps[0].session == "tau/trial0/task0" and tau.steps[-1].session == "tau/trial3/task24"
    assert len(load_trace(SHARED / "bfcl" / "simple_python.jsonl").steps) == 400
    assert len(load_trace(SHARED / "gsm8k" / "paired.csv").steps) == 660


# --------------------------------------------------------------------------- bad input


def _lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _good() -> dict:
    return json.loads(SUPPORT.read_text().splitlines()[0])


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([_good(), {**_good(), "id": "x2", "answer": None}], "line 2 (id x2): has no recorded answer"),
        ([{**_good(), "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}],
         "line 1 (id s1-1): tools[0].function.parameters: must be a JSON schema of type 'object'"),
        ([{**_good(), "answer": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}}],
         "line 1 (id s1-1): answer.tool_calls[0].function.arguments: is not valid JSON"),
        ([{**_good(), "reference": {"kind": "vibes"}}], "line 1 (id s1-1): reference: 'kind' must be one of"),
        ([_good(), _good()], "line 2 (id s1-1): duplicate step id"),
    ],
)  # fmt: skip
def test_bad_trace_records_are_named(tmp_path, records, message):
    path = _lines(tmp_path / "bad.jsonl", records)
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_a_file_in_no_format_is_refused(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text('{"hello": "world"}')
    with pytest.raises(TraceError, match=r"notes.json: is in none of the replay formats"):
        load_trace(path)


def test_tau_tools_that_do_not_parse_are_named(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text('[{"type": "function", "function": {"name": "f"}')
    with pytest.raises(TraceError, match=r"tools.json: is not valid JSON"):
        load_trace(FIXTURES / "tau_mini.json", tools=tools)
    tools.write_text('[{"type": "function", "function": {}}]')
    with pytest.raises(TraceError, match=r"tools.json: tools\[0\].function.name: must be a non-empty string"):
        load_trace(FIXTURES / "tau_mini.json", tools=tools)


def test_bfcl_request_without_ground_truth_is_named(tmp_path):
    requests = tmp_path / "req.jsonl"
    requests.write_text((FIXTURES / "bfcl_mini.jsonl").read_text())
    _lines(tmp_path / "answers.jsonl", [json.loads((FIXTURES / "bfcl_mini_answers.jsonl").read_text().splitlines()[0])])
    with pytest.raises(TraceError, match=r"req.jsonl: line 2 \(id simple_1\): has no recorded answer"):
        load_trace(requests, answers=tmp_path / "answers.jsonl")


def test_bad_input_stops_the_replay_before_any_step_or_summary(tmp_path, capsys):
    path = _lines(tmp_path / "bad.jsonl", [{**_good(), "id": f"ok{i}"} for i in range(3)] + [{**_good(), "id": "late", "answer": None}])
    ledger, out = tmp_path / "r.db", tmp_path / "r.json"
    assert main(["replay", str(path), "--ledger", str(ledger), "--json", str(out), "--quiet"]) == 2
    assert "bad.jsonl: line 4 (id late): has no recorded answer" in capsys.readouterr().err
    assert not ledger.exists() and not out.exists()


# --------------------------------------------------------------------------- the replay provider


@pytest.mark.asyncio(loop_scope="session")
async def test_the_remote_path_serves_recorded_answers_by_replay_id():
    from milliwatt.adapters import LiteLLMBackend
    from milliwatt.evaluation.replay_provider import PROVIDER, serving
    from milliwatt.model_tier import ModelTier

    answer = {"role": "assistant", "content": "Recorded.", "tool_calls": None}
    backend = LiteLLMBackend(f"{PROVIDER}/gpt-4o", label="replay", energy_model="openai/gpt-4o", max_retries=0)
    tier = ModelTier("remote", backend)
    step = Step.create([{"role": "user", "content": "Hi"}], meta=StepMeta(extra={"replay_id": "r1"}))
    with serving({"r1": answer}):
        result = await tier.attempt(step)
        assert result.message["content"] == "Recorded." and result.label == "replay" and result.model == "gpt-4o"
        assert result.input_tokens > 0 and result.output_tokens > 0 and result.cost_usd > 0  # priced as gpt-4o
        assert result.energy.method == "estimate" and "openai/gpt-4o" in result.energy.basis
        other = Step.create([{"role": "user", "content": "Hi"}], meta=StepMeta(extra={"replay_id": "nope"}))
        with pytest.raises(RemoteBadRequest, match="no recorded answer for replay id 'nope'"):
            await tier.attempt(other)


# --------------------------------------------------------------------------- the baseline's quality


def test_the_baseline_is_judged_per_kind_of_measure_never_mixed(tmp_path):
    from milliwatt.evaluation.replay import _add_baseline_quality

    good = _good()  # a text step whose recorded answer is its reference
    wrong_call = {
        **good, "id": "x2", "answer": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_order_status", "arguments": '{"order_id": "1"}'}}]},
        "reference": {"kind": "tool_call", "calls": [{"name": "get_order_status", "arguments": {"order_id": "2"}}]},
    }  # fmt: skip
    right_call = {**wrong_call, "id": "x3", "reference": {"kind": "tool_call", "calls": [
        {"name": "get_order_status", "arguments": {"order_id": "1"}}]}}  # fmt: skip
    steps = load_trace(_lines(tmp_path / "t.jsonl", [good, wrong_call, right_call])).steps
    wh = {"low": 1.0, "point": 2.0, "high": 4.0}
    summary = {
        "quality": {kind: {"energy_wh": {"cascade": wh, "baseline": wh}} for kind in ("exact", "proxy")},
        "energy_per_useful_answer_wh": {kind: {"cascade": None, "baseline": None} for kind in ("exact", "proxy")},
        "tokens_per_useful_answer": {kind: {"baseline": None, "baseline_tokens": 600} for kind in ("exact", "proxy")},
    }
    _add_baseline_quality(summary, steps)
    q = summary["quality"]
    assert (q["exact"]["baseline"], q["proxy"]["baseline"]) == (0.5, 1.0)
    assert "baseline" not in q and q["baseline_recorded"] is None
    # energy per useful answer: the kind's baseline energy over its agreeing recorded answers
    assert summary["energy_per_useful_answer_wh"]["exact"]["baseline"] == wh  # 1 of 2 agree
    assert summary["energy_per_useful_answer_wh"]["proxy"]["baseline"] == wh
    # tokens per useful answer likewise: 600 baseline tokens over 1 agreeing answer
    assert summary["tokens_per_useful_answer"]["exact"]["baseline"] == 600


# --------------------------------------------------------------------------- end to end

def _replay(tmp_path: Path, name: str, *extra: str) -> tuple[dict, list[tuple]]:
    from milliwatt.examples import SUPPORT_RULES

    # The support trace's greetings and order look-ups are for the demo's rule pack; no pack
    # is loaded by default.
    config = tmp_path / "milliwatt.yaml"
    # Its cache runs at a 10% bound, as the demo's does: at the default 2% the shipped gate
    # serves exact repeats only (docs/cache.md), and this trace's repeats are paraphrases.
    config.write_text(json.dumps({"rules": {"packs": [str(SUPPORT_RULES)]}, "cache": {"max_wrong": 0.10}}))
    ledger, out = tmp_path / f"{name}.db", tmp_path / f"{name}.json"
    args = ["replay", str(SUPPORT), "--config", str(config), "--ledger", str(ledger), "--json", str(out), "--quiet"]
    assert main([*args, *extra]) == 0
    rows = sqlite3.connect(ledger).execute(
        "select session_id, tier, label, model, quality_metric, quality_kind, quality_agrees from steps order by id"
    ).fetchall()
    return json.loads(out.read_text()), rows


@pytest.mark.slow
def test_replay_through_the_real_cascade_is_deterministic_and_judged(tmp_path, capsys):
    first, rows = _replay(tmp_path, "one")
    second, rows_again = _replay(tmp_path, "two")
    printed = capsys.readouterr().out

    assert first["steps"] == 10 and first["replay"]["format"] == "trace"
    tiers = first["tiers"]
    # Greetings, the order look-up and thanks are the support pack's; the paraphrased
    # shipping question hits the cache; the chargeback is routed to remote.
    assert tiers.get("rules", 0) >= 3 and tiers.get("cache", 0) >= 1 and tiers.get("remote", 0) >= 1
    assert set(tiers) <= {"rules", "cache", "local", "remote"}
    assert all(r[2] == "replay" and r[3] == "gpt-4o" for r in rows if r[1] == "remote")
    assert all(r[4] in ("tool_call_match", "text_token_f1") and r[6] in (0, 1) for r in rows)

    # Determinism: the same tiers step by step, the same verdicts.
    assert [r[:2] + r[4:] for r in rows] == [r[:2] + r[4:] for r in rows_again]
    def verdicts(summary: dict) -> dict:  # the quality figures without energy (CPU time varies)
        return {k: {**v, "energy_wh": None} if isinstance(v, dict) else v for k, v in summary["quality"].items()}

    assert second["tiers"] == tiers and verdicts(second) == verdicts(first) and second["by_tier"] == first["by_tier"]

    q = first["quality"]
    assert q["exact"]["steps"] == 2 and q["proxy"]["steps"] == 8 and "proxy" in q["metric"]
    assert q["exact"]["share"] == 1.0  # the order look-up (rules) and the account look-up

    # by_tier: the ledger's verdicts per answering tier, exact and proxy apart; cheap_tiers adds
    # up every tier but remote, whose answers are the recorded ones and are marked so.
    by_tier, cheap = first["by_tier"], first["cheap_tiers"]
    assert {t: v["steps"] for t, v in by_tier.items()} == tiers
    for t, v in by_tier.items():
        verdicts = [r[6] for r in rows if r[1] == t]
        exact = [r[6] for r in rows if r[1] == t and r[5] == "exact"]
        assert (v["judged_exact"], v["agree_exact"]) == (len(exact), sum(exact))
        assert v["judged_exact"] + v["judged_proxy"] == len(verdicts)
        assert v["agree_exact"] + v["agree_proxy"] == sum(verdicts)
        assert v["serves_recorded_answer"] == (t == "remote")
    assert cheap["tiers"] == [t for t in ("rules", "cache", "local") if t in tiers]
    assert cheap["steps"] == first["steps"] - tiers["remote"]
    cheap_rows = [r for r in rows if r[1] != "remote"]
    for kind in ("exact", "proxy"):
        mine = [r[6] for r in cheap_rows if r[5] == kind]
        assert (cheap[kind]["judged"], cheap[kind]["agree"]) == (len(mine), sum(mine))
    # The printed summary leads with the cheap tiers and never prints one mixed figure.
    assert printed.index("Quality of the cheap tiers") < printed.index("Answered by tier")
    assert "cheap tiers together" in printed and "remote *" in printed and "all judged" not in printed
    for kind in ("exact", "proxy"):
        per = first["energy_per_useful_answer_wh"][kind]
        for side in ("cascade", "baseline"):
            assert 0 < per[side]["low"] <= per[side]["point"] <= per[side]["high"]

    # --warm-from: the first run's model answers are in the cache before the first step.
    warm, _ = _replay(tmp_path, "warm", "--warm-from", str(tmp_path / "one.db"))
    assert warm["tiers"].get("cache", 0) > tiers["cache"] and warm["replay"]["warm_from"].endswith("one.db")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_replay_smoke_on_shared_bfcl(tmp_path):
    out = tmp_path / "bfcl.json"
    args = ["replay", str(SHARED / "bfcl" / "simple_python.jsonl"), "--limit", "3", "--quiet"]
    assert main([*args, "--ledger", str(tmp_path / "b.db"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["steps"] == 3 and summary["quality"]["metric"] == "bfcl_ast (exact)"
    assert summary["quality"]["proxy"]["steps"] == 0 and summary["quality"]["proxy"]["baseline"] is None
    remote = summary["by_tier"].get("remote")
    assert remote is None or (remote["serves_recorded_answer"] and remote["measure"] == "exact")
    assert summary["cheap_tiers"]["steps"] + (remote or {"steps": 0})["steps"] == 3


# --------------------------------------------------------------------------- a replay killed part-way


def _long_trace(tmp_path: Path, copies: int) -> Path:
    from dataclasses import replace

    from milliwatt.evaluation.replay import write_trace

    steps = load_trace(SUPPORT).steps
    path = tmp_path / "long.jsonl"
    write_trace([replace(s, id=f"k{i}-{s.id}", session=f"k{i}-{s.session}") for i in range(copies) for s in steps], path)
    return path


def test_a_replay_killed_part_way_leaves_a_sound_ledger_and_resume_finishes_it(tmp_path):
    """SIGKILL in the middle of `milliwatt replay` (rules + the remote tier serving the recorded
    answers): the ledger passes integrity_check and opens; ``unrecorded_steps`` names exactly
    the trace steps it has no row for; `--resume` replays those only, under the same run id,
    and the ledger ends with one row per trace step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from milliwatt.evaluation.replay import recorded_steps, unrecorded_steps
    from milliwatt.examples import SUPPORT_RULES
    from milliwatt.ledger import Ledger

    trace_path = _long_trace(tmp_path, 30)  # 300 steps
    trace = load_trace(trace_path)
    config = tmp_path / "milliwatt.yaml"
    config.write_text(json.dumps({"tiers": ["rules", "remote"], "rules": {"packs": [str(SUPPORT_RULES)]}}))
    db = tmp_path / "r.db"
    args = ["replay", str(trace_path), "--config", str(config), "--ledger", str(db), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from milliwatt.cli import main; sys.exit(main(sys.argv[1:]))", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        stored = 0
        while stored < 30:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the replay wrote nothing in 60 s"
            time.sleep(0.05)
            if db.is_file():
                try:
                    with sqlite3.connect(db, timeout=0.1) as conn:
                        (stored,) = conn.execute("select count(*) from steps").fetchone()
                except sqlite3.OperationalError:  # not created yet, or busy
                    pass
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    with Ledger(db) as ledger:  # opens (and would import a spool)
        assert ledger.faults["dropped"] == 0
    recorded = recorded_steps(db)
    missing = unrecorded_steps(trace, db)
    assert 30 <= len(recorded) < len(trace.steps), "killed part-way"
    assert [s.id for s in missing] == [s.id for s in trace.steps if s.id not in recorded]
    assert {s.id for s in missing} | set(recorded) == {s.id for s in trace.steps}
    # In trace order: what was recorded is a prefix of the trace.
    assert list(recorded) == [s.id for s in trace.steps[: len(recorded)]]
    (run_id,) = set(recorded.values())

    out = tmp_path / "resumed.json"
    assert main([*args, "--resume", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["replay"]["resumed"] == {"already_recorded": len(recorded), "replayed": len(missing)}
    assert summary["steps"] == len(trace.steps) and summary["replay"]["run_id"] == run_id
    rows = sqlite3.connect(db).execute("select json_extract(meta_json, '$.replay_id'), run_id from steps order by id").fetchall()
    assert [r[0] for r in rows] == [s.id for s in trace.steps]  # each once, in trace order
    assert {r[1] for r in rows} == {run_id}
    assert unrecorded_steps(trace, db) == []
