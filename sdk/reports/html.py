"""The analyst report as one self-contained HTML page: the run summary, five charts, and why
the cheaper tiers passed, with the method and the low-high range of every energy figure.

Self-contained means no network and no other file: the CSS is inline and each chart is an SVG
drawn by matplotlib, embedded as a data URI (one document per chart, so the ids matplotlib
writes cannot collide between charts). The page can be mailed or attached to a ticket and
still render. matplotlib and numpy are imported only when a report is written, so
``import milliwatt`` stays light.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select

from milliwatt.ledger import ATTEMPTS, STEPS, LedgerError, open_existing
from milliwatt.reports.summary import summarize

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
TIER_COLOURS = {"rules": "#009E73", "cache": "#56B4E9", "local": "#E69F00", "remote": "#D55E00", "error": "#7F7F7F", "cancelled": "#BBBBBB"}
_OTHER_COLOURS = ("#CC79A7", "#0072B2", "#F0E442", "#999999")
_CASCADE, _BASELINE, _INK, _MUTED = "#5B3A8E", "#3D3D3D", "#1F2328", "#59636E"

# What a tier label means for the figures beside it (see docs/ledger.md, `label`).
_LABEL_NOTES = {
    "stand-in": "a loopback server stood in for the frontier model; its answers are not the frontier "
    "model's, and its energy is estimated for the frontier model it stands in for",
    "replay": "the recorded frontier answer was served back; its energy is estimated for the model "
    "that produced it",
    "oracle": "the ground truth was served as the remote answer (no frontier answer was recorded)",
}

# Beyond this many steps, per-step marks are drawn for every k-th step only: a denser chart
# shows nothing more and would make the page heavy.
_MAX_POINTS = 4000
_VECTOR_MAX_STEPS = 1000
_MIX_WINDOWS = 30
_REASONS_PER_TIER = 4
_CHART_SIZE = (10.0, 4.2)
_PNG_DPI = 100
_SVG_RASTER_DPI = 160  # for the rasterized data of dense charts: sharp on high-density screens


@dataclass(frozen=True)
class _Steps:
    """The per-step columns the charts need, in time (id) order."""

    tier: list[str]
    label: list[str | None]
    method: list[str]
    energy: np.ndarray  # (n, 3): low, point, high in Wh
    baseline: np.ndarray  # (n, 3)
    tokens_raw: np.ndarray
    tokens_sent: np.ndarray
    quality_kind: list[str | None]  # "exact", "proxy", or None: no reference
    quality_agrees: list[int | None]

    @property
    def n(self) -> int:
        return len(self.tier)


@dataclass(frozen=True)
class _Chart:
    key: str  # file name stem and HTML id
    title: str
    caption: str  # how to read it, as HTML
    figure: Figure


def write_html_report(ledger: str | Path, out: str | Path, *, png_dir: str | Path | None = None) -> Path:
    """Write the report of ``ledger`` (a SQLite path or SQLAlchemy URL) to ``out`` as one
    self-contained HTML page; with ``png_dir``, also write each chart there as a PNG.

    Raises ``milliwatt.ledger.LedgerError`` naming the ledger if it is missing, not a ledger,
    or has no steps; ``milliwatt._extras.MissingExtra`` without matplotlib (the 'report' extra).
    """
    from milliwatt._extras import require

    require("report", "the HTML report")  # before the ledger is read: the charts need it
    engine, where = open_existing(ledger)
    try:
        steps = _load_steps(engine)
        if steps.n == 0:
            raise LedgerError(f"{where} has no steps: nothing to report")
        reasons = _pass_reasons(engine)
    finally:
        engine.dispose()
    summary = summarize(ledger)
    charts = _charts(steps, summary)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(summary, steps, charts, reasons), encoding="utf-8")
    if png_dir is not None:
        _write_pngs(charts, Path(png_dir))
    return out


# --------------------------------------------------------------------------- reading


def _load_steps(engine: Engine) -> _Steps:
    import numpy as np

    s = STEPS.c
    # Quality is null where a step had no reference (live traffic, ledgers from before quality
    # was recorded: open_existing upgrades those, adding the columns empty).
    query = select(
        s.tier, s.label, s.energy_method,
        s.energy_wh_low, s.energy_wh_point, s.energy_wh_high,
        s.baseline_energy_wh_low, s.baseline_energy_wh_point, s.baseline_energy_wh_high,
        s.input_tokens_raw, s.input_tokens_sent, s.quality_kind, s.quality_agrees,
    ).order_by(s.id)  # fmt: skip
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    cols = list(zip(*rows)) if rows else [()] * len(query.selected_columns)
    return _Steps(
        tier=list(cols[0]),
        label=list(cols[1]),
        method=list(cols[2]),
        energy=np.array(cols[3:6], dtype=float).T.reshape(-1, 3),
        baseline=np.array(cols[6:9], dtype=float).T.reshape(-1, 3),
        tokens_raw=np.array(cols[9], dtype=float),
        tokens_sent=np.array(cols[10], dtype=float),
        quality_kind=list(cols[11]),
        quality_agrees=list(cols[12]),
    )


def _reason_shape(reason: str) -> str:
    """A pass reason with its particulars masked, so reasons that differ only in a number, a
    scope id or a call's arguments are counted together ("best similarity # < #")."""
    shape = re.sub(r"\w+\(\{.*\}\)", "…(…)", reason)
    shape = re.sub(r"\b(?=[0-9a-f]*\d)[0-9a-f]{6,}\b", "…", shape)
    return re.sub(r"(?<![\w.])\d+(?:\.\d+)?", "#", shape)


