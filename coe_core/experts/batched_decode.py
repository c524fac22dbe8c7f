"""Batched decoding on one resident transformers module: concurrent turns decode together (continuous batching).

One decode thread per resident model owns one batch: a ``DynamicCache`` whose rows are the running turns, laid on
one shared timeline (left-padded, with a 2D attention mask and per-row position ids, as ``generate`` does for a
padded batch). New turns are prefilled into a cache of their own (turns that arrived together in one padded
forward; a long prompt ``PREFILL_CHUNK`` tokens per step, between decode steps of the others), then merged into
the batch at a token boundary; a finished, stopped or cancelled turn leaves it (``batch_select_indices``) and the
padding nobody needs any more is cut off. Every row keeps its own sampling (greedy, or temperature / top-k /
top-p with transformers' logits warpers), ``min_new_tokens``, EOS, ``max_new_tokens``, stop strings (cut by the
consumer, which then cancels the row) and cancellation.

Why a hand-written loop and not transformers' continuous batching (``generate_batch``): on CPU it is the slow
one. Measured on SmolLM2-135M fp32, 2 threads, the same 8 turns x 48 tokens in one process on the loaded shared
box (docs/benchmarks.md): this loop (plain batched forwards with rows joining and leaving) 67-75 tok/s, plain
batched ``generate`` 63-69, ``generate_batch`` 17-22.
``scripts/gpu_check.py`` compares the three again on CUDA.

A lone turn decodes as ``stream_generate`` does: same prefill steps, one token per forward, greedy argmax over
the same logits, so its greedy tokens are the same.

The batch's KV cache is counted in the budget of the tier the model runs on (``KVBudget``): a turn joins only
when (rows x the longest row's prompt + max_new_tokens) x bytes per token fit; otherwise it waits for room while
rows of its own batch or other experts' decoding turns will free some, at most ``room_wait_s``. A turn that would
wait on room that nothing decoding will free (the tier held by experts whose turns wait too: two experts' turns
could wait on each other forever) or past that deadline ends with ``TierBusy`` naming what holds the tier.

Failures stay contained: a turn whose prompt or sampling breaks ends alone; a group of new turns whose joint
prefill or merge fails is prefilled again, each alone, from the start (first tokens are streamed only once a row
is in the batch; a merge builds every new layer before it changes any). Anything else that breaks the decode
thread ends every turn in it and waiting for it with that error, gives its KV bytes back and marks the decoder
``closed`` (the tier manager then makes a new one at the next turn).

Not used for ZeroGPU (each turn is its own ``spaces.GPU`` call in a forked worker: there is no long-lived
process with the GPU to hold a batch) nor for experts split across tiers by accelerate; both keep the per-turn
``stream_generate`` path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from queue import SimpleQueue

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from coe_core.errors import ExpertUnavailable, InvalidRequest, TierBusy
from coe_core.experts import generation  # (its PREFILL_CHUNK read at each step: one setting for both paths)
from coe_core.experts.generation import GenerationParams, GenerationResult, answer_text

log = logging.getLogger(__name__)

#: rows one batch decodes at once (the serving queue's ``max_running`` bounds it in practice)
MAX_ROWS = 16
#: cache layers whose tensors this module knows how to pad, merge and cut (full and sliding-window attention)
_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
#: seconds a turn waiting for KV room sleeps before it asks again (rows leaving wake it earlier)
_ROOM_POLL_S = 0.05
#: seconds a turn may wait for KV room that rows of its own batch hold before it ends with ``TierBusy``
ROOM_WAIT_S = 60.0
#: a long prompt pending prefill gets a chunk at least once in this many prefill steps (short new prompts go
#: first otherwise, and a steady flow of them would starve it)
LONG_PREFILL_EVERY = 3


def batchable(model) -> bool:
    """Whether the model's cache is one this decoder can batch (plain or sliding-window attention layers)."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception:
        return False
    return bool(cache.layers) and all(type(layer) in _LAYERS for layer in cache.layers)


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token adds to the cache, from the model config (every layer counted full)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    element = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * element


@dataclass
class KVBudget:
    """Where a batch's KV cache is counted: the budget of the tier that runs the model."""

    #: take this many bytes from the tier now (evicting idle experts if it must); False: no room now, wait
    reserve: Callable[[int], bool]
    release: Callable[[int], None]
    #: the most bytes the cache could ever get there (the tier's budget less the weights)
    capacity: Callable[[], int]
    #: who else holds that tier now (named when a turn cannot get room)
    holders: Callable[[], list[str]] = list
    #: whether other experts' turns in that tier are decoding now (their rows will leave and free room)
    others_decoding: Callable[[], bool] = bool


