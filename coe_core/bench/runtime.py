"""``coe bench runtime``: the llama.cpp runtime against raw llama-cpp-python and the transformers runtime.

Per GGUF expert, in one run, on the same prompt (greedy, ``--tokens`` new tokens):
- ``tokens_per_s``: through the engine (``CoE.run``: lease, worker thread, stop filter, detokenising);
- ``raw_llama_cpp_tokens_per_s``: llama-cpp-python's own ``Llama.generate`` on a second copy of the same file,
  with the same context and threads; ``ratio_to_raw`` = engine / raw;
- ``transformers_tokens_per_s``: the same expert on the transformers runtime (the GGUF dequantised to float32);
- ``resident_bytes``: growth of the process RSS when the TierManager loads the expert (llama.cpp reads the whole
  file: no mmap), against ``file_bytes`` and the ``accounted_bytes`` (weights + KV cache) the cpu tier counts;
- ``swap_s``: disk -> cpu through the TierManager (median), against a parallel read of the same file into RAM
  (``read_ceiling_s``, page cache warm); ``swap_ratio_to_read_ceiling`` = ceiling / swap; ``vocab_only_load_s``:
  what llama.cpp spends on metadata and vocabulary alone (a vocabulary-only load), part of every swap;
- ``batch8_tokens_per_s``: 8 turns on the expert at once through the engine, all tokens / wall time;
- ``greedy_token_identical``: the engine's greedy ids == raw llama-cpp-python's greedy ids.
Engine and raw runs alternate so that load from other processes hits both alike; every figure is a median.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from coe_core.config import CoEConfig
from coe_core.experts.generation import GenerationParams, GenerationResult
from coe_core.tiers import loader

PROMPT = "Write a long story about a robot who learns to paint."


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _raw_rate(llm, ids: list[int], tokens: int, *, stop_at_eog: bool) -> tuple[float, list[int]]:
    """Raw llama-cpp-python: ``Llama.generate`` greedy; tokens/s between the first and the last token."""
    import llama_cpp

    out, first = [], None
    for token in llm.generate(ids, temp=0.0):
        if first is None:
            first = time.perf_counter()
        if stop_at_eog and llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        out.append(token)
        if len(out) >= tokens:
            break
    elapsed = time.perf_counter() - first
    return ((len(out) - 1) / elapsed if len(out) > 1 and elapsed > 0 else 0.0), out


def _engine_rate(coe, expert: str, tokens: int) -> float:
    _, _, stats = coe.run(PROMPT, {"expert": expert}, temperature=0, max_new_tokens=tokens, min_new_tokens=tokens)
    if stats.status != "ok":
        raise RuntimeError(f"{expert}: {stats.error}")
    return stats.tokens_per_s


def _concurrent_rate(coe, expert: str, tokens: int, users: int) -> float:
    """``users`` turns at once on one expert: all their tokens / wall time."""

    def one(_):
        _, _, stats = coe.run(PROMPT, {"expert": expert}, temperature=0, max_new_tokens=tokens, min_new_tokens=tokens)
        return stats.new_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=users) as pool:
        total = sum(pool.map(one, range(users)))
    return total / (time.perf_counter() - start)


def _read_ceiling(path, nbytes: int, threads: int, repeats: int) -> float:
    buffer = loader.allocate_buffer(nbytes, pin=False)
    buffer.fill_(0)  # pre-touched: the ceiling is the read, not page faults
    times = []
    for _ in range(repeats + 1):  # the first read warms the page cache
        start = time.perf_counter()
        loader.parallel_read(path, 0, buffer, threads=threads)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _no_stops(config: CoEConfig, expert: str) -> CoEConfig:
    """Without the expert's stop strings every turn generates exactly ``--tokens`` tokens, like the raw loop
    (a plain-format expert would otherwise end its answer at "\nQuestion:" after a few tokens)."""
    config.experts[expert].stop = []
    return config


def bench_expert(
    config: CoEConfig,
    expert: str,
    *,
    tokens: int,
    repeats: int,
    users: int,
    transformers: bool,
    threads: int | None = None,
) -> dict:
    import llama_cpp

    from coe_core.bench.swap import with_runtime
    from coe_core.engine import CoE
    from coe_core.experts.llama_cpp_runtime import default_threads

    coe = CoE(
        _no_stops(with_runtime(config, "llama_cpp", [expert], threads), expert), routing=None, store=None, gpu=False
    )
    row: dict = {"expert": expert}
    try:
        tiers = coe.tiers
        problem = tiers.prepare([expert])[expert]
        if problem:
            return {**row, "error": problem}
        slot = tiers.slots[expert]
        threads = coe.config.experts[expert].threads or default_threads()
        row.update(
            runtime=slot.runtime,
            file_bytes=slot.disk.manifest["file_bytes"],
            n_ctx=slot.n_ctx,
            kv_bytes=slot.kv_bytes,
            accounted_bytes=slot.resident_bytes,
            threads=threads,
        )
        path = slot.disk.weights_path
        ceiling = _read_ceiling(path, path.stat().st_size, config.tiers.read_threads, repeats)
        swaps, grown = [], []
        for _ in range(repeats):
            tiers.evict(expert, "cpu")
            gc.collect()
            before = _rss()
            with tiers.acquire(expert) as lease:
                grown.append(_rss() - before)
                swaps.append(lease.events[0].seconds)
        swap = statistics.median(swaps)
        from coe_core.experts.llama_cpp_runtime import probe

        vocab = []
        for _ in range(repeats):  # the part of a load that is not reading weights: metadata + vocabulary
            start = time.perf_counter()
            probe(path)
            vocab.append(time.perf_counter() - start)
        row["vocab_only_load_s"] = round(statistics.median(vocab), 4)
        row.update(
            resident_bytes=int(statistics.median(grown)),
            swap_s=round(swap, 4),
            read_ceiling_s=round(ceiling, 4),
            swap_ratio_to_read_ceiling=round(ceiling / swap, 3),
        )
        row["resident_ratio_to_file"] = round(row["resident_bytes"] / row["file_bytes"], 2)

        # the same prompt ids for both: the engine's formatting of PROMPT
        with tiers.acquire(expert) as lease:
            prompt = lease.runtime.format_prompt(
                [{"role": "user", "content": PROMPT}],
                config.experts[expert],
                context_length=slot.n_ctx,
                reserve_tokens=tokens,
            )
            ids = prompt.input_ids
            result = GenerationResult()
            for _ in lease.runtime.stream(ids, GenerationParams(tokens, 0.0), cancel=threading.Event(), result=result):
                pass
            engine_ids = result.token_ids
        raw = llama_cpp.Llama(
            str(path), n_ctx=slot.n_ctx, use_mmap=False, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        try:
            _, raw_ids = _raw_rate(raw, ids, tokens, stop_at_eog=True)
            row["greedy_token_identical"] = engine_ids == raw_ids
            row["greedy_tokens_compared"] = len(raw_ids)
            engine_rates, raw_rates = [], []
            for _ in range(repeats):  # alternate, so that load from other processes hits both alike
                engine_rates.append(_engine_rate(coe, expert, tokens))
                raw_rates.append(_raw_rate(raw, ids, tokens, stop_at_eog=False)[0])
        finally:
            raw.close()
        engine, raw_rate = statistics.median(engine_rates), statistics.median(raw_rates)
        row.update(
            tokens_per_s=round(engine, 2),
            raw_llama_cpp_tokens_per_s=round(raw_rate, 2),
            ratio_to_raw=round(engine / raw_rate, 3) if raw_rate else None,
        )
        batch = _concurrent_rate(coe, expert, tokens, users) if users else None
        row["batch8_tokens_per_s"] = round(batch, 2) if batch else None
        row["batch8_ratio_to_single"] = round(batch / engine, 2) if batch and engine else None
        row["batched_steps"] = slot.llama.steps if slot.llama is not None else None
        tiers.evict(expert, "cpu")
    finally:
        coe.close()
    if transformers:
        row.update(_transformers_row(config, expert, tokens, max(1, repeats // 2)))
        if row.get("transformers_tokens_per_s"):
            row["ratio_to_transformers"] = round(row["tokens_per_s"] / row["transformers_tokens_per_s"], 2)
    return row


def _transformers_row(config: CoEConfig, expert: str, tokens: int, repeats: int) -> dict:
    from coe_core.bench.swap import with_runtime
    from coe_core.engine import CoE

    coe = CoE(_no_stops(with_runtime(config, "transformers", [expert]), expert), routing=None, store=None, gpu=False)
    try:
        problem = coe.tiers.prepare([expert])[expert]  # materialises the float32 copy once (20-50 s)
        if problem:
            return {"transformers_error": problem}
        rates = [_engine_rate(coe, expert, tokens) for _ in range(repeats + 1)][1:]  # the first one swaps in
        slot = coe.tiers.slots[expert]
        out = {
            "transformers_tokens_per_s": round(statistics.median(rates), 2),
            "transformers_resident_bytes": slot.resident_bytes,
        }
        coe.tiers.evict(expert, "cpu")
        return out
    finally:
        coe.close()


def bench_runtime(
    config: CoEConfig,
    *,
    tokens: int = 64,
    repeats: int = 3,
    users: int = 8,
    transformers: bool = True,
    experts: list[str] | None = None,
    threads: int | None = None,
) -> dict:
    from coe_core.experts.llama_cpp_runtime import llama_cpp_unavailable

    problem = llama_cpp_unavailable()
    if problem:
        return {"error": f"llama-cpp-python is not importable ({problem}): pip install llama-cpp-python==0.3.36"}
    import llama_cpp

    names = experts or [e for e, c in config.experts.items() if c.is_gguf]
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = [
        bench_expert(config, e, tokens=tokens, repeats=repeats, users=users, transformers=transformers, threads=threads)
        for e in names
    ]
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "llama_cpp_python": llama_cpp.__version__,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "prompt": PROMPT,
        "tokens": tokens,
        "repeats": repeats,
        "users": users,
        "seconds": round(time.perf_counter() - start, 1),
        "experts": rows,
    }