def _pass_reasons(engine: Engine) -> dict[str, list[tuple[str, int, int, str]]]:
    """Per tier, its most common pass reasons: (shape, count, all passes of the tier, an example)."""
    a = ATTEMPTS.c
    query = select(a.tier, a.reason, func.count()).where(a.outcome == "passed").group_by(a.tier, a.reason)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    shapes: dict[str, Counter[str]] = {}
    examples: dict[tuple[str, str], tuple[int, str]] = {}
    for tier, reason, count in rows:
        shape = _reason_shape(reason)
        shapes.setdefault(tier, Counter())[shape] += count
        # The example shown is the most frequent exact wording of the shape.
        examples[tier, shape] = max(examples.get((tier, shape), (0, "")), (count, reason))
    return {
        tier: [(shape, n, c.total(), examples[tier, shape][1]) for shape, n in c.most_common(_REASONS_PER_TIER)]
        for tier, c in sorted(shapes.items(), key=lambda kv: _tier_key(kv[0]))
    }


# --------------------------------------------------------------------------- tiers and numbers


def _tier_key(tier: str) -> tuple[int, str]:
    order = list(TIER_COLOURS)
    return (order.index(tier) if tier in order else len(order), tier)


def _tiers(steps: _Steps) -> list[str]:
    return sorted(set(steps.tier), key=_tier_key)


def _colour(tier: str) -> str:
    if tier in TIER_COLOURS:
        return TIER_COLOURS[tier]
    # Plugin tiers: a stable colour from the name, so the same tier looks the same in every report.
    return _OTHER_COLOURS[sum(tier.encode()) % len(_OTHER_COLOURS)]


def _wh(x: float | None) -> str:
    """Energy with an SI prefix: 0.000357 Wh reads better as 357 µWh."""
    if x is None or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0 Wh"
    for scale, unit in ((1e3, "kWh"), (1, "Wh"), (1e-3, "mWh"), (1e-6, "µWh"), (1e-9, "nWh")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.2e} Wh"


def _wh_range(r: dict[str, float]) -> str:
    return f"{_wh(r['point'])} (range {_wh(r['low'])} – {_wh(r['high'])})"


def _factor(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.3g}×" if x < 1e4 else f"{x:,.0f}×"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


def _methods_by_tier(steps: _Steps) -> str:
    """"rules: cpu-time; remote: mixed (stand-in)": how each tier's step energy was obtained."""
    parts = []
    for tier in _tiers(steps):
        methods = sorted({m for t, m in zip(steps.tier, steps.method) if t == tier})
        labels = sorted({lb for t, lb in zip(steps.tier, steps.label) if t == tier and lb})
        parts.append(f"{tier}: {'/'.join(methods)}" + (f" ({', '.join(labels)})" if labels else ""))
    return "; ".join(parts)


def _tier_legend(steps: _Steps, tier: str) -> str:
    n = steps.tier.count(tier)
    labels = sorted({lb for t, lb in zip(steps.tier, steps.label) if t == tier and lb})
    return f"{tier} · {n:,}" + (f" · {', '.join(labels)}" if labels else "")


# --------------------------------------------------------------------------- charts


