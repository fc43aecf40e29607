"""The run report: the summary's quality figures (cheap tiers first, exact and proxy apart),
and the HTML page: self-contained, with the five charts, checked in a real headless browser
(Debian's chromium, installed by scripts/setup.sh)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from milliwatt.cli import main
from milliwatt.ids import new_step_id
from milliwatt.ledger import Ledger, LedgerError
from milliwatt.reports.html import TIER_COLOURS, write_html_report
from milliwatt.reports.summary import format_summary, summarize
from milliwatt.types import Attempt, Energy, Quality, StepMeta, StepRecord

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CHARTS = ("energy-per-step", "cumulative-energy", "tier-mix", "quality-by-tier", "tokens-trimmed")


def cpu(point: float) -> Energy:
    return Energy("cpu-time", point * 0.6, point, point * 1.6, "cpu-time x 1.5/2.5/4.0 W per vCPU")


def remote(point: float) -> Energy:
    return Energy("estimate", point * 0.7, point, point * 1.5, "ecologits openai/gpt-4o output + prefill")


def attempt(tier: str, outcome: str, reason: str, energy: Energy) -> Attempt:
    return Attempt(
        tier=tier, outcome=outcome, reason=reason, signal=None, model=None, input_tokens=0,
        output_tokens=0, latency_s=0.001, energy=energy, cost_usd=0.0,
    )  # fmt: skip


# The cascade a step of each tier went through: (tier, outcome, reason, energy) per attempt.
PATHS = {
    "rules": [("rules", "answered", "rule support/greeting matched", cpu(2e-7))],
    "cache": [
        ("rules", "passed", "no rule matched", cpu(2e-7)),
        ("cache", "answered", "similarity 0.951 >= 0.920 in scope c87b49", cpu(1e-5)),
    ],
    "local": [
        ("rules", "passed", "no rule matched", cpu(2e-7)),
        ("cache", "passed", "best similarity 0.412 < 0.920", cpu(1e-5)),
        ("local", "answered", "confidence q10=0.91 >= 0.50", cpu(6e-4)),
    ],
    "remote": [
        ("rules", "passed", "no rule matched", cpu(2e-7)),
        ("cache", "passed", "best similarity 0.173 < 0.920", cpu(1e-5)),
        ("local", "passed", "confidence q10=0.16 < 0.50", cpu(9e-3)),
        ("remote", "answered", "remote model answered", remote(0.1)),
    ],
}


def step(i: int, tier: str) -> StepRecord:
    attempts = tuple(attempt(*a) for a in PATHS[tier])
    energy = attempts[0].energy
    for a in attempts[1:]:
        energy = energy + a.energy
    raw = 300 + i * 97 % 1700  # contexts of 300 to 2,000 tokens; trimming caps them at 1,200
    return StepRecord(
        step_id=new_step_id(T0 + i), started_at=T0 + i,
        meta=StepMeta(session_id=f"s{i // 4}", run_id="run-1", tenant="acme", agent="airline"),
        tier=tier, model="gpt-4o" if tier == "remote" else None, label="replay" if tier == "remote" else None,
        input_tokens_raw=raw, input_tokens_sent=min(raw, 1200), output_tokens=20, latency_s=0.01,
        energy=energy, cost_usd=0.0, baseline_energy=remote(0.1 + 0.002 * i), baseline_cost_usd=0.004,
        baseline_model="openai/gpt-4o", attempts=attempts,
    )  # fmt: skip


def quality(i: int, tier: str) -> Quality | None:
    if i % 5 == 4:
        return None  # no reference for this step
    if tier == "cache":
        return Quality("text_similarity", "proxy", i % 3 != 0, 0.8)
    return Quality("tool_call_match", "exact", i % 4 != 1, 1.0)


def tier_of(i: int) -> str:
    return ["rules", "cache", "local", "remote"][(i * 7 + i // 9) % 4]


def write_ledger(path: Path, n: int = 40, *, with_quality: bool = True, remote_label: str | None = "replay") -> Path:
    with Ledger(path) as ledger:
        for i in range(n):
            record = replace(step(i, tier_of(i)), quality=quality(i, tier_of(i)) if with_quality else None)
            if record.tier == "remote":
                record = replace(record, label=remote_label)
            ledger.write_sync(record)
    return path


def counts(n: int, tiers: set[str]) -> dict[str, tuple[int, int]]:
    """kind -> (judged, agreeing) over the fixture's steps answered by ``tiers``, from its generators."""
    out: dict[str, tuple[int, int]] = {}
    for i in range(n):
        q = quality(i, tier_of(i))
        if tier_of(i) in tiers and q is not None:
            judged, agree = out.get(q.kind, (0, 0))
            out[q.kind] = (judged + 1, agree + q.agrees)
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("report")
    ledger = write_ledger(tmp / "ledger.db")
    out = write_html_report(ledger, tmp / "out" / "report.html", png_dir=tmp / "png")
    return out, tmp / "png"


