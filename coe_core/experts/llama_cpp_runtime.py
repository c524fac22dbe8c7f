"""The llama.cpp runtime: a GGUF expert executed by llama-cpp-python from its quantised file, without conversion.

``LlamaCppModel`` is what the tier manager holds in the cpu tier for such an expert: the loaded model with its
KV cache (``n_ctx`` tokens, preallocated). Loading uses ``use_mmap=False``: llama.cpp then ``read()``s every
tensor into its own buffers, so a load is a real load (every byte in RAM, the process RSS grows by the file size
plus the KV cache), never a lazy map that faults pages in during the first tokens.

Concurrent turns on one expert are decoded together in one batch (``LlamaCppModel``: continuous batching).
"""

from __future__ import annotations

import codecs
import os
import random
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue

from coe_core.config import ExpertConfig
from coe_core.errors import ExpertUnavailable
from coe_core.experts.generation import GenerationParams, GenerationResult, _StopStringFilter
from coe_core.experts.prompt_format import FormattedPrompt, format_prompt, reference_ids

#: llama.cpp's KV cache is preallocated for the whole context: without ``context_length`` in spaces.yaml a GGUF
#: expert gets at most this many tokens (SmolLM2-135M: 47 MB of KV cache at 2048, 189 MB at its 8192).
DEFAULT_N_CTX = 2048
#: turns decoding on one resident GGUF expert at once (one batch); more wait for a free sequence
PARALLEL = 8
#: tokens per llama_decode of a prompt (llama-cpp-python's default)
N_BATCH = 512

_unavailable: str | None | bool = False


def llama_cpp_unavailable() -> str | None:
    """Why llama-cpp-python cannot be used here (None when it can); checked once per process."""
    global _unavailable
    if _unavailable is False:
        try:
            import llama_cpp  # noqa: F401

            _unavailable = None
        except Exception as exc:  # ImportError, or a build whose shared library does not load (OSError)
            _unavailable = f"{type(exc).__name__}: {exc}"
    return _unavailable


_log_callback = None
#: llama.cpp's latest error lines: they say why a load failed (its exceptions do not)
_errors: deque[str] = deque(maxlen=4)


def last_error() -> str:
    """The first error llama.cpp logged since the last call (why a load failed), or ''."""
    text = _errors[0] if _errors else ""
    _errors.clear()
    return text


def quiet_logs() -> None:
    """llama.cpp logs every load to stderr: keep its errors, for the exception that reports them. Not
    ``llama_cpp._logger.set_verbose(False)``: its level table predates ggml's current numbering (WARN is 3 now,
    which it takes for ERROR), so warnings leaked on every load."""
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp
    import llama_cpp.llama  # noqa: F401  (imports llama_cpp._logger, which installs its own callback)

    @llama_cpp.llama_log_callback
    def errors_only(level: int, text: bytes, user_data) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            line = text.decode("utf-8", "replace").strip()
            if line:
                _errors.append(line.split(": ", 1)[-1] if line.startswith("llama_") else line)

    _log_callback = errors_only  # referenced for as long as llama.cpp may call it
    llama_cpp.llama_log_set(errors_only, ctypes.c_void_p(0))


def probe(path: Path) -> None:
    """Raise ValueError when llama.cpp cannot read the file's architecture and vocabulary: a cheap check (no
    weights read, 0.1-0.5 s) so that an expert llama.cpp cannot run is found when the app starts."""
    import llama_cpp

    quiet_logs()
    last_error()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(
            last_error() or "it rejected the file (an architecture it does not know, or a broken vocabulary)"
        )
    llama_cpp.llama_model_free(model)


def default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may run on (at most 16)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


