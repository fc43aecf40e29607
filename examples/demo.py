"""``milliwatt demo``: the example support agent through the full cascade, offline.

With no provider configured (no ``remote.model`` in the configuration, no
``MILLIWATT_REMOTE_MODEL``), the remote tier is a real
OpenAI-compatible server on loopback (llama-cpp-python's server with the default GGUF),
started and stopped here. Its answers are labelled ``stand-in`` in the ledger, and its
energy is estimated for the frontier model it stands in for, so the totals show what the
same traffic would cost against the real frontier model.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

from milliwatt.client import Milliwatt
from milliwatt.config import Settings, load_settings
from milliwatt.types import StepResult

from . import SUPPORT_RULES

STAND_IN_MODEL = "smollm2-stand-in"
# The support agent's traffic asks paraphrases of one question ("What is your return policy?",
# "What's your returns policy?"), which the shipped gate serves only at a looser bound than
# the product's default 2% (on Quora pairs nothing certifies at 2%, docs/cache.md). The demo
# runs its cache at 10% unless the configuration sets cache.max_wrong.
DEMO_MAX_WRONG = 0.10


@contextlib.asynccontextmanager
async def remote_settings(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """The remote tier's settings: the configured provider (a ``remote.model`` in the
    configuration file or ``MILLIWATT_REMOTE_MODEL``), or a loopback stand-in."""
    if settings.remote.model:
        yield {}
        return
    frontier_model = settings.frontier_model
    from milliwatt.evaluation.loopback import LoopbackServer

    async with LoopbackServer(model_alias=STAND_IN_MODEL) as server:
        yield {
            "model": f"openai/{server.model}",
            "api_base": server.api_base,
            "api_key": "stand-in-needs-no-key",
            "label": "stand-in",
            # Charge the energy of the model this server stands in for.
            "energy_model": frontier_model,
            # A 135M model can ramble (or loop inside a tool-call grammar) past any timeout;
            # a frontier model's agent answers are short.
            "extra": {"max_tokens": 160},
        }


async def run_demo(
    *,
    ledger: str = "milliwatt-demo.db",
    config: str | None = None,
    cache_path: str | None = None,
    out: TextIO,
) -> dict[str, Any]:
    """Run the scripted conversations; print each step and the totals; return the summary."""
    from milliwatt.examples.support_agent import CONVERSATIONS, TOOL_POLICY, run_conversation

    from milliwatt.reports.summary import format_summary, summarize

    from milliwatt.ledger import delete_ledger_file

    ledger_path = Path(ledger)
    delete_ledger_file(ledger_path)  # one demo run, one ledger: the totals below are this run's
    settings = load_settings(config)
    with tempfile.TemporaryDirectory(prefix="milliwatt-demo-cache-") as tmp:
        out.write("milliwatt demo: starting the remote stand-in and loading models (first step may take a few seconds)\n")
        async with remote_settings(settings) as remote:
            data = settings.model_dump()
            data["remote"] = {**data["remote"], **remote}
            # The demo names its own rule pack and its agent's tool declarations; no default
            # configuration loads demo data.
            data["rules"] = {**data["rules"], "packs": data["rules"]["packs"] or [str(SUPPORT_RULES)]}
            data["tools"] = {**TOOL_POLICY, **data["tools"]}
            data["ledger"] = f"sqlite:///{ledger_path}"
            # A fresh cache per run unless one is named, so every run shows the same tiers.
            data["cache"] = {**data["cache"], "path": cache_path or tmp}
            if "max_wrong" not in settings.cache.model_fields_set:
                data["cache"]["max_wrong"] = DEMO_MAX_WRONG
            async with Milliwatt.from_config(data) as mw:
                out.write(_header())
                for i, turns in enumerate(CONVERSATIONS, 1):
                    await run_conversation(mw.step, f"demo-{i}", turns, lambda t: out.write(_line(t.session, t.user, t.result)))
    summary = summarize(str(ledger_path))
    out.write("\n" + format_summary(summary) + "\n")
    out.write(f"ledger: {ledger_path} (browse with `sqlite3 {ledger_path}` or `milliwatt report {ledger_path}`)\n")
    return summary


def _header() -> str:
    cols = f"{'session':<8} {'user turn':<34} {'tier':<7} {'tokens raw>sent':>15} {'energy Wh (low-high)':>30}  answer"
    return cols + "\n" + "-" * len(cols) + "\n"


def _line(session: str, user: str, result: StepResult) -> str:
    r = result.record
    e = r.energy
    energy = f"{e.point_wh:.2e} ({e.low_wh:.1e}-{e.high_wh:.1e})"
    tier = r.tier + ("*" if r.label == "stand-in" else "")
    if result.tool_calls:
        fn = result.tool_calls[0]["function"]
        answer = f"{fn['name']}({fn['arguments']})"
    else:
        answer = json.dumps(result.content or "")[1:-1]
    user = user if len(user) <= 32 else user[:31] + "…"
    return f"{session:<8} {user:<34} {tier:<7} {r.input_tokens_raw:>7}>{r.input_tokens_sent:<7} {energy:>30}  {answer[:70]}\n"