def _charts(steps: _Steps, summary: dict[str, Any]) -> list[_Chart]:
    import matplotlib

    style = {
        "font.family": "DejaVu Sans",
        "font.size": 10.5,
        "axes.titlesize": 9.5,
        "axes.titlecolor": _MUTED,
        "axes.edgecolor": "#B0B7BF",
        "axes.labelcolor": _INK,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "axes.axisbelow": True,
        "grid.color": "#E3E7EB",
        "grid.linewidth": 0.8,
        "xtick.color": _MUTED,
        "ytick.color": _MUTED,
        "legend.frameon": False,
        "legend.fontsize": 9.5,
        "svg.hashsalt": "milliwatt",  # stable SVG ids: the same ledger gives the same page
    }
    methods = _methods_by_tier(steps)
    with matplotlib.rc_context(style):
        return [
            _energy_per_step(steps, methods),
            _cumulative_energy(steps, summary),
            _tier_mix(steps),
            _quality_by_tier(steps, summary),
            _tokens_trimmed(steps),
        ]


def _figure(title: str, subtitle: str) -> tuple[Figure, Axes]:
    # Figure directly, not pyplot: no global state, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=_CHART_SIZE, layout="constrained")
    fig.suptitle(title, x=0.01, ha="left", fontsize=13, fontweight="bold", color=_INK)
    ax = fig.add_subplot()
    ax.set_title(subtitle, loc="left", wrap=True)
    return fig, ax


def _legend_below(fig: Figure, ax: Axes, ncols: int | None = None) -> None:
    # Below the plot, not beside it: every chart keeps the same plot width, so the step axes line up.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols or len(handles))


def _rasterize_if_dense(ax: Axes, n: int) -> None:
    """Draw the data of a chart of many steps as pixels inside the SVG, axes and text staying
    vector: thousands of vector marks would make the page megabytes and slow to open."""
    if n > _VECTOR_MAX_STEPS:
        for artist in (*ax.lines, *ax.collections, *ax.patches):
            artist.set_rasterized(True)


def _sample(n: int) -> tuple[np.ndarray, int]:
    """Indices of the steps to mark, and the stride: every step up to ``_MAX_POINTS``."""
    import numpy as np

    stride = max(1, math.ceil(n / _MAX_POINTS))
    return np.arange(0, n, stride), stride


def _energy_per_step(steps: _Steps, methods: str) -> _Chart:
    import numpy as np

    fig, ax = _figure("Energy per step, by answering tier", f"method — {methods}")
    idx, stride = _sample(steps.n)
    x = np.arange(1, steps.n + 1)
    positive = steps.energy[steps.energy > 0]
    # A log axis cannot show 0 Wh (a step that did no work): such steps sit on a floor below the rest.
    floor = positive.min() / 3 if positive.size else 1e-9
    tiers = np.array(steps.tier)
    for tier in _tiers(steps):
        sel = idx[tiers[idx] == tier]
        low, point, high = (np.maximum(steps.energy[sel, k], floor) for k in range(3))
        ax.errorbar(
            x[sel], point, yerr=[point - low, high - point], fmt="o", ms=5, color=_colour(tier),
            ecolor=_colour(tier), elinewidth=1.6, alpha=0.9, capsize=0, label=_tier_legend(steps, tier),
        )  # fmt: skip
    ax.plot(x[idx], steps.baseline[idx, 1], color=_BASELINE, lw=1, ls="--", alpha=0.7, label="all-frontier (point)")
    ax.set_yscale("log")
    ax.set_xlabel("step, in time order")
    ax.set_ylabel("Wh per step (log scale)")
    _rasterize_if_dense(ax, steps.n)
    _legend_below(fig, ax)
    sampled = f" With {steps.n:,} steps, one step in every {stride} is drawn." if stride > 1 else ""
    caption = (
        "Each dot is one step's energy (point estimate), coloured by the tier that answered; its vertical bar "
        "is the low–high range. A step's energy includes the cheaper tiers that tried and passed. The dashed "
        "line is what the same step would have cost sent untrimmed to the frontier model. Steps near the "
        f"bottom are the savings: each decade down is 10× less energy.{sampled} "
        f"<span class=method>Method: {html.escape(methods)}.</span>"
    )
    return _Chart("energy-per-step", "Energy per step, by answering tier", caption, fig)