class LlamaTokenizer:
    """The slice of a transformers tokenizer that ``prompt_format`` uses, answered by llama.cpp's own vocabulary
    and the GGUF's chat template (rendered with jinja2 in a sandbox, as transformers does)."""

    def __init__(self, model, chat_template: str | None):
        self.model = model  # llama_cpp._internals.LlamaModel
        self.chat_template = chat_template
        self._template = None
        self.bos_token_id, self.eos_token_id = model.token_bos(), model.token_eos()
        self.pad_token_id = self.eos_token_id
        self.bos_token = model.token_get_text(self.bos_token_id) if self.bos_token_id >= 0 else ""
        self.eos_token = model.token_get_text(self.eos_token_id) if self.eos_token_id >= 0 else ""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        # special=True: control tokens written in the text (chat-template markers) become those tokens, as in HF
        ids = self.model.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return {"input_ids": ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.model.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", "replace")

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        if self._template is None:
            from datetime import datetime

            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._template = env.from_string(self.chat_template or "")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


@dataclass(eq=False)
class _Sequence:
    """One turn decoding on the model: its sequence id in the KV cache, samplers, and where its tokens go."""

    ids: list[int]
    params: GenerationParams
    cancel: threading.Event
    limit: int
    sampler: object
    masked: object
    tokens: SimpleQueue = field(default_factory=SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)
    out: list[int] = field(default_factory=list)
    seq: int = -1
    n_past: int = 0
    next_token: int = -1
    error: BaseException | None = None

    @property
    def cells(self) -> int:
        """KV-cache cells it may fill: the prompt and every token it may generate."""
        return len(self.ids) + self.limit


class LlamaCppModel:
    """One GGUF expert loaded by llama.cpp: weights and KV cache in RAM, batched generation, reference log-probs.

    Concurrent turns share the model through continuous batching, as llama.cpp's server does: one scheduler
    thread owns the context; each turn gets a sequence id in one unified KV cache of ``n_ctx`` cells; a new
    turn's prompt is decoded when it arrives (if its prompt + max_new_tokens fit the free cells), and every step
    decodes one token of every active turn in one ``llama_batch``. One turn alone decodes exactly as
    ``Llama.generate`` does (same context parameters, same batches), so its greedy ids are the same.
    """

    name = "llama_cpp"

    def __init__(self, path: Path, *, n_ctx: int, threads: int | None = None, parallel: int = PARALLEL):
        import llama_cpp
        from llama_cpp import _internals as internals

        _init_backend()
        quiet_logs()
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.parallel = parallel
        threads = threads or default_threads()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = False  # every tensor is read() into llama.cpp's buffers now, not lazily mapped
        last_error()
        try:
            self._model = internals.LlamaModel(path_model=str(self.path), params=model_params, verbose=False)
        except ValueError as exc:
            raise ValueError(last_error() or str(exc)) from None
        try:
            # the context Llama() builds (n_batch 512, no flash attention), plus sequences sharing one KV cache
            ctx_params = llama_cpp.llama_context_default_params()
            ctx_params.n_ctx, ctx_params.n_batch, ctx_params.n_ubatch = n_ctx, N_BATCH, N_BATCH
            ctx_params.n_threads = ctx_params.n_threads_batch = threads
            ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            ctx_params.n_seq_max, ctx_params.kv_unified = parallel, True
            self._ctx = internals.LlamaContext(model=self._model, params=ctx_params, verbose=False)
            self._batch = internals.LlamaBatch(n_tokens=max(N_BATCH, parallel), embd=0, n_seq_max=1, verbose=False)
        except Exception:
            self._model.close()
            raise
        metadata = self._model.metadata()
        self.tokenizer = LlamaTokenizer(self._model, metadata.get("tokenizer.chat_template") or None)
        vocab = self._model.vocab
        self._is_eog = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        self._eog_ids = [t for t in {self._model.token_eos(), self._model.token_eot()} if t >= 0]
        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._exclusive: deque[tuple] = deque()  # (function, Future): run with the context to themselves
        self._free = list(range(parallel))
        self._reserved = 0
        self._closing = False
        self.steps = 0  # decode steps that carried more than one turn (batching at work)
        self._thread = threading.Thread(target=self._loop, name=f"llama-{self.path.parent.parent.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the scheduler and free the weights and the KV cache now (not when the collector gets to it)."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self._batch.close()
        self._ctx.close()
        self._model.close()

    def warm_up(self) -> None:
        """One token through the model, so the first real token does not pay for lazy setup."""
        bos = self.tokenizer.bos_token_id

        def run() -> None:
            self._decode(0, [bos if bos >= 0 else 0], 0)
            self._ctx.kv_cache_seq_rm(0, -1, -1)

        self._run_exclusive(run)

    # -- the runtime interface (what a Lease offers the engine) -----------------------------------------
    def format_prompt(
        self, messages: list[dict], cfg: ExpertConfig, *, context_length: int, reserve_tokens: int
    ) -> FormattedPrompt:
        return format_prompt(
            self.tokenizer, messages, cfg, context_length=min(context_length, self.n_ctx), reserve_tokens=reserve_tokens
        )

    def _sampler(self, params: GenerationParams, *, mask_eog: bool):
        """llama.cpp's sampler chain for the turn: greedy, or temperature + top-p like the transformers runtime;
        ``mask_eog`` forbids ending (min_new_tokens) with a logit-bias stage, which runs in C."""
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if mask_eog:
            sampler.add_logit_bias(self._model.n_vocab(), {t: -float("inf") for t in self._eog_ids})
        if params.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_temp(params.temperature)  # temperature before top-p, in transformers' order
            sampler.add_top_p(params.top_p, 1)
            sampler.add_dist(random.getrandbits(32))
        return sampler

    def submit(self, input_ids: list[int], params: GenerationParams, cancel: threading.Event) -> _Sequence:
        """Queue a turn; its token ids arrive on ``.tokens`` (None at the end), ``.done`` is set when it has left
        the batch."""
        limit = min(params.max_new_tokens, self.n_ctx - len(input_ids))
        if not input_ids or limit <= 0:
            raise ValueError(f"the prompt ({len(input_ids)} tokens) fills the expert's context ({self.n_ctx})")
        plain = self._sampler(params, mask_eog=False)
        masked = self._sampler(params, mask_eog=True) if params.min_new_tokens else plain
        turn = _Sequence(list(input_ids), params, cancel, limit, plain, masked)
        with self._cv:
            if self._closing:
                raise ExpertUnavailable(f"{self.path.name} was evicted")
            self._waiting.append(turn)
            self._cv.notify_all()
        return turn

    def stream(
        self, input_ids: list[int], params: GenerationParams, *, cancel: threading.Event, result: GenerationResult
    ) -> Iterator[str]:
        """Yield answer text as it is generated (stop strings cut the answer and end the turn's decoding)."""
        turn = self.submit(input_ids, params, cancel)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stop_filter = _StopStringFilter(params.stop)
        completed = False
        try:
            while (token := turn.tokens.get()) is not None:
                result.new_tokens += 1
                piece = stop_filter.feed(decoder.decode(self._model.detokenize([token])))
                if piece:
                    yield piece
                if stop_filter.stopped:
                    cancel.set()  # the answer is complete: stop the compute early
            tail = stop_filter.feed(decoder.decode(b"", final=True)) + stop_filter.flush()
            if tail:
                yield tail
            completed = True
        finally:
            result.cancelled = not completed or (cancel.is_set() and not stop_filter.stopped)
            cancel.set()  # a closed consumer ends the turn's decoding too
            turn.done.wait()  # out of the batch before the lease (and with it the model) may go
            result.token_ids = list(turn.out)
        if turn.error is not None:
            raise turn.error

    def reference_logprob(self, messages: list[dict], reference: str, cfg: ExpertConfig) -> tuple[float, int]:
        """Sum of log-probs of ``reference`` as the answer: the prompt in one batch, then one decode per reference
        token (the context keeps one row of logits per batch), with the context to itself."""
        import numpy as np

        prompt, ref = reference_ids(self.tokenizer, messages, reference, cfg)
        if not ref:
            return 0.0, 0
        if len(prompt) + len(ref) > self.n_ctx:
            keep = self.n_ctx - len(ref)
            if keep < 1:
                raise ValueError(f"the reference ({len(ref)} tokens) is longer than the context ({self.n_ctx})")
            prompt = prompt[-keep:]
        n_vocab = self._model.n_vocab()

        def run() -> float:
            total = 0.0
            try:
                self._decode(0, prompt, 0)
                for i, token in enumerate(ref):
                    logits = np.ctypeslib.as_array(self._ctx.get_logits_ith(-1), shape=(n_vocab,)).astype(np.float64)
                    top = logits.max()
                    total += float(logits[token] - top - np.log(np.exp(logits - top).sum()))
                    if i + 1 < len(ref):
                        self._decode(0, [token], len(prompt) + i)
            finally:
                self._ctx.kv_cache_seq_rm(0, -1, -1)
            return total

        return self._run_exclusive(run), len(ref)

    # -- the scheduler thread -------------------------------------------------------------------------
    def _run_exclusive(self, function):
        from concurrent.futures import Future

        future: Future = Future()
        with self._cv:
            if self._closing:
                raise ExpertUnavailable(f"{self.path.name} was evicted")
            self._exclusive.append((function, future))
            self._cv.notify_all()
        return future.result()

    def _decode(self, seq: int, tokens: list[int], pos: int) -> None:
        """Decode ``tokens`` of one sequence from position ``pos`` in ``N_BATCH`` chunks; logits of the last."""
        batch = self._batch.batch
        for start in range(0, len(tokens), N_BATCH):
            chunk = tokens[start : start + N_BATCH]
            batch.n_tokens = len(chunk)
            for j, token in enumerate(chunk):
                batch.token[j], batch.pos[j] = token, pos + start + j
                batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = 1, seq, False
            batch.logits[len(chunk) - 1] = True
            self._ctx.decode(self._batch)

    def _emit(self, turn: _Sequence, token: int) -> bool:
        """Hand a sampled token to its turn; False when the turn has ended."""
        if self._is_eog(token) or turn.cancel.is_set():
            return False
        turn.out.append(token)
        turn.tokens.put(token)
        turn.next_token = token
        return len(turn.out) < turn.limit and not turn.cancel.is_set()

    def _sample(self, turn: _Sequence, idx: int) -> int:
        sampler = turn.masked if len(turn.out) < turn.params.min_new_tokens else turn.sampler
        return sampler.sample(self._ctx, idx)

    def _finish(self, turn: _Sequence, error: BaseException | None = None) -> None:
        if turn.seq >= 0:
            self._ctx.kv_cache_seq_rm(turn.seq, -1, -1)
            with self._cv:
                self._free.append(turn.seq)
                self._reserved -= turn.cells
            turn.seq = -1
        turn.error = error
        turn.tokens.put(None)
        turn.done.set()

    def _loop(self) -> None:
        active: list[_Sequence] = []
        while True:
            job, admitted = None, []
            with self._cv:
                while not (self._closing or self._waiting or active or self._exclusive):
                    self._cv.wait()
                if self._closing:
                    stranded = active + list(self._waiting)
                    self._waiting.clear()
                    for _function, future in self._exclusive:
                        future.set_exception(ExpertUnavailable(f"{self.path.name} was evicted"))
                    self._exclusive.clear()
                    break
                if self._exclusive and not active:
                    job = self._exclusive.popleft()
                elif not self._exclusive:  # (a pending exclusive job lets the batch drain first)
                    # admit waiting turns while a sequence id is free and their cells fit the KV cache
                    for turn in [t for t in self._waiting if t.cancel.is_set()]:  # stopped before it started
                        self._waiting.remove(turn)
                        self._finish(turn)
                    while self._waiting and self._free:
                        turn = self._waiting[0]
                        if (active or admitted) and self._reserved + turn.cells > self.n_ctx:
                            break  # waits for a running turn to finish
                        self._waiting.popleft()
                        turn.seq = self._free.pop(0)
                        self._reserved += turn.cells
                        admitted.append(turn)
            if job is not None:
                function, future = job
                try:
                    future.set_result(function())
                except BaseException as exc:
                    future.set_exception(exc)
                continue
            for turn in admitted:  # prefill: the whole prompt of a new turn, then its first token
                try:
                    if turn.cancel.is_set():
                        self._finish(turn)
                        continue
                    self._ctx.kv_cache_seq_rm(turn.seq, -1, -1)
                    self._decode(turn.seq, turn.ids, 0)
                    turn.n_past = len(turn.ids)
                    if self._emit(turn, self._sample(turn, -1)):
                        active.append(turn)
                    else:
                        self._finish(turn)
                except Exception as exc:
                    self._finish(turn, exc)
            for turn in [t for t in active if t.cancel.is_set()]:
                active.remove(turn)
                self._finish(turn)
            if not active:
                continue
            batch = self._batch.batch  # one step: the last token of every active turn, one llama_decode
            batch.n_tokens = len(active)
            for i, turn in enumerate(active):
                batch.token[i], batch.pos[i] = turn.next_token, turn.n_past
                batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, turn.seq, True
            try:
                self._ctx.decode(self._batch)
            except Exception as exc:
                for turn in active:
                    self._finish(turn, exc)
                active = []
                continue
            if len(active) > 1:
                self.steps += 1
            still = []
            for i, turn in enumerate(active):
                turn.n_past += 1
                try:
                    alive = self._emit(turn, self._sample(turn, i))
                except Exception as exc:
                    self._finish(turn, exc)
                    continue
                if alive:
                    still.append(turn)
                else:
                    self._finish(turn)
            active = still
        for turn in stranded:
            self._finish(turn, ExpertUnavailable(f"{self.path.name} was evicted while generating"))


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        import llama_cpp

        llama_cpp.llama_backend_init()
        _backend_ready = True
