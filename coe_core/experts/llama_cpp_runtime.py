"""The llama.cpp runtime: a GGUF expert executed by llama-cpp-python from its quantised file, without conversion.

``LlamaCppModel`` is what the tier manager holds in the cpu tier for such an expert: the loaded model with its
KV cache (``n_ctx`` tokens, preallocated). Loading uses ``use_mmap=False``: llama.cpp then ``read()``s every
tensor into its own buffers, so a load is a real load (every byte in RAM, the process RSS grows by the file size
plus the KV cache), never a lazy map that faults pages in during the first tokens.

One model generates one turn at a time (a lock); concurrent turns on the same expert wait for it.
"""

from __future__ import annotations

import codecs
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import SimpleQueue

from coe_core.config import ExpertConfig
from coe_core.experts.generation import _WORKERS, GenerationParams, GenerationResult, _StopStringFilter
from coe_core.experts.prompt_format import FormattedPrompt, format_prompt, reference_ids

#: llama.cpp's KV cache is preallocated for the whole context: without ``context_length`` in spaces.yaml a GGUF
#: expert gets at most this many tokens (SmolLM2-135M: 47 MB of KV cache at 2048, 189 MB at its 8192).
DEFAULT_N_CTX = 2048

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


def quiet_logs() -> None:
    """llama.cpp logs every load to stderr until told otherwise: errors only (its exceptions say what failed)."""
    from llama_cpp import _logger

    _logger.set_verbose(False)


def probe(path: Path) -> None:
    """Raise ValueError when llama.cpp cannot read the file's architecture and vocabulary: a cheap check (no
    weights read, 0.1-0.5 s) so that an expert llama.cpp cannot run is found when the app starts."""
    import llama_cpp

    quiet_logs()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError("it rejected the file (an architecture it does not know, or a broken vocabulary)")
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

    def __init__(self, llm, chat_template: str | None):
        self.llm = llm
        self.chat_template = chat_template
        self._template = None
        model = llm._model
        self.bos_token_id, self.eos_token_id = model.token_bos(), model.token_eos()
        self.pad_token_id = self.eos_token_id
        self.bos_token = model.token_get_text(self.bos_token_id) if self.bos_token_id >= 0 else ""
        self.eos_token = model.token_get_text(self.eos_token_id) if self.eos_token_id >= 0 else ""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        # special=True: control tokens written in the text (chat-template markers) become those tokens, as in HF
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return {"input_ids": ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        if self._template is None:
            from datetime import datetime

            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
            self._template = env.from_string(self.chat_template or "")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)