# --------------------------------------------------------------------------- the summary's quality


def test_cheap_tiers_and_by_tier_count_each_kind_apart(tmp_path: Path) -> None:
    s = summarize(write_ledger(tmp_path / "l.db"))
    cheap = s["cheap_tiers"]
    assert cheap["tiers"] == ["rules", "cache", "local"]  # the cascade's order, remote left out
    assert cheap["steps"] == sum(tier_of(i) != "remote" for i in range(40))
    for kind, (judged, agree) in counts(40, {"rules", "cache", "local"}).items():
        assert (cheap[kind]["judged"], cheap[kind]["agree"]) == (judged, agree)
        assert cheap[kind]["share"] == agree / judged
    for tier, v in s["by_tier"].items():
        assert v["steps"] == sum(tier_of(i) == tier for i in range(40))
        mine = counts(40, {tier})
        for kind in ("exact", "proxy"):
            judged, agree = mine.get(kind, (0, 0))
            assert (v[f"judged_{kind}"], v[f"agree_{kind}"]) == (judged, agree)
        # agree/share: the exact figures where there are any, else the proxy's; never a sum of both.
        assert v["measure"] == ("exact" if "exact" in mine else "proxy")
        assert (v["agree"], v["share"]) == (v[f"agree_{v['measure']}"], v[f"share_{v['measure']}"])
    # No quality figure mixes the two kinds: only per-kind shares remain.
    assert not {"cascade", "baseline", "agree", "by_tier"} & set(s["quality"])


def test_the_remote_tier_is_marked_only_when_it_served_the_recorded_answer(tmp_path: Path) -> None:
    replayed = summarize(write_ledger(tmp_path / "replay.db"))
    assert [t for t, v in replayed["by_tier"].items() if v["serves_recorded_answer"]] == ["remote"]
    assert "remote *" in format_summary(replayed) and "served the recorded answer" in format_summary(replayed)
    live = summarize(write_ledger(tmp_path / "live.db", remote_label=None))
    assert not any(v["serves_recorded_answer"] for v in live["by_tier"].values())
    assert "remote *" not in format_summary(live) and "served the recorded answer" not in format_summary(live)


def test_format_summary_leads_with_the_cheap_tiers_and_prints_no_mixed_figure(tmp_path: Path) -> None:
    text = format_summary(summarize(write_ledger(tmp_path / "l.db")))
    lines = text.splitlines()
    head = lines.index(next(ln for ln in lines if ln.startswith("Quality of the cheap tiers")))
    assert head < lines.index("Answered by tier")
    (together,) = [ln for ln in lines if ln.startswith("cheap tiers together")]
    (exact_j, exact_a), (proxy_j, proxy_a) = (counts(40, {"rules", "cache", "local"})[k] for k in ("exact", "proxy"))
    assert f"{exact_a} of {exact_j} (" in together and f"{proxy_a} of {proxy_j} (" in together
    assert "all judged" not in text
    # energy per useful answer, per kind: each kind's energy over its own agreeing steps
    assert "energy per useful answer, exact-judged steps, cascade" in text


def test_a_ledger_without_quality_prints_no_quality_section(tmp_path: Path) -> None:
    s = summarize(write_ledger(tmp_path / "l.db", n=6, with_quality=False))
    assert s["quality"]["judged"] == 0 and s["cheap_tiers"]["exact"]["share"] is None
    assert "Quality" not in format_summary(s)


# --------------------------------------------------------------------------- the page


def test_page_is_self_contained_and_has_the_five_charts(report: tuple[Path, Path]) -> None:
    page = report[0].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "external resource"
    assert "<script" not in page.lower()  # no JavaScript, so none can fail
    for key in CHARTS:
        assert re.search(rf'<figure class=chart id=chart-{key}><img src="data:image/svg\+xml;base64,', page), key
    assert page.count("<figure class=chart") == 5