def _cumulative_energy(steps: _Steps, summary: dict[str, Any]) -> _Chart:
    import numpy as np

    factor = summary["savings_factor"]
    fig, ax = _figure(
        "Cumulative energy: cascade against all-frontier",
        f"savings factor {_factor(factor['point'])} (range {_factor(factor['low'])} – {_factor(factor['high'])}); "
        "bands are the low–high ranges summed",
    )
    x = np.arange(1, steps.n + 1)
    for name, series, colour in (
        ("cascade", steps.energy, _CASCADE),
        ("all-frontier counterfactual", steps.baseline, _BASELINE),
    ):
        total = np.cumsum(series, axis=0)
        ax.fill_between(x, total[:, 0], total[:, 2], color=colour, alpha=0.18, lw=0)
        end = {"low": total[-1, 0], "point": total[-1, 1], "high": total[-1, 2]}
        ax.plot(x, total[:, 1], color=colour, lw=2.2, label=f"{name}\n{_wh_range(end)}")
    ax.set_yscale("log", nonpositive="clip")
    # The first steps' totals can be microwatt-hours; scaled to them, the log axis would spend
    # most of its height on the first few steps. Start a little below the cascade's total.
    floor = min(steps.energy[:, 0].sum(), steps.baseline[0, 0]) / 20
    if floor > 0:
        ax.set_ylim(bottom=floor)
    ax.set_xlabel("step, in time order")
    ax.set_ylabel("Wh, cumulative (log scale)")
    _rasterize_if_dense(ax, steps.n)
    _legend_below(fig, ax)
    cascade, baseline = summary["energy_method"]["cascade"], summary["energy_method"]["baseline"]
    caption = (
        "The solid lines add up the energy of every step so far: the cascade as it ran (all attempts, passes "
        "included), and the counterfactual of sending every step, untrimmed, to the frontier model. The shaded "
        "bands are the low–high ranges. The vertical gap between the lines is the savings factor (on a log "
        "axis, a constant gap is a constant factor). "
        f"<span class=method>Method: cascade {html.escape(_method_counts(cascade['methods']))}; "
        f"baseline {html.escape(_method_counts(baseline['methods']))} for "
        f"{html.escape(', '.join(baseline['models']))}.</span>"
    )
    return _Chart("cumulative-energy", "Cumulative energy against the all-frontier counterfactual", caption, fig)


def _method_counts(methods: dict[str, int]) -> str:
    return ", ".join(f"{m} ({n:,} steps)" for m, n in methods.items())


