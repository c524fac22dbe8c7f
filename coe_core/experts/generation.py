"""Streaming generation from a worker thread, with cancellation and stop strings."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import SimpleQueue

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

#: Long-lived generation threads: a thread's first torch op builds its own OpenMP team, so a new thread per
#: turn cost ~3% tokens/s here (16.5 vs 17.1 tok/s on SmolLM2-135M). Eight bound the turns generating at once;
#: more wait for a free worker.
_WORKERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="coe-generate")


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    #: generate at least this many tokens (ignores EOS before): for benchmarks and reproducible lengths
    min_new_tokens: int = 0


@dataclass
class GenerationResult:
    new_tokens: int = 0
    cancelled: bool = False
    error: BaseException | None = None
    #: the generated token ids, once generation has ended (benchmarks compare runtimes with them)
    token_ids: list[int] | None = None


class _CancelCriteria(StoppingCriteria):
    """Stops the compute (not just the stream) once the client went away."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.cancel.is_set()


class _StopStringFilter:
    """Holds back text that may be the start of a stop string and cuts the answer at a complete one.

    Hand-written: transformers stops *generation* at stop strings, but the streamer still emits them.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class _TokenQueue(BaseStreamer):
    """Hands each new token id to the consumer. Written instead of transformers' TextIteratorStreamer, which
    decodes inside the generation loop: decoding on the consumer's side keeps it off the critical path
    (engine 0.97x -> 0.99x of plain ``generate`` tokens/s here)."""

    def __init__(self) -> None:
        self.queue: SimpleQueue[list[int] | None] = SimpleQueue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first put is the prompt
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self.queue.get()) is not None:
            yield ids


class _IncrementalDecoder:
    """The answer's text as it becomes final: an incomplete UTF-8 sequence waits for its next token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0

    def feed(self, ids: list[int]) -> str:
        self.tokens += ids
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted :]
        if text.endswith("\n"):  # start over after a line: decoding cost stays bounded
            self.tokens, self.emitted = [], 0
        else:
            self.emitted = len(text)
        return piece


#: prompt tokens one prefill step takes: between steps a cancel (the client went away) stops the turn, so a
#: long prompt never holds a core for the whole prefill after nobody waits for it
PREFILL_CHUNK = 256


def _chunked_prefill(model, ids: torch.Tensor, cancel: threading.Event):
    """The KV cache of all but the last prompt token, computed ``PREFILL_CHUNK`` tokens at a time with a cancel
    check between chunks; ``generate`` then continues from it (transformers' documented cache re-use). None
    when the prompt is short (one step anyway) or the model keeps no standard cache; "cancelled" if cancelled."""
    if ids.shape[1] <= 2 * PREFILL_CHUNK:
        return None
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    except Exception:  # a model without a standard cache: one prefill step, as before
        return None
    end = ids.shape[1] - 1  # generate computes the last prompt token itself (and the first new token)
    with torch.inference_mode():
        for start in range(0, end, PREFILL_CHUNK):
            if cancel.is_set():
                return "cancelled"
            model(
                input_ids=ids[:, start : min(start + PREFILL_CHUNK, end)],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    return cache


def stream_generate(
    model,
    tokenizer,
    input_ids: list[int],
    params: GenerationParams,
    *,
    device: torch.device,
    cancel: threading.Event,
    result: GenerationResult,
) -> Iterator[str]:
    """Yield answer text as it is generated; ``result`` holds the token count when the stream ends."""
    streamer = _TokenQueue()
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens or None,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if params.stop:
        kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)

    def work() -> None:
        try:
            cache = _chunked_prefill(model, ids, cancel)
            if isinstance(cache, str):  # cancelled during the prefill: no token was generated
                streamer.end()
                return
            if cache is not None:
                kwargs["past_key_values"] = cache
            with torch.inference_mode():
                out = model.generate(**kwargs)
            result.new_tokens = int(out.shape[1] - ids.shape[1])
            result.token_ids = out[0, ids.shape[1] :].tolist()
        except BaseException as exc:  # reported to the consumer, which logs the turn as an error
            result.error = exc
            streamer.end()

    worker = _WORKERS.submit(work)
    try:
        yield from answer_text(streamer, tokenizer, params.stop, cancel, result)
    finally:
        if not worker.cancel():  # still queued for a free worker: never runs; else wait for it to stop
            worker.result()
    if result.error is not None:
        raise result.error


def answer_text(
    new_ids: Iterable[list[int]], tokenizer, stops: tuple[str, ...], cancel: threading.Event, result: GenerationResult
) -> Iterator[str]:
    """The answer's text pieces from its new token ids as they arrive, cut at the first stop string (which sets
    ``cancel``: the compute stops early). When it ends, ``result.cancelled`` says whether it ended early for
    another reason, and ``cancel`` is set either way (a consumer that went away stops the compute too)."""
    decoder = _IncrementalDecoder(tokenizer)
    stop_filter = _StopStringFilter(stops)
    completed = False
    try:
        for ids in new_ids:
            piece = stop_filter.feed(decoder.feed(ids))
            if piece:
                yield piece
            if stop_filter.stopped:
                cancel.set()  # the answer is complete: stop the compute early
        tail = stop_filter.flush()
        if tail:
            yield tail
        completed = True
    finally:
        # cancelled: the consumer went away mid-stream, or someone set ``cancel`` (stop button)
        result.cancelled = not completed or (cancel.is_set() and not stop_filter.stopped)
        cancel.set()


def reference_logprob(model, prompt_ids: list[int], ref_ids: list[int], device: torch.device) -> tuple[float, int]:
    """Sum of log-probabilities of ``ref_ids`` following ``prompt_ids``, and the number of reference tokens."""
    if not ref_ids:
        return 0.0, 0
    ids = torch.tensor([prompt_ids + ref_ids], dtype=torch.long, device=device)
    with torch.inference_mode():
        # Only the positions that predict reference tokens need the (vocabulary-sized) output projection.
        logits = model(ids, use_cache=False, logits_to_keep=len(ref_ids) + 1).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(ref_ids, device=device)
    return float(logp.gather(1, target[:, None]).sum()), len(ref_ids)
