"""Session-scoped real models for the tests that need them. Import the fixtures you use:

    from conftest_models import local_backend, loopback  # noqa: F401

Loading is paid once per session: one in-process SmolLM2 and one loopback server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest_asyncio

from milliwatt.adapters import LlamaCppBackend
from milliwatt.evaluation.loopback import LoopbackServer

THREADS = max(1, min(os.cpu_count() or 1, 4))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def local_backend() -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend(n_threads=THREADS, n_ctx=4096, max_tokens=64)
    yield backend
    await backend.aclose()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def loopback() -> AsyncIterator[LoopbackServer]:
    async with LoopbackServer(n_threads=THREADS, n_ctx=2048) as server:
        yield server