class LlamaCppModel:
    """One GGUF expert loaded by llama.cpp: weights and KV cache in RAM, generation, reference log-probs."""

    name = "llama_cpp"

    def __init__(self, path: Path, *, n_ctx: int, threads: int | None = None):
        import llama_cpp

        self.path = Path(path)
        self.n_ctx = n_ctx
        threads = threads or default_threads()
        quiet_logs()
        # use_mmap=False: every tensor is read() into llama.cpp's buffers now (a load, not a lazy map)
        self.llm = llama_cpp.Llama(str(self.path), n_ctx=n_ctx, use_mmap=False, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.tokenizer = LlamaTokenizer(self.llm, self.llm.metadata.get("tokenizer.chat_template") or None)
        vocab = self.llm._model.vocab
        self._is_eog = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        self._eog_ids = [t for t in {self.llm.token_eos(), self.llm._model.token_eot()} if t >= 0]
        self._lock = threading.Lock()

    def close(self) -> None:
        """Free the weights and the KV cache now (not when the garbage collector gets to it)."""
        with self._lock:
            if self.llm is not None:
                self.llm.close()
                self.llm = None

    def warm_up(self) -> None:
        """One token through the model, so the first real token does not pay for lazy setup."""
        with self._lock:
            self.llm.reset()
            self.llm.eval([self.tokenizer.bos_token_id if self.tokenizer.bos_token_id >= 0 else 0])
            self.llm.reset()

    # -- the runtime interface (what a Lease offers the engine) -----------------------------------------
    def format_prompt(self, messages: list[dict], cfg: ExpertConfig, *, context_length: int,
                      reserve_tokens: int) -> FormattedPrompt:
        return format_prompt(self.tokenizer, messages, cfg, context_length=min(context_length, self.n_ctx),
                             reserve_tokens=reserve_tokens)

    def _sampler(self, params: GenerationParams, *, mask_eog: bool):
        """llama.cpp's sampler chain for the turn: greedy, or temperature + top-p like the transformers runtime;
        ``mask_eog`` forbids ending (min_new_tokens) with a logit-bias stage, which runs in C."""
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if mask_eog:
            sampler.add_logit_bias(self.llm.n_vocab(), {t: -float("inf") for t in self._eog_ids})
        if params.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_p(params.top_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(random.getrandbits(32))
        return sampler

    def _reuse_prefix(self, input_ids: list[int]) -> int:
        """Keep the KV cache of the longest prefix this prompt shares with the last one (a follow-up turn);
        returns how many prompt tokens are already evaluated."""
        llm = self.llm
        common = 0
        for a, b in zip(llm.input_ids[:llm.n_tokens], input_ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(input_ids) - 1)  # the last prompt token is evaluated again for its logits
        if common <= 0 or not llm._ctx.kv_cache_seq_rm(-1, common, -1):  # some caches cannot cut a suffix
            common = 0
            llm._ctx.kv_cache_clear()
        llm.n_tokens = common
        return common

    def generate_ids(self, input_ids: list[int], params: GenerationParams, *, cancel: threading.Event,
                     on_token=None) -> list[int]:
        """Generate token ids (holding the model); stops at end of generation, the token limit, the context end,
        or ``cancel``. ``on_token(id)`` sees each id as it is produced.

        The loop is llama-cpp-python's own ``Llama.generate`` minus its Python-side bookkeeping: prompt in
        ``n_batch`` chunks, then one ``eval`` + one sampler call per token (greedy gives the same ids)."""
        out: list[int] = []
        with self._lock:
            if cancel.is_set():
                return out
            limit = min(params.max_new_tokens, self.n_ctx - len(input_ids))
            if limit <= 0:
                raise ValueError(f"the prompt ({len(input_ids)} tokens) fills the expert's context ({self.n_ctx})")
            llm = self.llm
            done = self._reuse_prefix(input_ids)
            llm.eval(input_ids[done:])
            plain = self._sampler(params, mask_eog=False)
            masked = self._sampler(params, mask_eog=True) if params.min_new_tokens else plain
            while True:
                sampler = masked if len(out) < params.min_new_tokens else plain
                token = sampler.sample(llm._ctx, -1)
                if self._is_eog(token):
                    break
                out.append(token)
                if on_token is not None:
                    on_token(token)
                if len(out) >= limit or cancel.is_set():
                    break
                llm.eval([token])
        return out

    def stream(self, input_ids: list[int], params: GenerationParams, *, cancel: threading.Event,
               result: GenerationResult) -> Iterator[str]:
        """Yield answer text as it is generated (worker thread; stop strings cut the answer and stop compute)."""
        queue: SimpleQueue[int | None] = SimpleQueue()

        def on_token(token: int) -> None:
            result.new_tokens += 1
            queue.put(token)

        def work() -> None:
            try:
                result.token_ids = self.generate_ids(input_ids, params, cancel=cancel, on_token=on_token)
            except BaseException as exc:  # reported to the consumer, which logs the turn as an error
                result.error = exc
            finally:
                queue.put(None)

        worker = _WORKERS.submit(work)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stop_filter = _StopStringFilter(params.stop)
        completed = False
        try:
            while (token := queue.get()) is not None:
                piece = stop_filter.feed(decoder.decode(self.llm.detokenize([token])))
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
            cancel.set()
            if not worker.cancel():
                worker.result()
        if result.error is not None:
            raise result.error

    def reference_logprob(self, messages: list[dict], reference: str, cfg: ExpertConfig) -> tuple[float, int]:
        """Sum of log-probs of ``reference`` as the answer: the prompt in one batch, then one decode per reference
        token (llama.cpp keeps the last position's logits only unless the context is built for all of them)."""
        import numpy as np

        prompt, ref = reference_ids(self.tokenizer, messages, reference, cfg)
        if not ref:
            return 0.0, 0
        if len(prompt) + len(ref) > self.n_ctx:
            keep = self.n_ctx - len(ref)
            if keep < 1:
                raise ValueError(f"the reference ({len(ref)} tokens) is longer than the context ({self.n_ctx})")
            prompt = prompt[-keep:]
        total = 0.0
        with self._lock:
            llm = self.llm
            llm.reset()
            llm.eval(prompt)
            n_vocab = llm.n_vocab()
            for i, token in enumerate(ref):
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).astype(np.float64)
                top = logits.max()
                total += float(logits[token] - top - np.log(np.exp(logits - top).sum()))
                if i + 1 < len(ref):
                    llm.eval([token])
            llm.reset()
        return total, len(ref)
