"""Suite-wide policy: a test that loads a real model (MiniLM, a GGUF through llama.cpp, the
loopback model server) takes seconds and must be marked ``slow``, so ``-m "not slow"`` stays
a quick run. An unmarked test that loads one fails here, naming what it loaded."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _models_only_in_slow_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("slow") is not None:
        return
    from milliwatt.adapters.llama_cpp import LlamaCppBackend
    from milliwatt.cache.embedder import Embedder
    from milliwatt.evaluation.loopback import LoopbackServer

    def refuse(what: str):
        def load(*args: object, **kwargs: object) -> None:
            pytest.fail(f"{request.node.nodeid} loads {what}: mark it @pytest.mark.slow", pytrace=False)

        return load

    monkeypatch.setattr(Embedder, "_load", refuse("the MiniLM embedding model"))
    monkeypatch.setattr(LlamaCppBackend, "_load", refuse("a GGUF model through llama.cpp"))
    monkeypatch.setattr(LoopbackServer, "start", refuse("the loopback model server"))


@pytest.fixture(autouse=True)
def _no_background_work_from_earlier_tests() -> None:
    """Background work goes to the next step recorded in the process (milliwatt.overheads):
    a model loaded by one test must not land in the next test's ledger."""
    from milliwatt.overheads import overheads

    overheads.drain()