@dataclass(eq=False)
class _Row:
    """One turn in (or waiting for) the batch."""

    ids: list[int]
    params: GenerationParams
    cancel: threading.Event
    processors: LogitsProcessorList
    tokens: SimpleQueue = field(default_factory=SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)
    out: list[int] = field(default_factory=list)
    error: BaseException | None = None
    #: its own cache while its prompt is prefilled (merged into the batch when done), and how far it got
    cache: DynamicCache | None = None
    prefilled: int = 0
    #: prefilled alone, not with other new turns (a group it was in failed)
    alone: bool = False
    #: tokens of it in the cache, and the token it feeds next
    n_past: int = 0
    next_token: int = -1
    #: when it was queued (it waits for KV room at most ``room_wait_s`` from then)
    queued_at: float = field(default_factory=time.monotonic)

    def restart(self) -> None:
        """Forget prefill progress: it is prefilled again, alone, from its first token."""
        self.alone, self.cache, self.prefilled, self.n_past = True, None, 0, 0

    @property
    def tokens_reserved(self) -> int:
        return len(self.ids) + self.params.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0 and not self.processors


def _aligned(layer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values right-aligned to a timeline of ``length`` tokens (the layer unchanged):
    zeros on the left (masked out) or the oldest columns cut. A sliding-window layer keeps at most
    ``sliding_window - 1`` of them."""
    keep = min(length, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else length
    keys, values = layer.keys, layer.values
    have = keys.shape[-2]
    if have > keep:
        return keys[..., have - keep :, :], values[..., have - keep :, :]
    if have < keep:
        pad = (0, 0, keep - have, 0)
        return torch.nn.functional.pad(keys, pad), torch.nn.functional.pad(values, pad)
    return keys, values


def _assign(layer, length: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give a cache layer its new tensors on a timeline of ``length`` tokens."""
    layer.keys, layer.values = keys, values
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = length


def _align(layer, length: int) -> None:
    """Right-align a cache layer in place (``_aligned``)."""
    _assign(layer, length, *_aligned(layer, length))


class BatchedDecoder:
    """The decode thread of one resident module and the turns it runs. ``stream`` has ``stream_generate``'s
    contract; ``close`` ends the thread (turns still in it end with an error)."""

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        *,
        kv_budget: KVBudget | None = None,
        name: str = "",
        max_rows: int = MAX_ROWS,
    ):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.kv_budget, self.max_rows = kv_budget, max_rows
        self.bytes_per_token = kv_bytes_per_token(model)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or ()))
        # generate's defaults for what the engine does not set: top-k (50 unless the model's config says
        # otherwise) and the model's repetition penalty, so that a turn samples as it did on ``generate``
        self.top_k = getattr(gen, "top_k", None) or 50
        self.repetition_penalty = getattr(gen, "repetition_penalty", None) or 1.0
        self._cv = threading.Condition()
        self._waiting: deque[_Row] = deque()
        self._closing = False
        #: the batch: rows merged into ``_cache`` (same order), its attention mask, and rows still prefilling
        self._active: list[_Row] = []
        self._prefilling: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._reserved = 0
        #: seconds a turn waits for KV room its own batch holds (``ROOM_WAIT_S``), prefill steps since the oldest
        #: long prompt had a chunk
        self.room_wait_s = ROOM_WAIT_S
        self._long_skipped = 0
        #: decode steps that carried more than one row (batching at work), and the most rows in one step
        self.steps = 0
        self.widest = 0
        self._thread = threading.Thread(target=self._loop, name=f"coe-batch-{name}", daemon=True)
        self._thread.start()

    # -- the turns' side ----------------------------------------------------------------------------
    def _processors(self, params: GenerationParams) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if params.temperature > 0:  # generate's order: temperature, top-k, top-p
            procs.append(TemperatureLogitsWarper(params.temperature))
            procs.append(TopKLogitsWarper(self.top_k))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
        return procs

    def submit(self, input_ids: list[int], params: GenerationParams, cancel: threading.Event) -> _Row:
        """Queue a turn; its token ids arrive on ``.tokens`` (None at the end), ``.done`` is set once it has left
        the batch."""
        if not input_ids:
            raise ValueError("the prompt is empty")
        row = _Row(list(input_ids), params, cancel, self._processors(params))
        if self.kv_budget is not None:
            need = row.tokens_reserved * self.bytes_per_token
            capacity = self.kv_budget.capacity()
            if need > capacity:
                raise InvalidRequest(
                    f"this turn's KV cache ({len(input_ids)} prompt + {params.max_new_tokens} new "
                    f"tokens, {need / 1e6:.1f} MB) does not fit beside the expert in its tier "
                    f"({max(capacity, 0) / 1e6:.1f} MB free for it): ask for fewer tokens or "
                    "raise the tier budget"
                )
        with self._cv:
            if self._closing:
                raise ExpertUnavailable("the expert was evicted (or its decoder stopped): send the turn again")
            self._waiting.append(row)
            self._cv.notify_all()
        return row

    def stream(
        self, input_ids: list[int], params: GenerationParams, *, cancel: threading.Event, result: GenerationResult
    ) -> Iterator[str]:
        """Yield answer text as it is generated; ``result`` holds the token count when the stream ends."""
        row = self.submit(input_ids, params, cancel)
        try:  # a stop string or a closed consumer sets ``cancel``: the row leaves the batch at the next step
            yield from answer_text(
                ([token] for token in iter(row.tokens.get, None)), self.tokenizer, params.stop, cancel, result
            )
        finally:
            row.done.wait()  # out of the batch before the lease (and with it the module) may go
            result.token_ids = list(row.out)
            result.new_tokens = len(row.out)
        if row.error is not None:
            result.error = row.error
            raise row.error

    @property
    def closed(self) -> bool:
        """Its thread has stopped or is stopping: it takes no more turns."""
        return self._closing or not self._thread.is_alive()

    def close(self, *, wait: bool = False) -> None:
        """Stop the decode thread (it ends turns still in the batch with an error). Not waiting by default: the
        tier manager calls this under its lock, which the thread may need to release KV bytes."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- KV bytes in the tier --------------------------------------------------------------------------
    def _bound(self, rows: list[_Row]) -> int:
        """Bytes the batch may reach: every row padded to the longest row's prompt + max_new_tokens."""
        return len(rows) * max((r.tokens_reserved for r in rows), default=0) * self.bytes_per_token

    def _rebudget(self, rows: list[_Row]) -> bool:
        """Hold exactly the bound of ``rows`` in the tier; False (nothing changed) when there is no room."""
        want = self._bound(rows)
        if self.kv_budget is not None and want != self._reserved:
            if want > self._reserved and not self.kv_budget.reserve(want - self._reserved):
                return False
            if want < self._reserved:
                self.kv_budget.release(self._reserved - want)
        self._reserved = want
        return True

    # -- the decode thread ---------------------------------------------------------------------------
    def _rows(self) -> list[_Row]:
        return self._active + self._prefilling

    def _end(self, rows: list[_Row], error: BaseException | None = None) -> None:
        """Rows leave: their KV bytes go back to the tier before their turns see the end."""
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self._active) if id(r) not in gone]
        if len(keep) < len(self._active):
            if not keep:
                self._cache = self._mask = None
            else:
                index = torch.tensor(keep, device=self.device)
                self._cache.batch_select_indices(index)
                self._mask = self._mask[index]
                self._trim()
            self._active = [self._active[i] for i in keep]
        self._prefilling = [r for r in self._prefilling if id(r) not in gone]
        try:
            self._rebudget(self._rows())
        finally:
            for row in rows:
                row.cache = None
                row.error = error
                row.tokens.put(None)
                row.done.set()

    def _trim(self) -> None:
        """Cut the padding columns no row needs any more (the longest rows left)."""
        real = self._mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else self._mask.shape[1]
        if start:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                _align(layer, self._mask.shape[1])

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Put prefilled rows (their cache and mask) into the batch: both on the longer timeline, concatenated
        along the batch. All or nothing: every new tensor is built before the batch's are replaced, so a failure
        (out of memory) leaves the batch as it was."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            length = max(self._mask.shape[1], mask.shape[1])
            layers = []
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                (my_keys, my_values), (their_keys, their_values) = _aligned(mine, length), _aligned(theirs, length)
                layers.append((torch.cat([my_keys, their_keys]), torch.cat([my_values, their_values])))
            merged = mask.new_zeros(len(self._active) + len(rows), length)
            merged[: len(self._active), length - self._mask.shape[1] :] = self._mask
            merged[len(self._active) :, length - mask.shape[1] :] = mask
            for layer, (keys, values) in zip(self._cache.layers, layers, strict=True):
                _assign(layer, length, keys, values)
            self._mask = merged
        for row in rows:
            row.cache = None
            self._prefilling.remove(row)
        self._active.extend(rows)
        self._trim()  # (a group whose longest row ended at its first token brings padding nobody needs)

    def _admit(self) -> None:
        """Move waiting turns into the batch while rows are free and their KV bytes fit the tier."""
        while True:
            with self._cv:
                stopped = [r for r in self._waiting if r.cancel.is_set()]  # stopped before it started
                for row in stopped:
                    self._waiting.remove(row)
                row = self._waiting[0] if self._waiting and len(self._rows()) < self.max_rows else None
            if stopped:
                self._end(stopped)
            if row is None:
                return
            if not self._rebudget([*self._rows(), row]):
                busy = self._no_room(row)
                if busy is None:
                    return  # waits for a running turn of its own batch to leave
                with self._cv:
                    self._waiting.remove(row)
                self._end([row], busy)
                continue
            with self._cv:
                self._waiting.popleft()
            self._prefilling.append(row)

    def _no_room(self, row: _Row) -> TierBusy | None:
        """Why ``row`` stops waiting for KV room, or None while it may wait: rows of its own batch, or other
        experts' turns that are decoding, will free room before its deadline. When neither is so, the room is
        held by other experts whose turns wait too (each expert's turn pins it; they could wait on each other
        forever): it ends now."""
        own = self._rows()
        others = self.kv_budget is not None and self.kv_budget.others_decoding()
        if (own or others) and time.monotonic() - row.queued_at < self.room_wait_s:
            return None
        holders = ", ".join(self.kv_budget.holders()) if self.kv_budget is not None else ""
        held = f"experts in use ({holders})" if holders else "experts in use"
        if own:
            held += f" and {len(own)} turn(s) of this expert that did not leave within {self.room_wait_s:g} s"
        return TierBusy(
            f"no room for this turn's KV cache in the tier: it is held by {held}; try again shortly",
            retry_after_s=max(1, int(self.room_wait_s // 10)),
        )

    def _prefill_group(self) -> list[_Row]:
        """The rows to prefill in the next step: every short prompt not started yet, in one padded forward (turns
        that arrive together, as ``generate`` prefills a batch), else the next chunk of one long prompt; the
        oldest long prompt gets its chunk at least every ``LONG_PREFILL_EVERY`` steps, new short ones or not."""
        short = [
            r
            for r in self._prefilling
            if not r.prefilled and not r.alone and len(r.ids) <= 2 * generation.PREFILL_CHUNK
        ]
        rest = [r for r in self._prefilling if r not in short]
        if short and (not rest or self._long_skipped < LONG_PREFILL_EVERY - 1):
            self._long_skipped += bool(rest)
            return short
        self._long_skipped = 0
        return rest[:1]

    def _prefill_step(self, rows: list[_Row]) -> None:
        """One prefill step of ``rows``: a lone row takes the steps ``stream_generate`` takes (so its tokens are the
        same), several short ones go in one left-padded forward. At the end, their first tokens."""
        row = rows[0]
        if len(rows) > 1:
            width = max(len(r.ids) for r in rows)
            ids = torch.tensor([[0] * (width - len(r.ids)) + r.ids for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=self.device)
            cache = DynamicCache(config=self.model.config)
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            for r in rows:
                r.prefilled = r.n_past = len(r.ids)
        else:
            if row.cache is None:
                row.cache = DynamicCache(config=self.model.config)
            total = len(row.ids)
            if total <= 2 * generation.PREFILL_CHUNK:
                end = total
            elif row.prefilled < total - 1:  # chunks of all but the last token, then the last token alone
                end = min(row.prefilled + generation.PREFILL_CHUNK, total - 1)
            else:
                end = total
            step = torch.tensor([row.ids[row.prefilled : end]], device=self.device)
            out = self.model(input_ids=step, cache=row.cache, use_cache=True, logits_to_keep=1)
            row.prefilled = row.n_past = end
            if end < total:
                return
            cache, mask = row.cache, torch.ones(1, end, dtype=torch.long, device=self.device)
        # first tokens are streamed only once their rows are in the batch: a merge that fails sends nothing, and
        # the rows are prefilled again (alone) from the start
        keep, first, ended, failed = [], [], [], []
        for i, (r, token) in enumerate(zip(rows, self._sample(rows, out.logits[:, -1, :]), strict=True)):
            if isinstance(token, Exception):
                failed.append((r, token))
            elif self._ends_at(r, token):
                ended.append(r)
            else:
                first.append((r, token))
                if len(r.out) + 1 < r.params.max_new_tokens:
                    keep.append(i)
                else:
                    ended.append(r)  # its one token is all it asked for
        if keep and len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        if keep:
            self._merge([rows[i] for i in keep], cache, mask)
        for r, token in first:
            self._emit(r, token)
        if ended:
            self._end(ended)
        for r, exc in failed:
            self._end([r], exc)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int | Exception]:
        """The next token of each row: greedy rows by one argmax, the others through their own warpers. A row whose
        sampling fails gets the exception instead (it alone ends)."""
        logits = logits.float()
        for i, row in enumerate(rows):
            if len(row.out) < row.params.min_new_tokens and self.eos_ids:
                logits[i, self.eos_ids] = -float("inf")
        tokens: list[int | Exception] = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.greedy:
                continue
            try:
                scores = logits[i : i + 1]
                if row.processors:
                    seen = torch.tensor([row.ids + row.out], device=self.device)
                    scores = row.processors(seen, scores)
                if row.params.temperature > 0:
                    tokens[i] = int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
                else:
                    tokens[i] = int(scores.argmax(dim=-1))
            except Exception as exc:
                tokens[i] = exc
        return tokens

    def _ends_at(self, row: _Row, token: int) -> bool:
        """Whether the turn ends before ``token`` (cancelled, or EOS once it may stop)."""
        return row.cancel.is_set() or (token in self.eos_ids and len(row.out) >= row.params.min_new_tokens)

    def _emit(self, row: _Row, token: int) -> bool:
        """Hand a token to its turn; False when the turn has ended (EOS, its length, or cancelled)."""
        if self._ends_at(row, token):
            return False
        row.out.append(token)
        row.tokens.put(token)
        row.next_token = token
        return len(row.out) < row.params.max_new_tokens

    def _decode_step(self) -> None:
        """One token of every row in the batch, in one forward."""
        rows = self._active
        ids = torch.tensor([[r.next_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.n_past] for r in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for row in rows:
            row.n_past += 1
        if len(rows) > 1:
            self.steps += 1
        self.widest = max(self.widest, len(rows))
        ended, failed = [], []
        for row, token in zip(rows, self._sample(rows, out.logits[:, -1, :]), strict=True):
            if isinstance(token, Exception):
                failed.append((row, token))
            elif not self._emit(row, token):
                ended.append(row)
        if ended:
            self._end(ended)
        for row, exc in failed:
            self._end([row], exc)

    def _loop(self) -> None:
        error: BaseException = ExpertUnavailable("the expert was evicted while generating: send the turn again")
        try:
            with torch.inference_mode():  # every tensor of the batch lives and changes in here
                self._run()
        except BaseException as exc:  # a step outside the guarded ones broke: nothing may wait on a dead thread
            log.error("the decode thread %s stopped: %s", self._thread.name, exc, exc_info=exc)
            error = exc
        finally:
            self._stop(error)

    def _stop(self, error: BaseException) -> None:
        """The thread's way out, whatever happened: its KV bytes go back to the tier, it takes no more turns, and
        every turn in it or waiting for it ends with ``error``. Touches no tensor (they may be what broke)."""
        try:
            if self.kv_budget is not None and self._reserved:
                self.kv_budget.release(self._reserved)
        finally:
            self._reserved = 0
            with self._cv:
                self._closing = True
                stranded = list(self._waiting)
                self._waiting.clear()
            rows, self._active, self._prefilling = self._rows() + stranded, [], []
            self._cache = self._mask = None
            for row in rows:
                row.cache = None
                row.error = error
                row.tokens.put(None)
                row.done.set()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._waiting or self._rows()):
                    self._cv.wait()
                if self._closing:
                    break
            self._admit()
            if not self._rows():
                with self._cv:  # turns wait for KV room: look again soon
                    self._cv.wait(_ROOM_POLL_S)
                continue
            stopped = [r for r in self._prefilling if r.cancel.is_set()]
            if stopped:
                self._end(stopped)
            if self._prefilling:
                rows = self._prefill_group()
                try:
                    self._prefill_step(rows)
                except Exception as exc:
                    if any(row not in self._prefilling for row in rows):
                        raise  # it broke after rows joined the batch: the batch's state is unknown
                    if len(rows) == 1:  # this turn's prompt broke: it alone ends
                        self._end(rows, exc)
                    for row in rows:  # one of them broke the group: each is prefilled alone, from the start
                        row.restart()
            cancelled = [r for r in self._active if r.cancel.is_set()]
            if cancelled:
                self._end(cancelled)
            if not self._active:
                continue
            try:
                self._decode_step()
            except Exception as exc:  # the batch itself broke: every row in it gets the error
                self._end(list(self._active), exc)
