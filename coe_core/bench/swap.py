"""``coe bench swap``: how fast experts switch, against a ceiling and baselines measured in the same run.

For each packaged expert and a synthetic checkpoint (about 1 GB), with the page cache warm and cold:
- ceiling: parallel reads of the same bytes into a pre-touched buffer (same threads, same chunking);
- this project's disk -> CPU swap through the TierManager (and CPU -> GPU where a GPU exists, against a
  pinned-copy ceiling);
- baseline: transformers ``from_pretrained`` of the same folder (lazy by default, so also "touched": every
  weight read once, which is what a swap guarantees);
- baseline: accelerate's offloaded execution (``disk_offload``), time to first token, against the engine's own
  time to first token from disk (swap + forward);
- generation through the engine vs plain ``model.generate`` on the same expert and prompt.
Figures, not tests: the machine is shared and noisy, so every number is a median over repeats.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from coe_core.config import CoEConfig, config_from_dict
from coe_core.events import SwapEvent
from coe_core.experts.weights import MODULE_BUILD_LOCK, WEIGHTS_FILE
from coe_core.tiers import loader
from coe_core.tiers.manager import TierManager

PROMPT = "Explain in two sentences why the sky is blue."


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def drop_page_cache(path: Path) -> float | None:
    """Ask the kernel to evict the file from the page cache; return the fraction still cached (None: unknown)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return cached_fraction(path)


def cached_fraction(path: Path) -> float | None:
    """Fraction of the file in the page cache, from util-linux ``fincore`` (None where it is missing)."""
    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        return round(int(out[0]) / max(int(out[1]), 1), 3)
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def ceiling_read(path: Path, layout: loader.WeightsLayout, threads: int, repeats: int, cold: bool) -> dict:
    """Parallel preads of the same bytes into a pre-touched buffer: what the disk->CPU swap can hope for."""
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    buffer.fill_(0)  # pre-touched: no page faults inside the timing
    seconds, cached = [], []
    for _ in range(repeats):
        if cold:
            cached.append(drop_page_cache(path))
        start = time.perf_counter()
        loader.parallel_read(path, layout.data_offset, buffer, threads=threads)
        seconds.append(time.perf_counter() - start)
    return {"seconds": _median(seconds), "cached_after_drop": cached}


def engine_swaps(tiers: TierManager, expert: str, repeats: int, cold: bool) -> dict:
    """disk -> CPU swaps through the TierManager (evict, then acquire), median over repeats."""
    path = tiers.disk_folder(expert) / WEIGHTS_FILE
    events: list[SwapEvent] = []
    cached = []
    for _ in range(repeats):
        tiers.evict(expert, "cpu")
        if cold:
            cached.append(drop_page_cache(path))
        with tiers.acquire(expert) as lease:
            events.extend(e for e in lease.events if e.src == "disk" and e.dst == "cpu")
    first = events[0] if events else None
    return {
        "seconds": _median([e.seconds for e in events]),
        "read_seconds": _median([e.phases.get("read", 0.0) for e in events]),
        "warmup_seconds": _median([e.phases.get("warmup", 0.0) for e in events]),
        "first_seconds": first.seconds if first else None,
        "cached_after_drop": cached,
    }


