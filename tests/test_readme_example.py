"""The README's agent-loop example, run as written against a real OpenAI-compatible server
on loopback (the remote tier's provider, configured the way the README says)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from milliwatt.testing import OpenAIStubServer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "mw.step(" in b)


def frontier(request: dict) -> dict:
    """Looks the order up, then answers from the tool result."""
    results = [m for m in request["messages"] if m["role"] == "tool"]
    if results:
        return {"role": "assistant", "content": f"Your order is {json.loads(results[-1]['content'])['status']}."}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_order_status", "arguments": '{"order_id": "48213"}'}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def test_the_readme_agent_loop_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    with OpenAIStubServer(frontier) as server:
        env = {
            **os.environ,
            "MILLIWATT_REMOTE_MODEL": "openai/gpt-4o",
            "MILLIWATT_REMOTE_API_BASE": server.api_base,
            "MILLIWATT_REMOTE_API_KEY_ENV": "EXAMPLE_KEY",
            "EXAMPLE_KEY": "sk-example-not-a-real-key",
        }
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with sqlite3.connect(tmp_path / "milliwatt.db") as db:
        tiers = [t for (t,) in db.execute("SELECT tier FROM steps ORDER BY id")]
        answer = json.loads(db.execute("SELECT response_json FROM steps ORDER BY id DESC LIMIT 1").fetchone()[0])
    # The step after the tool result ends the loop with a text answer; every step is a ledger row.
    assert len(tiers) >= 2 and "error" not in tiers
    assert answer["content"] and not answer.get("tool_calls")
    assert out.stdout.count("\n") == len(tiers)
