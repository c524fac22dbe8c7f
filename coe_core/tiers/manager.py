"""TierManager: which local expert sits in which memory tier, and moving them fast.

Residency only: budgets, LRU, pins, moves. Which experts exist (remote ones too) and which can serve is the
expert catalog's (``coe_core/experts/catalog.py``), which reads the local experts' availability from here.

Tiers: ``disk`` (capacity: every materialised expert), ``cpu`` (staging; executes on a CPU-only machine),
``gpu`` (execution, when CUDA exists). ``acquire`` makes an expert resident on the execution tier and pins it
while in use; unpinned experts are evicted least-recently-used, size-aware, per tier. Every move is a
SwapEvent. An expert larger than the execution tier runs split across tiers with accelerate.

A GGUF expert on the llama.cpp runtime (``coe_core.experts.runtime``) has the same tiers with other contents:
disk = the GGUF file itself (sha256-verified), cpu = the model loaded by llama.cpp with its KV cache, both
counted in the cpu budget; it executes in the cpu tier.

A transformers expert resident on the execution tier gets a batched decoder (one decode thread, closed when the
expert leaves that tier); the KV cache of its running batch is counted in that tier's budget (``kv_live``), so a
load waits for it and a turn whose cache does not fit waits for room.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from coe_core.config import CoEConfig
from coe_core.errors import ExpertUnavailable, InvalidRequest, TierBusy
from coe_core.events import SwapEvent
from coe_core.experts.batched_decode import BatchedDecoder, KVBudget, batchable
from coe_core.experts.llama_cpp_runtime import DEFAULT_N_CTX
from coe_core.experts.materialize import (
    DiskCopy,
    expert_folder,
    gguf_folder,
    materialize,
    materialize_gguf,
    read_disk_copy,
)
from coe_core.experts.runtime import TRANSFORMERS_COST, ExpertRuntime, TransformersRuntime, choose_runtime
from coe_core.experts.weights import dtype_name
from coe_core.tiers import loader
from coe_core.tiers.budgets import TIER_ORDER, Tier, detect_tiers
from coe_core.tiers.snapshot import ExpertResidency, ResidencyState, TierSnapshot, TierUsage
from coe_core.tiers.split import SplitPlacement, place_split

log = logging.getLogger(__name__)


class LlamaLoadError(ExpertUnavailable):
    """llama.cpp could not load a GGUF expert (an architecture it does not know, a broken file, no memory)."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExpertSlot:
    """Everything the manager knows about one expert."""

    id: str
    dtype: torch.dtype
    disk: DiskCopy | None = None
    unavailable: str | None = None
    model: nn.Module | None = None  # built once; swaps re-point its weights
    tokenizer: object | None = None
    layout: loader.WeightsLayout | None = None
    cpu_buffer: torch.Tensor | None = None
    cpu_views: dict[str, torch.Tensor] | None = None
    gpu_buffer: torch.Tensor | None = None
    split: SplitPlacement | None = None
    #: what executes it: transformers (module + buffers above) or llama_cpp (``llama`` below)
    runtime: str = "transformers"
    #: one line when the runtime is not the one asked for (why, and what it costs)
    runtime_note: str | None = None
    #: llama_cpp: the loaded model while in the cpu tier, its context (tokens) and KV-cache bytes
    llama: object | None = None
    n_ctx: int = 0
    kv_bytes: int = 0
    #: transformers: the decode thread batching its turns while resident on the execution tier, and the bytes
    #: its KV cache holds there (counted in that tier's budget)
    batcher: BatchedDecoder | None = None
    kv_live: int = 0
    placement: str = "disk"  # disk | cpu | gpu | split
    loading: str | None = None  # tier being loaded into
    verified: bool = False
    pins: int = 0
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bytes(self) -> int:
        return self.disk.bytes if self.disk else 0

    @property
    def params(self) -> int:
        return self.disk.params if self.disk else 0

    @property
    def resident_bytes(self) -> int:
        """Bytes it takes in the tier that executes it: the weights, plus llama.cpp's preallocated KV cache."""
        return self.bytes + self.kv_bytes

    def bytes_in(self, tier: str) -> int:
        """Bytes of this expert held in ``tier`` (a GPU-resident expert keeps its CPU copy as staging)."""
        if tier == "disk":
            return self.disk.manifest["file_bytes"] if self.disk else 0
        if self.placement == "split" and self.split:
            return self.split.bytes_by_tier.get(tier, 0)
        live = self.kv_live if self.placement == tier else 0
        if tier == "cpu":
            return live + (
                self.resident_bytes if self.placement in ("cpu", "gpu") or self.loading in ("cpu", "gpu") else 0
            )
        if tier == "gpu":
            return live + (self.resident_bytes if self.placement == "gpu" or self.loading == "gpu" else 0)
        return 0


