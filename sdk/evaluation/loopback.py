"""A real OpenAI-compatible server on loopback: llama-cpp-python's server over a GGUF.

The demo's remote "stand-in" and the remote tests go through it, so the remote path is
the real one (litellm, HTTP, the OpenAI wire format) with nothing reachable off-machine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import IO

from milliwatt._extras import require
from milliwatt.errors import BackendError

from milliwatt.adapters.llama_cpp import default_gguf_path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """``async with LoopbackServer() as srv:`` then point litellm at ``"openai/" + srv.model``
    with ``api_base=srv.api_base``. The server's output goes to a temporary file, not a
    pipe nobody drains (a full pipe would stall the server)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        model_alias: str = "smollm2-loopback",
        n_ctx: int = 4096,
        n_threads: int | None = None,
        chat_format: str | None = "milliwatt-chatml",
        start_timeout_s: float = 60.0,
    ) -> None:
        """``chat_format``: agent traffic carries assistant tool calls and tool results, which
        the default GGUF's own template cannot render; ``milliwatt-chatml`` (registered by
        ``standin_server``) flattens them into ChatML, SmolLM2's format. None: the GGUF's."""
        # llama-cpp-python's server, in the 'local' extra as llama-cpp-python[server].
        require("local", "the loopback stand-in server", "llama_cpp", "fastapi", "uvicorn")
        self.model_path = model_path or default_gguf_path()
        self.model = model_alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.chat_format = chat_format
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> LoopbackServer:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:  # cancelled or failed: leave no server process behind
            await self.stop()
            raise

    async def _start(self) -> None:
        self.port = free_port()
        args = [
            sys.executable, "-m", "milliwatt.evaluation.standin_server", "--model", self.model_path, "--model_alias", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
        ]  # fmt: skip
        if self.n_threads:
            args += ["--n_threads", str(self.n_threads)]
        if self.chat_format:
            args += ["--chat_format", self.chat_format]
        self._log = tempfile.TemporaryFile()
        self._proc = await asyncio.create_subprocess_exec(*args, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + self.start_timeout_s
        while not await asyncio.to_thread(self._ready):
            if self._proc.returncode is not None or time.monotonic() > deadline:
                why = f"exited with {self._proc.returncode}" if self._proc.returncode is not None else (
                    f"did not answer GET /v1/models within {self.start_timeout_s:.0f}s")
                tail = self._log_tail()
                await self.stop()
                raise BackendError(f"loopback server {why}; its output ends:\n{tail}", backend="loopback", model=self.model)
            await asyncio.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_base}/models", timeout=1) as r:
                return any(m.get("id") == self.model for m in json.load(r).get("data", []))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0, 2)
        size = self._log.tell()
        self._log.seek(max(0, size - n))
        return self._log.read().decode("utf-8", errors="replace")

    async def stop(self) -> None:
        """Terminate, then kill if it has not exited within 5 s."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
