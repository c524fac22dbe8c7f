"""Streaming generation from a worker thread, with cancellation and stop strings."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


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
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def stream_generate(model, tokenizer, input_ids: list[int], params: GenerationParams, *,
                    device: torch.device, cancel: threading.Event,
                    result: GenerationResult) -> Iterator[str]:
    """Yield answer text as it is generated; ``result`` holds the token count when the stream ends."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
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
            with torch.inference_mode():
                out = model.generate(**kwargs)
            result.new_tokens = int(out.shape[1] - ids.shape[1])
        except BaseException as exc:  # reported to the consumer, which logs the turn as an error
            result.error = exc
            streamer.end()

    worker = threading.Thread(target=work, name="coe-generate", daemon=True)
    worker.start()
    stop_filter = _StopStringFilter(params.stop)
    completed = False
    try:
        for text in streamer:
            piece = stop_filter.feed(text)
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
        cancel.set()  # a closed consumer stops the worker too
        worker.join()
    if result.error is not None:
        raise result.error


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