@dataclass
class Lease:
    """An expert resident on the execution tier, pinned until the ``acquire`` block ends."""

    expert: str
    model: nn.Module
    tokenizer: object
    device: torch.device
    events: list[SwapEvent]
    manifest: dict
    #: formats prompts, streams answers and scores references on this expert, whichever runtime it has
    runtime: ExpertRuntime | None = None


class TierManager:
    """Residency of the local experts: which tier holds each, the byte budget of each tier, LRU eviction, pins
    while an expert generates, and every move as a ``SwapEvent``. Thread-safe.

    Every method that takes an ``expert_id`` raises ``KeyError`` for an id that is not in the config and
    ``ExpertUnavailable`` for a remote expert (it has no weights here; the expert catalog has it).
    """

    def __init__(
        self,
        config: CoEConfig,
        *,
        gpu: bool | None = None,
        progress: bool = True,
        on_swap: Callable[[SwapEvent], None] | None = None,
    ):
        """Detect the tiers and their budgets and read the existing disk copies (no weights are loaded).

        ``gpu``: force the gpu tier on or off (None: CUDA decides); ``progress``: progress bars while
        materialising; ``on_swap``: called with every ``SwapEvent`` as it happens.
        """
        self.config = config
        self.data_dir = config.data_path
        self.tiers: dict[str, Tier] = detect_tiers(config.tiers, self.data_dir, gpu=gpu)
        self.exec_tier = "gpu" if self.tiers["gpu"].exists else "cpu"
        self.device = torch.device("cuda") if self.exec_tier == "gpu" else torch.device("cpu")
        self.progress = progress
        self.on_swap = on_swap
        #: transformers experts decode concurrent turns in one batch (False: one ``generate`` per turn, as before)
        self.batching = True
        self.history: deque[SwapEvent] = deque(maxlen=200)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        #: freed CPU buffers kept for reuse (counted in the cpu tier): a fresh buffer costs page faults
        self._pool: list[torch.Tensor] = []
        compute = torch.bfloat16 if self.exec_tier == "gpu" else torch.float32
        #: the local experts only: a remote expert has no weights here (``coe_core.experts.catalog`` has both)
        self.slots: dict[str, ExpertSlot] = {}
        for expert_id, cfg in config.experts.items():
            if cfg.is_remote:
                continue
            slot = ExpertSlot(expert_id, compute if cfg.dtype == "auto" else _DTYPES[cfg.dtype])
            slot.runtime, slot.runtime_note = choose_runtime(cfg, gpu=self.exec_tier == "gpu")
            self._read_disk(slot)
            self.slots[expert_id] = slot
        notes: dict[str, list[str]] = {}
        for slot in self.slots.values():
            if slot.runtime_note:
                notes.setdefault(slot.runtime_note, []).append(slot.id)
        for note, ids in notes.items():  # one line per cause, naming the experts it affects
            log.warning("%s: %s", ", ".join(ids), note)
        if config.tiers.disk.budget == "auto":  # already materialised experts do not eat the auto budget
            self.tiers["disk"].budget_bytes += self._used("disk")

    # -- queries ---------------------------------------------------------------------------------
    def _slot(self, expert_id: str) -> ExpertSlot:
        try:
            return self.slots[expert_id]
        except KeyError:
            cfg = self.config.experts.get(expert_id)
            if cfg is not None and cfg.is_remote:
                raise ExpertUnavailable(
                    f"{expert_id} is a remote expert ({cfg.base_url}): it has no weights here"
                ) from None
            raise InvalidRequest(f"unknown expert {expert_id!r}; experts: {', '.join(self.slots)}") from None

    def _read_disk(self, slot: ExpertSlot) -> None:
        """The expert's existing disk copy for its runtime (None when there is none or its source changed)."""
        cfg = self.config.experts[slot.id]
        folder = (
            gguf_folder(self.data_dir, slot.id)
            if slot.runtime == "llama_cpp"
            else expert_folder(self.data_dir, slot.id, slot.dtype)
        )
        slot.disk = read_disk_copy(folder, slot.id)
        if slot.disk and slot.disk.manifest.get("source") != cfg.source:
            slot.disk = None  # spaces.yaml points elsewhere now: materialise again
        self._size_runtime(slot)

    def _size_runtime(self, slot: ExpertSlot) -> None:
        """llama_cpp: the context it gets and the KV cache that context preallocates (counted in the cpu tier)."""
        if slot.runtime != "llama_cpp" or slot.disk is None:
            slot.n_ctx = slot.kv_bytes = 0
            return
        cfg = self.config.experts[slot.id]
        trained = slot.disk.manifest.get("context_length") or DEFAULT_N_CTX
        slot.n_ctx = cfg.context_length or min(trained, DEFAULT_N_CTX)
        slot.kv_bytes = slot.n_ctx * int(slot.disk.manifest.get("kv_bytes_per_token") or 0)

    def _used(self, tier: str) -> int:
        used = sum(s.bytes_in(tier) for s in self.slots.values())
        if tier == "cpu":
            used += sum(b.numel() for b in self._pool)
        return used

    def state(self, expert_id: str) -> ResidencyState:
        """Where the expert is now: disk, cpu, gpu, split, loading or unavailable (no I/O)."""
        slot = self._slot(expert_id)
        if slot.unavailable:
            return "unavailable"
        if slot.loading:
            return "loading"
        return slot.placement

    def snapshot(self) -> TierSnapshot:
        """Residency of every local expert and each tier's budget and use. Cheap: no I/O, just bookkeeping."""
        with self._lock:
            pooled = sum(b.numel() for b in self._pool)
            tiers = {
                name: TierUsage(
                    name,
                    tier.exists,
                    tier.budget_bytes,
                    self._used(name) if tier.exists else 0,
                    tier.budget_source,
                    pooled if name == "cpu" else 0,
                )
                for name, tier in self.tiers.items()
            }
            experts = {
                eid: ExpertResidency(
                    state=self.state(eid),
                    bytes_by_tier={t: slot.bytes_in(t) for t in TIER_ORDER},
                    bytes=slot.bytes,
                    params=slot.params,
                    dtype=(slot.disk.manifest.get("dtype", "gguf") if slot.disk else "gguf")
                    if slot.runtime == "llama_cpp"
                    else dtype_name(slot.dtype),
                    runtime=slot.runtime,
                    runtime_note=slot.runtime_note,
                    kv_bytes=slot.kv_bytes,
                    unavailable=slot.unavailable,
                    pinned=slot.pins,
                    last_used=slot.last_used,
                )
                for eid, slot in self.slots.items()
            }
            return TierSnapshot(self.exec_tier, tiers, experts, list(self.history)[-20:])

    # -- disk tier ---------------------------------------------------------------------------------
    def ensure_disk(self, expert_id: str) -> DiskCopy:
        """Materialise the expert once (atomic, idempotent) and return its disk copy.

        Raises ``ExpertUnavailable`` (and marks the expert unavailable with the reason) when its source cannot
        be read or converted, or the disk tier's budget has no room for it.
        """
        slot = self._slot(expert_id)
        with slot.lock:
            return self._ensure_disk_locked(slot)

    def _ensure_disk_locked(self, slot: ExpertSlot, *, force: bool = False) -> DiskCopy:
        if slot.disk and not force:
            return slot.disk
        cfg = self.config.experts[slot.id]
        try:
            needed_hint = 0 if slot.disk is None else slot.disk.manifest["file_bytes"]
            if self._used("disk") - needed_hint > self.tiers["disk"].budget_bytes:
                raise ExpertUnavailable(
                    f"disk tier budget ({self.tiers['disk'].budget_bytes / 1e9:.2f} GB) is full: raise COE_DISK_BUDGET"
                )
            if slot.runtime == "llama_cpp":
                disk = materialize_gguf(slot.id, cfg, self.data_dir, progress=self.progress, force=force)
            else:
                disk = materialize(slot.id, cfg, self.data_dir, slot.dtype, progress=self.progress, force=force)
        except ExpertUnavailable as exc:
            slot.unavailable = str(exc)
            raise
        except Exception as exc:  # anything else while materialising: this expert only is out
            slot.unavailable = f"materialising failed: {type(exc).__name__}: {exc}"
            raise ExpertUnavailable(slot.unavailable) from exc
        if (
            self._used("disk") - (slot.disk.manifest["file_bytes"] if slot.disk else 0) + disk.manifest["file_bytes"]
            > self.tiers["disk"].budget_bytes
        ):
            slot.unavailable = (
                f"{slot.id} needs {disk.manifest['file_bytes'] / 1e9:.2f} GB, more than the disk "
                "tier budget has free: raise COE_DISK_BUDGET"
            )
            raise ExpertUnavailable(slot.unavailable)
        slot.disk, slot.unavailable, slot.verified = disk, None, True  # just written and hashed
        slot.layout = None
        self._size_runtime(slot)
        return disk

    def prepare(self, expert_ids: list[str] | None = None, *, verify: bool = True) -> dict[str, str | None]:
        """Materialise experts up front (all local ones by default); ``verify`` also checks each copy's sha256
        (re-materialising a bad one) and that llama.cpp can read a GGUF expert. Returns expert -> problem
        (None if ready); an expert's failure is in its entry, never raised."""
        problems = {}
        for eid in expert_ids or list(self.slots):
            slot = self._slot(eid)
            try:
                with slot.lock:
                    self._ensure_disk_locked(slot)
                    if verify:
                        self._verify_locked(slot)
                        if slot.runtime == "llama_cpp" and slot.placement == "disk":
                            self._probe_llama_locked(slot)
                problems[eid] = None
            except ExpertUnavailable as exc:
                problems[eid] = str(exc)
        return problems

    def _verify_locked(self, slot: ExpertSlot) -> float:
        """Check the disk copy once per process (sha256 of every byte); re-materialise it if it is bad."""
        if slot.verified and slot.disk and slot.disk.problem(full=False) is None:
            return 0.0
        start = time.perf_counter()
        problem = slot.disk.problem(full=True) if slot.disk else "not materialised"
        if problem:
            if slot.disk:  # one line that says what was wrong with which file and what is done about it
                log.warning(
                    "expert %s: %s; re-materialising it from %s", slot.id, problem, self.config.experts[slot.id].source
                )
            try:
                self._ensure_disk_locked(slot, force=True)
            except ExpertUnavailable as exc:
                slot.unavailable = f"{problem}; re-materialising failed: {exc}"
                raise ExpertUnavailable(slot.unavailable) from None
        slot.verified = True
        return time.perf_counter() - start

    # -- acquire -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def acquire(self, expert_id: str, *, trigger: str = "request", timeout: float = 300.0) -> Iterator[Lease]:
        """Make the expert resident on the execution tier and pin it (never evicted) for the ``with`` block.

        Yields a ``Lease`` (module or llama.cpp model, tokenizer, device, the ``SwapEvent``s this call made,
        manifest, runtime). ``trigger`` is recorded on the swap events. Raises ``ExpertUnavailable`` when the
        expert cannot be materialised or loaded, ``TierBusy`` when it is larger than a whole tier or the tier
        stays full of pinned experts for ``timeout`` seconds.
        """
        slot = self._slot(expert_id)
        with self._lock:
            slot.pins += 1
            slot.last_used = time.monotonic()
        try:
            events = self._make_resident(slot, trigger, timeout)
            if slot.runtime == "llama_cpp":
                llama = slot.llama
                # the context the engine formats prompts for is the one llama.cpp allocated
                yield Lease(
                    expert_id,
                    llama,
                    llama.tokenizer,
                    torch.device("cpu"),
                    events,
                    {**slot.disk.manifest, "context_length": slot.n_ctx},
                    runtime=llama,
                )
                return
            device = self.device if slot.placement != "split" else torch.device("cpu")
            model = slot.split.model if slot.placement == "split" else slot.model
            batcher = self._batcher(slot) if slot.placement != "split" else None
            yield Lease(
                expert_id,
                model,
                slot.tokenizer,
                device,
                events,
                slot.disk.manifest,
                runtime=TransformersRuntime(model, slot.tokenizer, device, batcher=batcher),
            )
        finally:
            with self._lock:
                slot.pins -= 1
                slot.last_used = time.monotonic()
                self._changed.notify_all()

    def prefetch(self, expert_id: str, *, evict: bool = True) -> threading.Thread | None:
        """Stage the expert in CPU RAM in a background thread (no pin, no warm-up) and return the thread, or None
        when there is nothing to do (already staged, loading, unavailable, or larger than the cpu budget).
        Never blocks a turn and never raises for a failed load: the request path reports those.

        ``evict=False``: only into free room (nothing resident is evicted for it), checked when it is asked for:
        the serving queue prefetches a waiting turn's expert that way while another expert's batch decodes."""
        slot = self._slot(expert_id)
        if (
            slot.unavailable
            or slot.placement != "disk"
            or slot.loading
            or slot.resident_bytes > self.tiers["cpu"].budget_bytes
        ):
            return None  # nothing to do, or too big to stage (it will run split when asked for)
        if not evict:
            with self._lock:
                if self._used("cpu") + slot.resident_bytes > self.tiers["cpu"].budget_bytes:
                    return None

        def run() -> None:
            try:
                with slot.lock:
                    if slot.placement == "disk" and slot.disk and not slot.unavailable:
                        self._verify_locked(slot)
                        if slot.runtime == "llama_cpp":
                            self._load_llama(slot, "prefetch", warm=False, timeout=0.0)
                        else:
                            self._load_cpu(slot, "prefetch", warm=False, timeout=0.0)
            except (ExpertUnavailable, TierBusy):
                pass  # a prefetch is best effort; the request path reports problems

        thread = threading.Thread(target=run, name=f"prefetch-{expert_id}", daemon=True)
        thread.start()
        return thread

    def _make_resident(self, slot: ExpertSlot, trigger: str, timeout: float) -> list[SwapEvent]:
        events: list[SwapEvent] = []
        with slot.lock:  # two acquires of one expert: the second waits here and finds it resident
            if slot.unavailable and slot.disk is None:
                raise ExpertUnavailable(f"expert {slot.id} is unavailable: {slot.unavailable}")
            self._ensure_disk_locked(slot)
            verify_s = self._verify_locked(slot)
            if slot.runtime == "llama_cpp":  # executes in the cpu tier, whatever the machine's execution tier
                try:
                    if slot.placement != "cpu":
                        events.append(self._load_llama(slot, trigger, warm=True, timeout=timeout))
                        if verify_s:
                            events[0].phases = {"verify": round(verify_s, 4), **events[0].phases}
                    return events
                except LlamaLoadError as exc:
                    self._fall_back_locked(slot, exc)  # to transformers (runtime auto), else unavailable
                    self._ensure_disk_locked(slot)
                    verify_s = self._verify_locked(slot)
            if slot.placement == self.exec_tier or slot.placement == "split":
                return events
            if slot.bytes > self.tiers[self.exec_tier].budget_bytes:
                events.append(self._load_split(slot, trigger))
                return events
            if slot.placement == "disk":
                events.append(self._load_cpu(slot, trigger, warm=self.exec_tier == "cpu", timeout=timeout))
            if self.exec_tier == "gpu" and slot.placement == "cpu":
                events.append(self._load_gpu(slot, trigger, timeout))
            if verify_s and events:
                events[0].phases = {"verify": round(verify_s, 4), **events[0].phases}
        return events

    def _probe_llama_locked(self, slot: ExpertSlot) -> None:
        """Can llama.cpp read this GGUF at all (architecture, vocabulary)? If not, fall back or mark it
        unavailable now, so that turns routed to it get a stand-in from the start."""
        from coe_core.experts.llama_cpp_runtime import probe

        try:
            probe(slot.disk.weights_path)
        except Exception as exc:
            self._fall_back_locked(
                slot, LlamaLoadError(f"llama.cpp could not load {slot.disk.weights_path.name} of {slot.id} ({exc})")
            )
            self._ensure_disk_locked(slot)
            self._verify_locked(slot)

    def _fall_back_locked(self, slot: ExpertSlot, exc: LlamaLoadError) -> None:
        """llama.cpp could not load the expert: ``runtime: auto`` falls back to transformers (one warning line
        saying why and what it costs); an explicit ``runtime: llama_cpp`` marks it unavailable with the reason."""
        if self.config.experts[slot.id].runtime == "llama_cpp":
            slot.unavailable = f"{exc}; set runtime: transformers (or auto) for {slot.id} to run it dequantised"
            raise ExpertUnavailable(slot.unavailable) from exc
        slot.runtime = "transformers"
        slot.runtime_note = f"{exc}, so it runs on transformers instead: {TRANSFORMERS_COST}."
        log.warning(slot.runtime_note)
        self._read_disk(slot)
        slot.verified = False

    # -- moves ---------------------------------------------------------------------------------------
    def _load_llama(self, slot: ExpertSlot, trigger: str, *, warm: bool, timeout: float) -> SwapEvent:
        """disk -> cpu for a llama.cpp expert: llama.cpp reads the whole GGUF (no mmap) and allocates the KV cache."""
        from coe_core.experts.llama_cpp_runtime import LlamaCppModel

        started = time.perf_counter()
        evicted = self._reserve(slot, "cpu", timeout)  # weights + KV cache
        t0 = time.perf_counter()
        try:
            model = LlamaCppModel(
                slot.disk.weights_path, n_ctx=slot.n_ctx, threads=self.config.experts[slot.id].threads
            )
        except Exception as exc:
            with self._lock:
                slot.loading = None
                self._changed.notify_all()
            raise LlamaLoadError(
                f"llama.cpp could not load {slot.disk.weights_path.name} of {slot.id} ({type(exc).__name__}: {exc})"
            ) from exc
        t1 = time.perf_counter()
        with self._lock:
            slot.llama, slot.placement, slot.loading = model, "cpu", None
            self._changed.notify_all()
        phases = {"load": t1 - t0}
        if warm:
            model.warm_up()
            phases["warmup"] = time.perf_counter() - t1
        return self._emit_load(slot, slot.bytes, t1 - t0, trigger, evicted, phases, started)

    def _prepare_module(self, slot: ExpertSlot) -> dict[str, float]:
        """Build the module skeleton and tokenizer once per process (not part of later swaps)."""
        phases = {}
        if slot.model is None:
            start = time.perf_counter()
            slot.model = loader.build_skeleton(slot.disk.folder, slot.dtype)
            phases["build_once"] = time.perf_counter() - start
        if slot.tokenizer is None:
            from transformers import AutoTokenizer

            start = time.perf_counter()
            slot.tokenizer = AutoTokenizer.from_pretrained(slot.disk.folder)
            phases["tokenizer_once"] = time.perf_counter() - start
        if slot.layout is None:
            slot.layout = loader.WeightsLayout.read(slot.disk.folder)
        return phases

    def _load_cpu(self, slot: ExpertSlot, trigger: str, *, warm: bool, timeout: float) -> SwapEvent:
        started = time.perf_counter()
        phases = self._prepare_module(slot)
        evicted = self._reserve(slot, "cpu", timeout)
        try:
            t0 = time.perf_counter()
            buffer = (
                slot.cpu_buffer
                if slot.cpu_buffer is not None
                else loader.allocate_buffer(slot.layout.nbytes, pin=self.exec_tier == "gpu")
            )
            slot.cpu_buffer = buffer
            t1 = time.perf_counter()
            loader.parallel_read(
                slot.layout.path, slot.layout.data_offset, buffer, threads=self.config.tiers.read_threads
            )
            t2 = time.perf_counter()
            views = loader.tensor_views(buffer, slot.layout)
            loader.bind(slot.model, views)
            t3 = time.perf_counter()
        except Exception as exc:
            with self._lock:
                slot.loading = None
                if slot.cpu_buffer is not None:
                    self._pool.append(slot.cpu_buffer)
                slot.cpu_buffer = None
                self._changed.notify_all()
            slot.verified = False  # re-check the disk copy next time
            raise ExpertUnavailable(f"loading {slot.id} from the disk tier failed: {exc}") from exc
        with self._lock:
            slot.cpu_buffer, slot.cpu_views = buffer, views
            slot.placement, slot.loading = "cpu", None
            self._changed.notify_all()  # a waiter in _reserve may now find an evictable expert
        phases.update(alloc=t1 - t0, read=t2 - t1, bind=t3 - t2)
        if warm:
            t4 = time.perf_counter()
            loader.warm_up(slot.model)
            phases["warmup"] = time.perf_counter() - t4
        # seconds = the move itself (alloc + read + bind); one-off and warm-up phases are reported apart
        return self._emit_load(slot, slot.layout.nbytes, t3 - t0, trigger, evicted, phases, started)

    def _load_gpu(self, slot: ExpertSlot, trigger: str, timeout: float) -> SwapEvent:
        started = time.perf_counter()
        evicted = self._reserve(slot, "gpu", timeout)
        t0 = time.perf_counter()
        try:
            gpu_buffer = loader.copy_to_device(
                slot.cpu_buffer, self.device, chunk_bytes=self.config.tiers.copy_chunk_mb << 20
            )
            t1 = time.perf_counter()
            loader.bind(slot.model, loader.tensor_views(gpu_buffer, slot.layout))
            loader.move_buffers(slot.model, self.device)
            t2 = time.perf_counter()
        except Exception as exc:
            with self._lock:
                slot.loading = None
                self._changed.notify_all()
            raise ExpertUnavailable(f"moving {slot.id} to the GPU failed: {exc}") from exc
        with self._lock:
            slot.gpu_buffer = gpu_buffer
            slot.placement, slot.loading = "gpu", None
            self._changed.notify_all()
        loader.warm_up(slot.model)
        t3 = time.perf_counter()
        phases = {"copy": round(t1 - t0, 4), "bind": round(t2 - t1, 4), "warmup": round(t3 - t2, 4)}
        return self._emit(
            SwapEvent(slot.id, "cpu", "gpu", slot.layout.nbytes, t2 - t0, trigger, evicted, phases, started_at=started)
        )

    def _load_split(self, slot: ExpertSlot, trigger: str) -> SwapEvent:
        """The expert does not fit the execution tier: accelerate places it across gpu/cpu/disk."""
        start = time.perf_counter()
        with self._lock:
            evicted = []
            for other in self._lru_candidates(self.exec_tier, exclude=slot):
                evicted.append(other.id)
                self._evict_locked(other, self.exec_tier)
            if slot.placement == "cpu":  # a staged copy (prefetch) is not used by the split placement
                self._evict_locked(slot, "cpu")
            self._pool.clear()  # the split placement needs the room, not pooled buffers
            free = {
                t: max(self.tiers[t].budget_bytes - self._used(t), 0) for t in ("gpu", "cpu") if self.tiers[t].exists
            }
            slot.loading = "split"
        try:
            placement = place_split(slot.disk.folder, slot.dtype, free, self.data_dir / "offload" / slot.id)
        except Exception as exc:
            raise ExpertUnavailable(f"placing {slot.id} across tiers failed: {exc}") from exc
        finally:
            with self._lock:
                slot.loading = None
        with self._lock:
            slot.split, slot.placement = placement, "split"
            if slot.tokenizer is None:
                from transformers import AutoTokenizer

                slot.tokenizer = AutoTokenizer.from_pretrained(slot.disk.folder)
        seconds = time.perf_counter() - start
        dst = "+".join(t for t, b in placement.bytes_by_tier.items() if b)
        return self._emit(
            SwapEvent(
                slot.id,
                "disk",
                f"split({dst})",
                slot.bytes,
                seconds,
                trigger,
                evicted,
                {"dispatch": round(seconds, 4)},
                started_at=start,
            )
        )

    # -- batched decoding (transformers) -----------------------------------------------------------
    def _batcher(self, slot: ExpertSlot) -> BatchedDecoder | None:
        """The decode thread of a transformers expert resident on the execution tier: made at its first turn
        there, closed when it leaves that tier (``_evict_locked``), made again when the last one stopped (its
        thread broke). None for a model it cannot batch."""
        with self._lock:
            if not self.batching:
                return None
            if slot.batcher is not None and slot.batcher.closed:
                slot.batcher, slot.kv_live = None, 0  # (it gave its bytes back on its way out, or they are lost)
            if slot.batcher is None and batchable(slot.model):
                tier = slot.placement
                # the callbacks check that they come from the slot's current decoder: a stopped one's late
                # release must not take bytes off its successor's count
                kv = KVBudget(
                    reserve=lambda n: self._reserve_kv(slot, kv, n),
                    release=lambda n: self._release_kv(slot, kv, n),
                    capacity=lambda: self.tiers[tier].budget_bytes - slot.bytes,
                    holders=lambda: self._holders(tier, slot),
                    others_decoding=lambda: self._others_decoding(tier, slot),
                )
                slot.batcher = BatchedDecoder(slot.model, slot.tokenizer, self.device, name=slot.id, kv_budget=kv)
            return slot.batcher

    def _reserve_kv(self, slot: ExpertSlot, kv: KVBudget, nbytes: int) -> bool:
        """Count ``nbytes`` more of the expert's KV cache in its tier, evicting idle experts (LRU) for room;
        False when the room is held by experts in use (the turn waits). Evicts nothing unless evicting every
        idle expert there would make the room."""
        with self._lock:
            if slot.batcher is None or slot.batcher.kv_budget is not kv:
                return False  # a decoder the expert no longer has
            tier = slot.placement
            budget = self.tiers[tier].budget_bytes
            candidates = self._lru_candidates(tier, exclude=slot)
            reclaimable = sum(c.bytes_in(tier) for c in candidates)
            if tier == "cpu":
                reclaimable += sum(b.numel() for b in self._pool)
            if self._used(tier) - reclaimable + nbytes > budget:
                return False
            while self._used(tier) + nbytes > budget:
                if tier == "cpu" and self._pool:
                    self._trim_pool(budget - nbytes)
                    continue
                candidates = self._lru_candidates(tier, exclude=slot)
                if not candidates:
                    return False
                self._evict_locked(candidates[0], tier)
            slot.kv_live += nbytes
            return True

    def _release_kv(self, slot: ExpertSlot, kv: KVBudget, nbytes: int) -> None:
        with self._lock:
            if slot.batcher is not None and slot.batcher.kv_budget is kv:
                slot.kv_live -= nbytes
            self._changed.notify_all()  # a load waiting in _reserve may fit now

    def _holders(self, tier: str, slot: ExpertSlot) -> list[str]:
        """The other experts holding bytes in ``tier`` (named when a turn gets no room there)."""
        with self._lock:
            return [s.id for s in self.slots.values() if s is not slot and s.bytes_in(tier) > 0]

    def _others_decoding(self, tier: str, slot: ExpertSlot) -> bool:
        """Whether other experts in ``tier`` hold KV cache now: their turns decode, and leave room when done."""
        with self._lock:
            return any(s is not slot and s.kv_live > 0 and s.placement == tier for s in self.slots.values())

    # -- budgets and eviction ------------------------------------------------------------------
    def _lru_candidates(self, tier: str, exclude: ExpertSlot) -> list[ExpertSlot]:
        holders = [
            s
            for s in self.slots.values()
            if s is not exclude and s.pins == 0 and not s.loading and s.bytes_in(tier) > 0
        ]
        return sorted(holders, key=lambda s: s.last_used)

    def _reserve(self, slot: ExpertSlot, tier: str, timeout: float) -> list[str]:
        """Make room for ``slot`` in ``tier`` by evicting LRU unpinned experts; mark it loading there."""
        need = slot.resident_bytes
        deadline = time.monotonic() + timeout
        evicted: list[str] = []
        with self._lock:
            if need > self.tiers[tier].budget_bytes:
                raise TierBusy(
                    f"{slot.id} needs {need / 1e9:.2f} GB, more than the whole {tier} tier budget "
                    f"({self.tiers[tier].budget_bytes / 1e9:.2f} GB): raise COE_{tier.upper()}_BUDGET"
                )
            while True:
                if tier == "cpu" and slot.cpu_buffer is None and slot.layout is not None:
                    slot.cpu_buffer = self._pop_pooled(slot.layout.nbytes)  # reuse a freed buffer of this size
                budget = self.tiers[tier].budget_bytes
                if tier == "cpu":
                    self._trim_pool(budget - need)
                if self._used(tier) + need <= budget:
                    slot.loading = tier
                    return evicted
                candidates = self._lru_candidates(tier, exclude=slot)
                if candidates:
                    victim = candidates[0]
                    self._evict_locked(victim, tier)
                    evicted.append(victim.id)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if slot.cpu_buffer is not None and slot.placement == "disk":
                        self._pool.append(slot.cpu_buffer)
                        slot.cpu_buffer = None
                    raise TierBusy(
                        f"the {tier} tier ({budget / 1e9:.2f} GB) is held by experts in use "
                        f"({', '.join(self._holders(tier, slot))}); "
                        "try again when they finish, or raise the tier budget"
                    )
                self._changed.wait(remaining)

    def _evict_locked(self, slot: ExpertSlot, tier: str) -> None:
        """Evict ``slot`` out of ``tier`` (and out of the tiers above it). Caller holds the manager lock."""
        if slot.runtime == "llama_cpp":
            if tier == "cpu" and slot.placement == "cpu" and slot.llama is not None:
                start = time.perf_counter()
                slot.llama.close()  # frees weights and KV cache now
                slot.llama, slot.placement = None, "disk"
                self._emit(SwapEvent(slot.id, "cpu", "disk", slot.bytes, time.perf_counter() - start, "eviction"))
            return
        if slot.placement == "split":
            slot.split = None
            slot.placement = "disk"
            self._emit(SwapEvent(slot.id, "split", "disk", slot.bytes, 0.0, "eviction"))
            gc.collect()
            return
        if slot.batcher is not None and (slot.placement == "gpu" or (tier == "cpu" and slot.placement == "cpu")):
            slot.batcher.close()  # it leaves the tier it decodes on (unpinned: no turn is in its batch)
            # with no turn in it its cache holds nothing; bytes still counted are written off (its late release
            # is ignored: it is no longer the slot's decoder)
            slot.batcher, slot.kv_live = None, 0
        if slot.placement == "gpu":
            start = time.perf_counter()
            # Weights never change: re-point at the CPU copy instead of copying device -> host.
            loader.bind(slot.model, slot.cpu_views)
            loader.move_buffers(slot.model, torch.device("cpu"))
            slot.gpu_buffer = None
            slot.placement = "cpu"
            self._emit(SwapEvent(slot.id, "gpu", "cpu", slot.bytes, time.perf_counter() - start, "eviction"))
        if tier == "cpu" and slot.placement == "cpu":
            start = time.perf_counter()
            loader.unbind(slot.model)
            self._pool.append(slot.cpu_buffer)
            slot.cpu_buffer, slot.cpu_views = None, None
            slot.placement = "disk"
            self._emit(SwapEvent(slot.id, "cpu", "disk", slot.bytes, time.perf_counter() - start, "eviction"))

    def evict(self, expert_id: str, tier: str = "cpu") -> None:
        """Evict an expert from ``tier`` (and the tiers above it) now; raises ``TierBusy`` while it generates.

        Its CPU buffer goes to the pool for the next load of the same size; the pool counts against the cpu
        budget and is freed first when room is needed.
        """
        slot = self._slot(expert_id)
        with self._lock:
            if slot.pins:
                raise TierBusy(f"{expert_id} is generating; it cannot be evicted now")
            self._evict_locked(slot, tier)

    def _pop_pooled(self, nbytes: int) -> torch.Tensor | None:
        """A freed buffer of exactly ``nbytes`` from the pool, if there is one."""
        for i, buf in enumerate(self._pool):
            if buf.numel() == nbytes:
                return self._pool.pop(i)
        return None

    def _trim_pool(self, allowed: int) -> None:
        """Free pooled buffers until the cpu tier has ``allowed`` bytes for a new expert (or the pool is empty)."""
        while self._pool and self._used("cpu") > max(allowed, 0):
            self._pool.pop(0)

    def _emit_load(self, slot, nbytes, seconds, trigger, evicted, phases, started) -> SwapEvent:
        """The disk -> cpu swap of either weights format (GGUF into llama.cpp, safetensors into the skeleton)."""
        rounded = {k: round(v, 4) for k, v in phases.items()}
        return self._emit(
            SwapEvent(slot.id, "disk", "cpu", nbytes, seconds, trigger, evicted, rounded, started_at=started)
        )

    def _emit(self, event: SwapEvent) -> SwapEvent:
        self.history.append(event)
        if self.on_swap:
            self.on_swap(event)
        return event

    # -- info --------------------------------------------------------------------------------------
    def disk_folder(self, expert_id: str) -> Path | None:
        """The folder of the expert's disk copy, None while it is not materialised."""
        slot = self._slot(expert_id)
        return slot.disk.folder if slot.disk else None

    def unavailable_reason(self, expert_id: str) -> str | None:
        """Why the expert cannot be made resident (materialising, verifying or loading failed), else None."""
        return self._slot(expert_id).unavailable

    def params(self) -> dict[str, int]:
        """Active parameters of each materialised expert (from its disk-tier manifest)."""
        return {e: slot.params for e, slot in self.slots.items() if slot.disk}

    def close(self) -> None:
        """Release what the tiers hold now (CPU and GPU buffers, llama.cpp models and their KV caches, decode
        threads), except experts still generating; the disk tier stays. The manager can be used again afterwards."""
        with self._lock:
            batchers = [s.batcher for s in self.slots.values() if s.batcher is not None and not s.pins]
            for slot in self.slots.values():
                if not slot.pins:
                    self._evict_locked(slot, "cpu")
            self._pool.clear()
        for batcher in batchers:  # not under the lock: a decode thread may release KV bytes on its way out
            batcher.close(wait=True)