def from_pretrained_times(folder: Path, dtype: torch.dtype, repeats: int, cold: bool) -> dict:
    from transformers import AutoModelForCausalLM

    lazy, touched = [], []
    for _ in range(repeats):
        if cold:
            drop_page_cache(folder / WEIGHTS_FILE)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        lazy.append(time.perf_counter() - start)
        with torch.inference_mode():
            for p in model.parameters():  # fault in every page: safetensors maps lazily, a swap reads every byte
                p.reshape(-1)[:: max(4096 // p.element_size(), 1)].sum()
        touched.append(time.perf_counter() - start)
        del model
    return {"seconds": _median(lazy), "touched_seconds": _median(touched)}


def accelerate_offload_ttft(folder: Path, dtype: torch.dtype, input_ids: torch.Tensor, work: Path) -> float:
    """accelerate's disk offload: every layer streams from disk for every forward; time to first token."""
    from accelerate import disk_offload
    from transformers import AutoModelForCausalLM

    with MODULE_BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    offload_dir = work / "accelerate-offload"
    shutil.rmtree(offload_dir, ignore_errors=True)
    with MODULE_BUILD_LOCK:
        model = disk_offload(model, str(offload_dir), execution_device=torch.device("cpu"))
    drop_dir_cache(offload_dir)
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids)
    return time.perf_counter() - start


def drop_dir_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            drop_page_cache(path)


def engine_ttft_from_disk(tiers: TierManager, expert: str, input_ids: torch.Tensor) -> float:
    """The engine's own time to first token for an expert on disk: swap in, then the same forward."""
    tiers.evict(expert, "cpu")
    drop_page_cache(tiers.disk_folder(expert) / WEIGHTS_FILE)
    start = time.perf_counter()
    with tiers.acquire(expert) as lease, torch.inference_mode():
        lease.model(input_ids.to(lease.device))
    return time.perf_counter() - start


def cpu_to_gpu(tiers: TierManager, expert: str, repeats: int) -> dict:
    """CPU -> GPU swaps against a pinned host->device copy of the same bytes (GPU machines only)."""
    slot = tiers.slots[expert]
    seconds = []
    for _ in range(repeats):
        tiers.evict(expert, "gpu")
        with tiers.acquire(expert) as lease:
            seconds.extend(e.seconds for e in lease.events if e.dst == "gpu")
    pinned = torch.empty(slot.bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(slot.bytes, dtype=torch.uint8, device="cuda")
    ceiling = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        ceiling.append(time.perf_counter() - start)
    swap_s, ceil_s = _median(seconds), _median(ceiling)
    return {
        "cpu_to_gpu_gbps": round(slot.bytes / swap_s / 1e9, 2),
        "pinned_copy_gbps": round(slot.bytes / ceil_s / 1e9, 2),
        "cpu_to_gpu_ratio_to_ceiling": round(ceil_s / swap_s, 3),
    }


def make_synthetic(folder: Path, target_bytes: int, tokenizer_from: Path) -> Path:
    """A random-weight Llama checkpoint of about ``target_bytes`` in float32 (made once, then reused).

    It borrows the tokenizer of a materialised expert so the engine can serve it like any other.
    """
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    hidden, inter, vocab = 1024, 2816, len(tokenizer)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target_bytes / 4 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=vocab,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    with MODULE_BUILD_LOCK:
        model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1000GB")
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return folder


def with_runtime(
    config: CoEConfig, runtime: str, experts: list[str] | None = None, threads: int | None = None
) -> CoEConfig:
    """The same CoE with ``runtime`` (and llama.cpp ``threads``) set on its local experts (GGUF ones only for
    llama_cpp)."""
    raw = config.model_dump(exclude={"source_path"})
    for eid, expert in raw["profiles"][config.profile]["experts"].items():
        cfg = config.experts[eid]
        if (experts is None or eid in experts) and not cfg.is_remote and (runtime != "llama_cpp" or cfg.is_gguf):
            expert["runtime"] = runtime
            if threads:
                expert["threads"] = threads
    return config_from_dict(raw, origin="bench config", source_path=config.source_path, env=False)


def bench_config(config: CoEConfig, synthetic: Path | None) -> CoEConfig:
    """The user's CoE plus the synthetic expert, with a CPU budget that holds any one of them."""
    raw = config.model_dump(exclude={"source_path"})
    profile = raw["profiles"][config.profile]
    if synthetic is not None:
        profile["experts"]["synthetic-1gb"] = {"source": f"dir:{synthetic}"}
    return config_from_dict(raw, origin="bench config", source_path=config.source_path, env=False)


def bench_swap(
    config: CoEConfig,
    *,
    synthetic_gb: float = 1.0,
    repeats: int = 5,
    cold: bool = True,
    generation_tokens: int = 64,
    experts: list[str] | None = None,
) -> dict:
    work = config.data_path / "bench"
    work.mkdir(parents=True, exist_ok=True)
    # this bench measures the transformers runtime's safetensors swaps (coe bench runtime measures llama.cpp)
    config = with_runtime(config, "transformers")
    tiers = TierManager(config, progress=True)
    problems = tiers.prepare(experts)
    synthetic = None
    ready = [e for e, p in problems.items() if p is None]
    if synthetic_gb and ready:
        synthetic = make_synthetic(
            work / f"synthetic-{synthetic_gb:g}gb", int(synthetic_gb * 1e9), tiers.disk_folder(ready[0])
        )
        tiers = TierManager(bench_config(config, synthetic), progress=True)
        problems = tiers.prepare(experts + ["synthetic-1gb"] if experts else None)
    cfg = tiers.config
    names = [e for e, p in problems.items() if p is None]
    threads = cfg.tiers.read_threads
    results = []
    for expert in names:
        slot = tiers.slots[expert]
        folder = tiers.disk_folder(expert)
        layout = loader.WeightsLayout.read(folder)
        with tiers.acquire(expert):  # first load: builds the module once (not part of a swap)
            pass
        input_ids = torch.tensor([[1] + list(range(100, 115))])
        # accelerate's disk offload streams weights from its offload folder on every forward (page cache
        # dropped first): measured once per expert, reported on every row of the expert
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            offload_ttft = round(accelerate_offload_ttft(folder, slot.dtype, input_ids, Path(tmp)), 4)
        for cache in ["warm", "cold"] if cold else ["warm"]:
            is_cold = cache == "cold"
            if not is_cold:  # warm the page cache
                ceiling_read(layout.path, layout, threads, 1, False)
            ceil = ceiling_read(layout.path, layout, threads, repeats, is_cold)
            swap = engine_swaps(tiers, expert, repeats, is_cold)
            fp = from_pretrained_times(folder, slot.dtype, max(2, repeats // 2), is_cold)
            achieved = (
                [c for c in ceil["cached_after_drop"] + swap["cached_after_drop"] if c is not None] if is_cold else []
            )
            row = {
                "expert": expert,
                "bytes": slot.bytes,
                "cache": cache,
                "cold_achieved": (max(achieved) < 0.05 if achieved else None) if is_cold else None,
                "ceiling_gbps": round(slot.bytes / ceil["seconds"] / 1e9, 2),
                "disk_to_cpu_gbps": round(slot.bytes / swap["seconds"] / 1e9, 2),
                "ratio_to_ceiling": round(ceil["seconds"] / swap["seconds"], 3),
                "swap_s": round(swap["seconds"], 4),
                "first_swap_s": round(swap["first_seconds"], 4) if swap["first_seconds"] else None,
                "warmup_s": round(swap["warmup_seconds"], 4),
                "from_pretrained_s": round(fp["seconds"], 4),
                "from_pretrained_touched_s": round(fp["touched_seconds"], 4),
                "speedup_vs_from_pretrained": round(fp["seconds"] / swap["seconds"], 2),
                "speedup_vs_from_pretrained_touched": round(fp["touched_seconds"] / swap["seconds"], 2),
            }
            row["accelerate_offload_ttft_s"] = offload_ttft
            if is_cold:  # the engine's own first token from a cold disk copy: swap + the same forward
                row["engine_ttft_from_disk_s"] = round(engine_ttft_from_disk(tiers, expert, input_ids), 4)
            if tiers.exec_tier == "gpu":
                row.update(cpu_to_gpu(tiers, expert, repeats))
            results.append(row)
        tiers.evict(expert, "cpu")  # make room for the next one
    generation = bench_generation(config, generation_tokens) if generation_tokens else None
    return {
        "machine": _machine(),
        "read_threads": threads,
        "repeats": repeats,
        "experts": results,
        "generation": generation,
        "unavailable": {e: p for e, p in problems.items() if p},
    }


def bench_generation(config: CoEConfig, tokens: int, repeats: int = 3) -> dict:
    """Tokens/s through the engine (streaming, worker thread) vs plain ``model.generate`` on the same input."""
    from coe_core.engine import CoE
    from coe_core.experts.prompt_format import format_prompt

    expert = config.active_profile.default_expert
    coe = CoE(config, routing=None, store=None)
    try:
        engine_rates, plain_rates = [], []
        for _ in range(repeats):
            _, _, stats = coe.run(
                PROMPT, {"expert": expert}, temperature=0, max_new_tokens=tokens, min_new_tokens=tokens
            )
            gen_start = next(start for phase, start, _ in stats.timeline if phase == "prefill")
            gen_end = next(end for phase, _, end in stats.timeline if phase == "generate")
            engine_rates.append(stats.new_tokens / (gen_end - gen_start))
            with coe.tiers.acquire(expert) as lease:
                prompt = format_prompt(
                    lease.tokenizer,
                    [{"role": "user", "content": PROMPT}],
                    config.experts[expert],
                    context_length=2048,
                    reserve_tokens=tokens,
                )
                ids = torch.tensor([prompt.input_ids])
                start = time.perf_counter()
                with torch.inference_mode():
                    out = lease.model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=tokens,
                        min_new_tokens=tokens,
                        do_sample=False,
                        pad_token_id=lease.tokenizer.eos_token_id,
                    )
                plain_rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
        engine, plain = _median(engine_rates), _median(plain_rates)
        return {
            "expert": expert,
            "tokens": tokens,
            "engine_tokens_per_s": round(engine, 2),
            "plain_tokens_per_s": round(plain, 2),
            "ratio": round(engine / plain, 3),
        }
    finally:
        coe.close()


def _machine() -> dict:
    import platform

    info = {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