def _tier_mix(steps: _Steps) -> _Chart:
    import numpy as np

    size = math.ceil(steps.n / min(_MIX_WINDOWS, steps.n))
    starts = np.arange(0, steps.n, size)
    fig, ax = _figure("Tier mix over time", f"share of steps answered by each tier, per window of {size} steps")
    tiers = np.array(steps.tier)
    bottom = np.zeros(len(starts))
    for tier in _tiers(steps):
        share = np.array([np.mean(tiers[s : s + size] == tier) for s in starts])
        ax.bar(starts + 1, share * 100, width=size, bottom=bottom * 100, align="edge", color=_colour(tier),
               edgecolor="white", linewidth=0.6, label=_tier_legend(steps, tier))  # fmt: skip
        bottom += share
    ax.set_xlim(1, steps.n + 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("step, in time order")
    ax.set_ylabel("share of steps (%)")
    ax.grid(axis="x", visible=False)
    _legend_below(fig, ax)
    caption = (
        f"Each column is a window of {size} consecutive steps; its colours are the shares of the tiers that "
        "answered them. Cheap tiers (rules, cache, local) growing over time means the cache is warming up and "
        "repeat traffic is being absorbed; a widening remote band means new kinds of steps."
    )
    return _Chart("tier-mix", "Tier mix over time", caption, fig)


def _quality_counts(steps: _Steps) -> dict[str, dict[str, tuple[int, int]]]:
    """tier -> kind ("exact", "proxy", "none") -> (steps judged, steps agreeing)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for tier, kind, agrees in zip(steps.tier, steps.quality_kind, steps.quality_agrees):
        per = out.setdefault(tier, {})
        judged, agreeing = per.get(kind or "none", (0, 0))
        per[kind or "none"] = (judged + 1, agreeing + bool(agrees))
    return out


def _quality_by_tier(steps: _Steps, summary: dict[str, Any]) -> _Chart:
    counts = _quality_counts(steps)
    served = [t for t, v in summary["by_tier"].items() if v["serves_recorded_answer"]]
    fig, ax = _figure("Quality by tier", "share of steps whose answer agrees with the reference; exact and proxy measures kept apart")
    if all(set(per) == {"none"} for per in counts.values()):
        _no_reference(ax)
    else:
        _quality_bars(ax, counts, _tiers(steps), served)
    caption = (
        "For each tier, the share of its steps whose answer agreed with the reference (the frontier model's "
        "recorded answer or the ground truth). Solid bars are exact measures (the same tool call, the right "
        "final number); hatched bars are proxies (text similarity), never mixed into the exact ones. "
        "“No reference” means no step of that tier was judged: live traffic has no reference; replays do."
        + (
            f" {html.escape(', '.join(served))} served the recorded answer: its bar is the recorded model's own "
            "agreement (true by construction where that answer is the reference), not the cascade's quality."
            if served else ""
        )
    )
    return _Chart("quality-by-tier", "Quality by tier", caption, fig)


def _no_reference(ax: Axes) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.55, "no reference", ha="center", va="center", fontsize=22, color=_MUTED, transform=ax.transAxes)
    ax.text(
        0.5, 0.38, "No step in this ledger was judged against a reference answer.\n"
        "Live traffic has none; `milliwatt replay` judges every step against the recorded one.",
        ha="center", va="center", fontsize=10.5, color=_MUTED, transform=ax.transAxes,
    )  # fmt: skip


def _quality_bars(ax: Axes, counts: dict[str, dict[str, tuple[int, int]]], tiers: list[str], served: list[str]) -> None:
    for i, tier in enumerate(tiers):
        for offset, kind, hatch in ((-0.2, "exact", None), (0.2, "proxy", "///")):
            judged, agreeing = counts[tier].get(kind, (0, 0))
            if judged == 0:
                ax.text(2, i + offset, f"{kind}: no reference", va="center", fontsize=9, color=_MUTED)
                continue
            share = 100 * agreeing / judged
            ax.barh(i + offset, share, height=0.36, color=_colour(tier), hatch=hatch, edgecolor="white",
                    alpha=1.0 if kind == "exact" else 0.7)  # fmt: skip
            ax.text(share + 1, i + offset, f"{kind}: {share:.0f}% of {judged:,}", va="center", fontsize=9, color=_INK)
    unjudged = [counts[t].get("none", (0, 0))[0] for t in tiers]
    names = [f"{t}\n(recorded answer)" if t in served else t for t in tiers]
    ax.set_yticks(range(len(tiers)), [f"{t}\n{n:,} without reference" if n else t for t, n in zip(names, unjudged)])
    ax.set_ylim(len(tiers) - 0.5, -0.5)  # cheapest tier on top, as in the cascade
    ax.set_xlim(0, 125)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("steps agreeing with the reference (%)")
    ax.grid(axis="y", visible=False)


def _tokens_trimmed(steps: _Steps) -> _Chart:
    import numpy as np

    raw_total, saved = steps.tokens_raw.sum(), (steps.tokens_raw - steps.tokens_sent).sum()
    fig, ax = _figure(
        "Input tokens saved by trimming",
        f"{saved:,.0f} of {raw_total:,.0f} input tokens trimmed ({_pct(saved, raw_total)}); per step",
    )
    edges = np.arange(0.5, steps.n + 1)
    # Per step, not cumulative: trimming acts on long contexts, and a per-step view shows which.
    ax.stairs(steps.tokens_raw, edges, fill=True, color=_BASELINE, alpha=0.25, label="saved by trimming")
    ax.stairs(steps.tokens_sent, edges, fill=True, color=_CASCADE, alpha=0.85, label="sent to the answering tier")
    ax.stairs(steps.tokens_raw, edges, color=_BASELINE, lw=1, label="as the agent sent them (raw)")
    ax.set_xlim(0.5, steps.n + 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step, in time order")
    ax.set_ylabel("input tokens per step")
    _rasterize_if_dense(ax, steps.n)
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:,.0f}")
    _legend_below(fig, ax)
    caption = (
        "For each step, the input tokens as the agent sent them (the outline) and the part that reached the "
        "tier that answered after trimming (filled). The light band above the fill is what trimming saved. "
        "The all-frontier baseline is always charged for the untrimmed context. No light band means nothing "
        "was trimmed."
    )
    return _Chart("tokens-trimmed", "Input tokens saved by trimming", caption, fig)


def _svg_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", dpi=_SVG_RASTER_DPI, metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _write_pngs(charts: list[_Chart], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for chart in charts:
        chart.figure.savefig(folder / f"report-{chart.key}.png", dpi=_PNG_DPI, metadata={"Software": None})


# --------------------------------------------------------------------------- the page


def _page(summary: dict[str, Any], steps: _Steps, charts: list[_Chart], reasons: dict[str, list[tuple[str, int, int, str]]]) -> str:
    e = html.escape
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<header>",
        "<h1>milliwatt run report</h1>",
        f"<p class=sub>Ledger <code>{e(summary['ledger'])}</code> · {summary['steps']:,} steps in "
        f"{summary['sessions']:,} sessions · {e(_day(summary['first_started_at']))} → "
        f"{e(_day(summary['last_started_at']))} · generated {generated}</p>",
        "</header>",
        *_label_notes(summary),
        _cheap_section(summary),
        _cards(summary, steps),
        _tier_section(summary, steps),
        "<section><h2>Charts</h2>",
        *(_figure_html(c) for c in charts),
        "</section>",
        _reasons_section(reasons),
        _method_section(summary),
        "<footer>Written by milliwatt from the ledger above; every figure can be re-derived from its "
        "<code>steps</code> and <code>attempts</code> tables (schema in docs/ledger.md).</footer>",
    ]
    title = f"milliwatt report: {summary['ledger']}"
    return (
        "<!doctype html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
        '<meta name=viewport content="width=device-width, initial-scale=1">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _day(iso: str | None) -> str:
    # "2026-01-02T03:04:05.678901Z" -> "2026-01-02 03:04:05 UTC": seconds are precise enough here.
    return "–" if not iso else iso[:19].replace("T", " ") + " UTC"


def _label_notes(summary: dict[str, Any]) -> list[str]:
    notes = []
    for label, tiers in summary["labels"].items():
        where = ", ".join(f"{t}: {n:,} steps" for t, n in tiers.items())
        meaning = _LABEL_NOTES.get(label, "read those figures accordingly")
        notes.append(f"<p class=note><b>Labelled “{html.escape(label)}”</b> ({html.escape(where)}): {html.escape(meaning)}.</p>")
    return notes


def _card(name: str, value: str, detail: str) -> str:
    return f"<div class=card><div class=k>{name}</div><div class=v>{value}</div><div class=d>{detail}</div></div>"


def _cards(summary: dict[str, Any], steps: _Steps) -> str:
    e = html.escape
    energy, factor, tokens, cost = summary["energy_wh"], summary["savings_factor"], summary["tokens"], summary["cost_usd"]
    methods = summary["energy_method"]
    trimmed = tokens["input_raw"] - tokens["input_sent"]
    cards = [
        _card("Energy, cascade", e(_wh(energy["cascade"]["point"])),
              f"range {e(_wh(energy['cascade']['low']))} – {e(_wh(energy['cascade']['high']))}<br>"
              f"method: {e(', '.join(methods['cascade']['methods']))}"),
        _card("Energy, all-frontier", e(_wh(energy["baseline"]["point"])),
              f"range {e(_wh(energy['baseline']['low']))} – {e(_wh(energy['baseline']['high']))}<br>"
              f"method: {e(', '.join(methods['baseline']['methods']))}, {e(', '.join(methods['baseline']['models']))}"),
        _card("Savings factor", e(_factor(factor["point"])),
              f"range {e(_factor(factor['low']))} – {e(_factor(factor['high']))}<br>all-frontier ÷ cascade"),
        _card("Input tokens trimmed", _pct(trimmed, tokens["input_raw"]),
              f"{tokens['input_raw']:,} raw → {tokens['input_sent']:,} sent<br>{tokens['output']:,} output tokens"),
        _card("Cost", f"${cost['cascade']:,.4f}", f"all-frontier ${cost['baseline']:,.4f}<br>remote tokens at list price"),
        _card("Quality, cheap tiers", *_quality_card(summary)),
    ]  # fmt: skip
    return "<section class=cards>" + "".join(cards) + "</section>"


def _quality_card(summary: dict[str, Any]) -> tuple[str, str]:
    """The agreement of the steps the cheaper tiers answered: exact, else proxy, never mixed."""
    if not summary["quality"]["judged"]:
        return "no reference", "no step was judged against a reference<br>(replays record quality)"
    cheap = summary["cheap_tiers"]
    judged = {kind: cheap[kind] for kind in ("exact", "proxy") if cheap[kind]["judged"]}
    if not judged:
        return "–", f"no step answered by a cheaper tier was judged<br>({cheap['steps']:,} answered)"
    parts = [f"{kind}: {_pct(v['agree'], v['judged'])} of {v['judged']:,}" for kind, v in judged.items()]
    headline = next(iter(judged))
    return (
        _pct(judged[headline]["agree"], judged[headline]["judged"]),
        f"agree ({headline}), {html.escape(', '.join(cheap['tiers']))}<br>{html.escape(' · '.join(parts))}",
    )


def _of(agree: int, judged: int) -> str:
    return f"{agree:,} of {judged:,} ({_pct(agree, judged)})" if judged else "–"


def _cheap_section(summary: dict[str, Any]) -> str:
    """The quality that leads the page: per cheaper tier and together, exact and proxy apart."""
    e = html.escape
    if not summary["quality"]["judged"]:
        return ""
    cheap, by_tier = summary["cheap_tiers"], summary["by_tier"]

    def row(name: str, colour: str | None, v: dict[str, Any], exact: tuple[int, int], proxy: tuple[int, int]) -> str:
        dot = f"<i class=dot style='background:{colour}'></i>" if colour else ""
        return (f"<tr><td>{dot}{name}</td><td>{v['steps']:,}</td><td>{_of(*exact)}</td><td>{_of(*proxy)}</td></tr>")  # fmt: skip

    rows = [
        row(e(t), _colour(t), v, (v["agree_exact"], v["judged_exact"]), (v["agree_proxy"], v["judged_proxy"]))
        for t, v in by_tier.items() if t in cheap["tiers"]
    ]  # fmt: skip
    rows.append(row("<b>cheap tiers together</b>", None, cheap, (cheap["exact"]["agree"], cheap["exact"]["judged"]),
                    (cheap["proxy"]["agree"], cheap["proxy"]["judged"])))  # fmt: skip
    notes = []
    for t, v in by_tier.items():
        if t in cheap["tiers"]:
            continue
        served = v["serves_recorded_answer"]
        rows.append(row(e(t) + (" *" if served else ""), _colour(t), v, (v["agree_exact"], v["judged_exact"]),
                        (v["agree_proxy"], v["judged_proxy"])))  # fmt: skip
        if served:
            notes.append(
                f"* {e(t)} served the recorded answer: its agreement is the recorded model's own (true by "
                "construction where that answer is the reference), not the quality of the cascade."
            )
    return (
        "<section><h2>Quality of the cheap tiers</h2>"
        "<table><thead><tr><th>tier</th><th>steps answered</th><th>exact: agree of judged</th>"
        "<th>proxy: agree of judged</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        "<p class=caption>Steps whose answer agrees with the reference (the frontier model's recorded answer or "
        "the ground truth), for each tier cheaper than the frontier model and for them together. Exact measures "
        "(the same tool call, the right final number) and proxies (text similarity) are counted apart and never "
        "added up. " + " ".join(notes) + "</p></section>"
    )


def _tier_section(summary: dict[str, Any], steps: _Steps) -> str:
    e, n = html.escape, summary["steps"]
    by_tier = sorted(summary["energy_by_tier"].items(), key=lambda kv: _tier_key(kv[0]))
    bar = "".join(
        f'<span style="flex:{v["steps"]};background:{_colour(t)}" title="{e(t)}: {v["steps"]} steps">'
        f"{e(t)} {_pct(v['steps'], n)}</span>"
        for t, v in by_tier
    )
    rows = []
    for tier, v in by_tier:
        methods = sorted({m for t, m in zip(steps.tier, steps.method) if t == tier})
        labels = sorted({lb for t, lb in zip(steps.tier, steps.label) if t == tier and lb})
        rows.append(
            f"<tr><td><i class=dot style='background:{_colour(tier)}'></i>{e(tier)}</td><td>{v['steps']:,}</td>"
            f"<td>{_pct(v['steps'], n)}</td><td>{e(_wh(v['low']))}</td><td><b>{e(_wh(v['point']))}</b></td>"
            f"<td>{e(_wh(v['high']))}</td><td>{e(', '.join(methods))}</td><td>{e(', '.join(labels)) or '–'}</td></tr>"
        )
    return (
        "<section><h2>Who answered</h2>"
        f"<div class=mix>{bar}</div>"
        "<table><thead><tr><th>tier</th><th>steps</th><th>share</th><th>energy low</th><th>point</th>"
        "<th>high</th><th>method</th><th>label</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        "<p class=caption>Energy of the steps each tier answered, summed, including the cheaper tiers that "
        "tried them first and passed.</p></section>"
    )


def _figure_html(chart: _Chart) -> str:
    return (
        f"<figure class=chart id=chart-{chart.key}>"
        f'<img src="{_svg_data_uri(chart.figure)}" alt="{html.escape(chart.title)}">'
        f"<figcaption>{chart.caption}</figcaption></figure>"
    )


def _reasons_section(reasons: dict[str, list[tuple[str, int, int, str]]]) -> str:
    e = html.escape
    if not reasons:
        return "<section><h2>Why cheaper tiers passed</h2><p>No tier passed on any step.</p></section>"
    rows = []
    for tier, items in reasons.items():
        for i, (shape, count, total, example) in enumerate(items):
            head = f"<td rowspan={len(items)}><i class=dot style='background:{_colour(tier)}'></i>{e(tier)}</td>" if i == 0 else ""
            rows.append(
                f"<tr>{head}<td>{e(shape)}</td><td>{count:,}</td><td>{_pct(count, total)}</td>"
                f"<td class=ex>{e(example)}</td></tr>"
            )
    return (
        "<section><h2>Why cheaper tiers passed</h2>"
        "<table class=reasons><thead><tr><th>tier</th><th>reason (numbers as #)</th><th>passes</th>"
        "<th>of tier's passes</th><th>most frequent wording</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        f"<p class=caption>The {_REASONS_PER_TIER} most common reasons each tier gave for passing a step on to the "
        "next tier, from the <code>attempts</code> table. Reasons that differ only in a number, a scope id or "
        "a call's arguments are counted together.</p></section>"
    )


def _method_section(summary: dict[str, Any]) -> str:
    e = html.escape
    m = summary["energy_method"]
    items = []
    for side, name in (("cascade", "Cascade"), ("baseline", "All-frontier baseline")):
        basis = "".join(f"<li><code>{e(b)}</code></li>" for b in m[side]["basis"])
        items.append(f"<dt>{name}: {e(_method_counts(m[side]['methods']))}</dt><dd><ul>{basis}</ul></dd>")
    items.append(f"<dt>Baseline model</dt><dd>{e(_method_counts(m['baseline']['models']))}</dd>")
    notes = "".join(f"<li>{e(part)}</li>" for part in m["note"].split("; "))
    return (
        "<section><h2>How the energy was obtained</h2>"
        f"<dl>{''.join(items)}</dl><ul class=notes>{notes}</ul>"
        "<p class=caption><b>cpu-time</b>: CPU seconds of the work × watts per vCPU. <b>estimate</b>: a model of "
        "the remote deployment (EcoLogits plus an input-token term). <b>mixed</b>: a sum of several. "
        "<b>measured</b>: a hardware counter. Every figure is a low / point / high range.</p></section>"
    )


_CSS = """
:root { --ink: #1F2328; --muted: #59636E; --line: #D8DEE4; --bg: #F6F8FA; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 40px; }
header h1 { margin: 0 0 4px; font-size: 28px; letter-spacing: -0.01em; }
.sub { margin: 0 0 18px; color: var(--muted); }
code { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; background: #EEF1F4; padding: 1px 5px; border-radius: 4px; }
h2 { font-size: 19px; margin: 30px 0 12px; }
section { margin-top: 8px; }
.note { background: #FFF8E5; border: 1px solid #F0D98C; border-radius: 8px; padding: 10px 14px; margin: 10px 0; }
.cards { display: grid; grid-template-columns: repeat(3, 1fr); gap: 12px; margin-top: 14px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
.card .k { color: var(--muted); font-size: 13px; text-transform: uppercase; letter-spacing: 0.04em; }
.card .v { font-size: 28px; font-weight: 650; margin: 2px 0; font-variant-numeric: tabular-nums; }
.card .d { color: var(--muted); font-size: 13px; }
.mix { display: flex; height: 30px; border-radius: 8px; overflow: hidden; margin-bottom: 12px; }
.mix span { color: #fff; font-size: 13px; font-weight: 600; line-height: 30px; padding: 0 8px;
  white-space: nowrap; overflow: hidden; text-shadow: 0 0 3px rgba(0,0,0,.45); }
table { width: 100%; border-collapse: collapse; background: #fff; border: 1px solid var(--line);
  border-radius: 10px; overflow: hidden; font-variant-numeric: tabular-nums; }
td:first-child { white-space: nowrap; }
th, td { text-align: left; padding: 7px 12px; border-bottom: 1px solid #EDF0F3; font-size: 14px; vertical-align: top; }
th { background: #F0F3F6; font-weight: 600; color: var(--muted); font-size: 13px; }
td.ex { color: var(--muted); font-size: 13px; word-break: break-word; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 7px; }
figure.chart { background: #fff; border: 1px solid var(--line); border-radius: 10px; margin: 0 0 18px; padding: 14px 16px; }
figure.chart img { width: 100%; height: auto; display: block; }
figcaption, .caption { color: var(--muted); font-size: 14px; margin-top: 8px; }
.method { display: block; margin-top: 4px; font-size: 13px; }
dl { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px; margin: 0; }
dt { font-weight: 600; margin-top: 6px; } dd { margin: 2px 0 6px 0; } dd ul { margin: 0; padding-left: 20px; }
.notes { color: var(--muted); font-size: 14px; }
footer { margin-top: 32px; color: var(--muted); font-size: 13px; border-top: 1px solid var(--line); padding-top: 12px; }
"""