def test_page_states_method_ranges_labels_and_pass_reasons(report: tuple[Path, Path]) -> None:
    page = report[0].read_text(encoding="utf-8")
    assert "ledger.db" in page and "2026-01-01 00:00:00 UTC" in page
    assert "Energy, cascade" in page and "Savings factor" in page and "range " in page
    assert "cpu-time" in page and "estimate" in page and "openai/gpt-4o" in page
    assert "Labelled “replay”" in page  # the caveat on the remote figures
    # pass reasons grouped by shape: the two cache similarities count together
    assert "best similarity # &lt; #" in page and "no rule matched" in page


def test_page_leads_with_the_cheap_tiers_quality(report: tuple[Path, Path]) -> None:
    page = report[0].read_text(encoding="utf-8")
    assert page.index("Quality of the cheap tiers") < page.index("Who answered")
    (exact_j, exact_a), (proxy_j, proxy_a) = (counts(40, {"rules", "cache", "local"})[k] for k in ("exact", "proxy"))
    together = re.search(r"cheap tiers together</b></td><td>[\d,]+</td><td>([^<]*)</td><td>([^<]*)</td>", page)
    assert together is not None
    assert together[1].startswith(f"{exact_a} of {exact_j} (") and together[2].startswith(f"{proxy_a} of {proxy_j} (")
    card = re.search(r"<div class=k>Quality, cheap tiers</div><div class=v>(\d+)%</div>", page)
    assert card is not None and int(card[1]) == round(100 * exact_a / exact_j)
    assert "remote *" in page and "served the recorded answer" in page


def test_pngs_for_docs(report: tuple[Path, Path]) -> None:
    pngs = sorted(p.name for p in report[1].glob("*.png"))
    assert pngs == sorted(f"report-{k}.png" for k in CHARTS)
    for p in report[1].glob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] >= 800
        assert p.stat().st_size < 150_000


def test_ledger_without_quality_reads_as_no_reference(tmp_path: Path) -> None:
    ledger = write_ledger(tmp_path / "live.db", n=6, with_quality=False)
    page = write_html_report(ledger, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "no reference" in page and page.count("<figure class=chart") == 5
    # A ledger from before quality was recorded (no quality columns, no migration table) is
    # upgraded on opening and reads the same.
    from test_migrations import unversioned_ledger

    old = unversioned_ledger(tmp_path / "old.db")
    page = write_html_report(old, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "no reference" in page and page.count("<figure class=chart") == 5


def test_missing_or_empty_ledger_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(LedgerError, match=re.escape(str(missing))):
        write_html_report(missing, tmp_path / "r.html")
    empty = tmp_path / "empty.db"
    Ledger(empty).close()
    with pytest.raises(LedgerError, match=re.escape(str(empty)) + ".*no steps"):
        write_html_report(empty, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------------------------------- in a real browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it with apt-get when run as root)")
    return found


def run_chromium(tmp: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'chromium-profile'}", *args, page.as_uri(),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def test_screenshot_in_headless_chromium(report: tuple[Path, Path], tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run_chromium(tmp_path, report[0], f"--screenshot={shot}", "--window-size=1280,2400")
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2400)
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert shot.stat().st_size > 50_000
    assert colours is not None and len(colours) > 500, "the page rendered (nearly) blank"
    present = {c for _, c in colours}
    for tier, hex_colour in TIER_COLOURS.items():
        if tier != "error":  # no step failed in this ledger
            assert tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)) in present, tier


def test_every_chart_decodes_in_headless_chromium(report: tuple[Path, Path], tmp_path: Path) -> None:
    # A copy with a probe script: the report itself has no JavaScript. The probe records, once the
    # page has loaded, how many chart images the browser decoded.
    probe = (
        "<script>addEventListener('load', () => { document.body.dataset.decoded = [...document.querySelectorAll("
        "'figure.chart img')].filter(i => i.complete && i.naturalWidth > 300).length; });</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(report[0].read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    dom = run_chromium(tmp_path, page, "--dump-dom", "--virtual-time-budget=10000").stdout
    assert 'data-decoded="5"' in dom
    assert len(re.findall(r"<figure class=\"chart\" id=\"chart-", dom)) == 5


def test_report_command_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = write_ledger(tmp_path / "ledger.db", n=8)
    page = tmp_path / "out" / "report.html"
    assert main(["report", str(ledger), "--html", str(page)]) == 0
    assert "savings factor" in capsys.readouterr().out
    assert page.read_text(encoding="utf-8").count("<figure class=chart") == 5
    assert main(["report", str(tmp_path / "absent.db"), "--html", str(page)]) == 2
    assert "absent.db" in capsys.readouterr().err
