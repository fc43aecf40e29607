"""The energy method (issue 10): versioned coefficients, symmetry, observations, recomputation,
background work, hardware counters, and the bad input each must refuse."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from milliwatt import coefficients
from milliwatt.accounting import Accountant
from milliwatt.cascade import Cascade
from milliwatt.config import load_settings
from milliwatt.energy import CpuCoefficients, RemoteEnergyModel, cpu_energy, measured_energy
from milliwatt.errors import ConfigError
from milliwatt.ledger import Ledger
from milliwatt.meters import RaplMeter, pick
from milliwatt.overheads import overheads
from milliwatt.reports.recompute import recomputed
from milliwatt.reports.summary import format_summary, summarize
from milliwatt.testing import ScriptedTier
from milliwatt.tier import Tier
from milliwatt.tier import Completion
from milliwatt.types import Attempt, Step, StepMeta, TierResult

GPT4O = "openai/gpt-4o"
SHIPPED = Path(coefficients.__file__).parent / "data" / "coefficients"


# --------------------------------------------------------------------------- the coefficient file


def test_every_shipped_coefficient_has_a_source_and_the_current_one_is_the_default() -> None:
    assert coefficients.shipped_versions() == ["mw-2026.11", "mw-2026.12"]
    c = coefficients.current()
    assert c.version == coefficients.CURRENT == RemoteEnergyModel().version
    assert c.cpu.watts_per_vcpu.source and c.facility.server_overhead.source and c.prompt_cache.energy_weight.source
    assert c.own_facility == pytest.approx(1.3 * 1.2)
    assert coefficients.load("mw-2026.11").own_facility == 1.0  # the asymmetry 2026.12 removed


def test_a_coefficient_file_that_does_not_parse_is_refused_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("version: x\ncpu: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: cannot parse"):
        coefficients.load(bad)


def test_a_wrong_coefficient_names_its_key_and_line(tmp_path: Path) -> None:
    text = (SHIPPED / "mw-2026.12.yaml").read_text().replace("    low: 1.5\n    point: 2.5", "    low: 3.5\n    point: 2.5", 1)
    bad = tmp_path / "c.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: cpu\.watts_per_vcpu: .*low <= point <= high"):
        coefficients.load(bad)
    with pytest.raises(ConfigError, match="shipped: mw-2026.11, mw-2026.12"):
        coefficients.load("mw-1999.01")


def test_a_coefficient_without_a_source_is_refused(tmp_path: Path) -> None:
    text = (SHIPPED / "mw-2026.12.yaml").read_text()
    start = text.index("  gpu_watts:")
    end = text.index("  gpu_peak_flops:")
    bad = tmp_path / "c.yaml"
    bad.write_text(text[:start] + "  gpu_watts:\n    value: 700\n" + text[end:])
    with pytest.raises(ConfigError, match=r"remote\.gpu_watts\.source"):
        coefficients.load(bad)


# --------------------------------------------------------------------------- the estimate


def test_an_unknown_model_is_refused_at_start_not_charged_zero() -> None:
    with pytest.raises(ConfigError, match="frontier_model: EcoLogits has no model openai/no-such-model.*energy.models"):
        from milliwatt.registry import check_energy_model

        check_energy_model("openai/no-such-model", "frontier_model", load_settings({}))


def test_an_unknown_model_is_estimated_from_the_configured_table() -> None:
    settings = load_settings({"energy": {"models": {"acme/giant-1": {"active_params_b": [60, 120]}}}})
    c = settings.energy.resolve()
    assert c.version == "mw-2026.12+config"  # the figures are no longer the file's alone
    e = RemoteEnergyModel(c).estimate("acme/giant-1", 5000, 300)
    ref = RemoteEnergyModel().estimate(GPT4O, 5000, 300)  # 44-132 B active parameters
    assert 0 < e.low_wh < e.point_wh < e.high_wh and e.basis.startswith("table acme/giant-1")
    assert ref.point_wh / 3 < e.point_wh < ref.point_wh * 3


@pytest.mark.parametrize(("args", "match"), [
    ((-1, 10), "input_tokens must be a count >= 0, got -1"),
    ((10, -3), "output_tokens must be a count >= 0, got -3"),
    ((None, 10), "input_tokens must be a count >= 0, got None"),
    ((10, 1.5), "output_tokens must be a count >= 0, got 1.5"),
])  # fmt: skip
def test_negative_or_missing_token_counts_are_refused_by_name(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RemoteEnergyModel().estimate(GPT4O, *args)
    with pytest.raises(ValueError, match="cached_tokens"):
        RemoteEnergyModel().estimate(GPT4O, 10, 10, cached_tokens=11)


def test_a_provider_reporting_bad_usage_is_counted_here_not_charged_zero(caplog: pytest.LogCaptureFixture) -> None:
    from milliwatt.model_tier import _with_valid_usage

    step = Step.create([{"role": "user", "content": "What is the capital of France?"}])
    done = Completion({"role": "assistant", "content": "Paris."}, "m", input_tokens=-5, output_tokens=None, cached_tokens=999)  # type: ignore[arg-type]
    fixed = _with_valid_usage(step, done)
    assert fixed.input_tokens > 0 and fixed.output_tokens > 0 and fixed.cached_tokens is None
    assert "input_tokens=-5" in caplog.text and "cached_tokens=999" in caplog.text


def test_cached_input_tokens_weigh_less_and_measured_latency_is_used_by_neither_side() -> None:
    m = RemoteEnergyModel()
    whole, cached = m.estimate(GPT4O, 8000, 100), m.estimate(GPT4O, 8000, 100, cached_tokens=6144)
    assert cached.point_wh < whole.point_wh and cached.observed.cached_tokens == 6144
    assert m.estimate(GPT4O, 8000, 100, 0.05).point_wh == whole.point_wh  # mw-2026.12: latency not used
    old = RemoteEnergyModel(coefficients.load("mw-2026.11"))
    assert old.estimate(GPT4O, 8000, 100, 0.05).point_wh < old.estimate(GPT4O, 8000, 100).point_wh  # mw-2026.11 used it


def test_every_tier_gets_the_same_facility_factors() -> None:
    c = coefficients.current()
    cpu = cpu_energy(3600.0)
    assert cpu.point_wh == pytest.approx(2.5 * c.facility.server_overhead.value * c.facility.site_pue.value)
    counted = measured_energy(3600.0, "rapl")
    assert counted.point_wh == pytest.approx(c.own_facility) and counted.low_wh < counted.point_wh < counted.high_wh
    assert counted.observed.joules == 3600.0 and counted.method == "measured"
    site = load_settings({"energy": {"site_pue": 1.0}})
    assert CpuCoefficients.of(site.energy.resolve()).facility == pytest.approx(1.3)


# --------------------------------------------------------------------------- the baseline


def test_the_baseline_counts_with_the_frontier_models_tokenizer() -> None:
    step = Step.create([{"role": "user", "content": "Überprüfe bitte die Buchung 7XK9Q für übermorgen."}])
    for model, encoding in (("openai/gpt-4o", "o200k_base"), ("openai/gpt-4", "cl100k_base"), ("anthropic/claude-opus-4-5-20251101", "o200k_base (approximation)")):
        acc = Accountant(model)
        record = acc.record(step, started_at=0.0, t0=0.0, tokens_raw=None, attempts=[])
        assert record.baseline_tokenizer == encoding
    o200k = Accountant("openai/gpt-4o").record(step, started_at=0.0, t0=0.0, tokens_raw=None, attempts=[])
    cl100k = Accountant("openai/gpt-4").record(step, started_at=0.0, t0=0.0, tokens_raw=None, attempts=[])
    assert o200k.baseline_input_tokens != cl100k.baseline_input_tokens


def _session_steps(n: int) -> list[Step]:
    system = {"role": "system", "content": "You are the airline's agent. " + "Policy. " * 900}
    turns: list[dict] = [system]
    out = []
    for i in range(n):
        turns = [*turns, {"role": "user", "content": f"question {i}: " + "details " * 30}]
        out.append(Step.create(list(turns), meta=StepMeta(session_id="s1")))
        turns = [*turns, {"role": "assistant", "content": f"answer {i}"}]
    return out


def test_the_baseline_gets_the_providers_prompt_cache_like_the_cascade() -> None:
    acc = Accountant(GPT4O)
    first, second = (acc.record(s, started_at=0.0, t0=0.0, tokens_raw=None, attempts=[]) for s in _session_steps(2))
    assert first.baseline_cached_tokens == 0  # nothing before it in the session
    assert second.baseline_cached_tokens >= 1024 and second.baseline_cached_tokens % 128 == 0
    assert second.baseline_cached_tokens <= second.baseline_input_tokens
    whole = RemoteEnergyModel().estimate(GPT4O, second.baseline_input_tokens, second.baseline_output_tokens)
    assert second.baseline_energy.point_wh < whole.point_wh
    # and a remote attempt whose provider did not report its cache gets the same rule, in energy and in cost
    estimate = RemoteEnergyModel().estimate(GPT4O, 3000, 20)
    attempt = Attempt("remote", "answered", "", None, "gpt-4o", 3000, 20, 0.5, estimate, 0.0095, prefix_tokens=2500)
    priced = acc.priced(attempt)
    assert priced.energy.observed.cached_tokens is None and priced.energy.point_wh < estimate.point_wh  # 2,432 cached, not reported
    assert priced.cost_usd < attempt.cost_usd


# --------------------------------------------------------------------------- observations, background work, recomputation


class _Remote(Tier):
    """A remote tier as the real one charges it: an estimate for the tokens it was sent."""

    name = "remote"

    async def attempt(self, step: Step) -> TierResult:
        n = sum(len(str(m.get("content") or "")) for m in step.messages) // 4
        energy = RemoteEnergyModel().estimate(GPT4O, n, 5)
        return TierResult("remote", {"role": "assistant", "content": "noted"}, "remote answered", energy,
                          model=GPT4O, input_tokens=n, output_tokens=5, cost_usd=n * 2.5e-6)  # fmt: skip


async def _ledger_with_steps(db: Path) -> None:
    ledger = Ledger(db)
    rules = ScriptedTier("rules", lambda s: {"role": "assistant", "content": "hi"} if "hello" in str(s.messages[-1]["content"]) else None)
    cascade = Cascade([rules, _Remote()], frontier_model=GPT4O, sink=ledger)
    overheads.report("cache", "model_load", 2.0, "the embedding model")
    for step in _session_steps(3):
        await cascade.run(step)
    await cascade.run(Step.create([{"role": "user", "content": "hello"}], meta=StepMeta(session_id="s2")))
    await cascade.aclose()
    await ledger.aclose()


@pytest.mark.asyncio
async def test_every_attempt_has_energy_method_range_and_coefficient_version(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    await _ledger_with_steps(db)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT energy_method, energy_wh_low, energy_wh_point, energy_wh_high, coefficients, cpu_seconds, energy_model FROM attempts").fetchall()
        steps = conn.execute("SELECT coefficients, hardware, baseline_tokenizer, baseline_input_tokens FROM steps").fetchall()
        background = conn.execute("SELECT tier, kind, cpu_seconds, energy_wh_point, coefficients FROM overheads").fetchall()
    assert rows and all(r[0] in ("cpu-time", "estimate") and r[1] <= r[2] <= r[3] and r[4] == "mw-2026.12" for r in rows)
    assert all((r[5] is not None) == (r[0] == "cpu-time") and (r[6] is not None) == (r[0] == "estimate") for r in rows)
    assert all(s[0] == "mw-2026.12" and s[1] and s[2] == "o200k_base" and s[3] > 0 for s in steps)
    # the model load, recorded once, with the first step, priced like CPU work
    assert background == [("cache", "model_load", 2.0, pytest.approx(2.0 * 2.5 * 1.56 / 3600), "mw-2026.12")]
    summary = summarize(db)
    assert summary["energy_wh"]["background"]["point"] == pytest.approx(2.0 * 2.5 * 1.56 / 3600)
    assert summary["energy_wh"]["cascade"]["point"] == pytest.approx(
        summary["energy_wh"]["steps"]["point"] + summary["energy_wh"]["background"]["point"]
    )
    assert "cache model_load: 1x, 2.00 CPU s" in format_summary(summary)


@pytest.mark.asyncio
async def test_recomputing_with_the_same_coefficients_reproduces_every_figure(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    await _ledger_with_steps(db)
    before = db.read_bytes()
    with recomputed(db, coefficients.current()) as r:
        again = summarize(r.path)
        assert r.kept == {} and r.steps == 4 and r.overheads == 1
    assert db.read_bytes() == before  # the ledger was only read
    original = summarize(db)
    for side in ("cascade", "baseline", "background"):
        assert again["energy_wh"][side] == pytest.approx(original["energy_wh"][side])
    assert again["cost_usd"] == pytest.approx(original["cost_usd"])


@pytest.mark.asyncio
async def test_recomputing_with_other_coefficients_moves_the_figures_not_the_observations(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    await _ledger_with_steps(db)
    doubled = (SHIPPED / "mw-2026.12.yaml").read_text().replace("version: mw-2026.12", "version: test-2x").replace(
        "  site_pue:\n    value: 1.2", "  site_pue:\n    value: 2.4"
    )
    (tmp_path / "2x.yaml").write_text(doubled)
    with recomputed(db, coefficients.load(tmp_path / "2x.yaml")) as r:
        with sqlite3.connect(r.path) as conn:
            cpu = conn.execute("SELECT cpu_seconds, energy_wh_point, coefficients FROM attempts WHERE energy_method = 'cpu-time'").fetchall()
            tokens = conn.execute("SELECT sum(input_tokens), sum(output_tokens) FROM attempts").fetchone()
    with sqlite3.connect(db) as conn:
        cpu_before = conn.execute("SELECT cpu_seconds, energy_wh_point FROM attempts WHERE energy_method = 'cpu-time'").fetchall()
        tokens_before = conn.execute("SELECT sum(input_tokens), sum(output_tokens) FROM attempts").fetchone()
    assert tokens == tokens_before and [c[0] for c in cpu] == [c[0] for c in cpu_before]
    assert all(c[2] == "test-2x" and c[1] == pytest.approx(2 * b[1]) for c, b in zip(cpu, cpu_before))


def test_recomputation_works_on_a_ledger_written_before_the_observations(tmp_path: Path) -> None:
    """The unversioned 0.1 ledger of test_migrations: CPU seconds come back from the basis."""
    from test_migrations import unversioned_ledger

    db = unversioned_ledger(tmp_path / "old.db")
    with recomputed(db, coefficients.load("mw-2026.11")) as r:
        with sqlite3.connect(r.path) as conn:
            cpu = conn.execute("SELECT cpu_seconds, energy_wh_point FROM attempts WHERE energy_method = 'cpu-time'").fetchall()
            base = conn.execute("SELECT baseline_input_tokens, baseline_cached_tokens FROM steps").fetchall()
            base_out = conn.execute("SELECT baseline_output_tokens FROM steps").fetchall()
    with sqlite3.connect(db) as conn:
        old = conn.execute("SELECT energy_wh_point FROM attempts WHERE energy_method = 'cpu-time'").fetchall()
    assert r.kept == {} and cpu and all(c[0] > 0 for c in cpu)
    assert [c[1] for c in cpu] == pytest.approx([o[0] for o in old])  # same coefficients: the same figures
    assert base[0][0] > 0 and base[0][1] == 0
    # the baseline's answer is recounted from the stored response ("hello"), as the accountant
    # counted it, not taken from the tier's own output count (12)
    assert base_out == [(1,)]


def test_the_report_recomputes_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from milliwatt.cli import main
    from test_migrations import unversioned_ledger

    db = unversioned_ledger(tmp_path / "old.db")
    assert main(["report", str(db), "--recompute", "--coefficients", "mw-2026.12"]) == 0
    out = capsys.readouterr().out
    assert "recomputed with coefficients mw-2026.12" in out and "the ledger itself was only read" in out
    assert main(["report", str(db), "--coefficients", "mw-2026.12"]) == 2
    assert main(["report", str(db), "--recompute", "--coefficients", str(tmp_path / "missing.yaml")]) == 2


# --------------------------------------------------------------------------- hardware counters


def _powercap(root: Path, zones: dict[str, tuple[int, int]]) -> Path:
    """A powercap tree as the kernel lays it out: intel-rapl:N/{name,energy_uj,max_energy_range_uj}."""
    for zone, (energy, wrap) in zones.items():
        d = root / zone
        d.mkdir(parents=True)
        (d / "name").write_text("package-0\n" if zone.count(":") == 1 else "core\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{wrap}\n")
    return root


def test_rapl_sums_package_zones_and_survives_a_wrap(tmp_path: Path) -> None:
    root = _powercap(tmp_path, {"intel-rapl:0": (1_000_000, 10_000_000), "intel-rapl:1": (9_500_000, 10_000_000), "intel-rapl:0:0": (5, 10)})
    meter = RaplMeter.find(root)
    assert meter is not None and [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]  # subzones not counted twice
    with meter.measure() as reading:
        (root / "intel-rapl:0" / "energy_uj").write_text("3000000\n")  # +2 J
        (root / "intel-rapl:1" / "energy_uj").write_text("500000\n")  # wrapped: +1 J
    assert reading.joules == pytest.approx(3.0)


def test_an_unreadable_counter_falls_back_to_cpu_time(tmp_path: Path) -> None:
    root = _powercap(tmp_path, {"intel-rapl:0": (1_000_000, 10_000_000)})
    meter = RaplMeter.find(root)
    assert meter is not None
    with meter.measure() as reading:
        (root / "intel-rapl:0" / "energy_uj").unlink()
    assert reading.joules is None
    assert pick("auto", gpu=False, root=tmp_path / "none") is None
    assert pick("cpu-time", gpu=True) is None
    with pytest.raises(ConfigError, match="energy.meter: rapl: no readable package counter"):
        pick("rapl", gpu=False, root=tmp_path / "none")


def test_a_skipped_attempt_names_the_coefficient_set_too() -> None:
    from milliwatt.types import Energy

    skipped = Attempt("cache", "skipped", "pinned to remote", None, None, 0, 0, 0.0, Energy.zero(), 0.0)
    step = Step.create([{"role": "user", "content": "hi"}])
    record = Accountant(GPT4O).record(step, started_at=0.0, t0=0.0, tokens_raw=None, attempts=[skipped])
    assert record.attempts[0].energy.version == "mw-2026.12" and record.attempts[0].energy.method == "none"
