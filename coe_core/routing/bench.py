"""``coe bench route``: routing latency (one prompt, warm), what each feature block costs, and batch
throughput, as JSON figures."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections import Counter
from typing import Any

import numpy as np

from coe_core.config import CoEConfig

TARGETS = {"p50_ms": 15.0, "p95_ms": 25.0, "prompts_per_s_batch": 200.0}


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(np.mean(ms)), 3),
    }


def _timed(fn, items) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - start) * 1000)
    return out


def _bench_prompts(service, n: int) -> list[str]:
    """n prompts of the training data, short and long (up to router.context_chars) in its own mix."""
    seed = [p for p, _ in service.seed_examples()] or ["Explain how a hash map works."]
    rng = random.Random(0)
    rng.shuffle(seed)
    return [seed[i % len(seed)] + ("" if i < len(seed) else f" (variant {i})") for i in range(n)]


def bench_route(config: CoEConfig, n: int = 200) -> dict[str, Any]:
    """Warm single-prompt latency of features+classify (uncached), of a whole ``decide`` (uncached and
    cached), what each feature block costs, and batch throughput of ``route_many``."""
    from coe_core.routing.service import RoutingService

    if n < 10:
        raise ValueError("bench route needs n >= 10 prompts")
    service = RoutingService(config)
    service.warm_up()
    router = service.router()
    prompts = _bench_prompts(service, n)
    for p in prompts[:5]:  # warm the kernels for these shapes
        router.classify([p], use_cache=False)

    # the sentence block's thread policy vs a fixed single thread, interleaved so both see the same
    # machine load (on a busy shared box one thread avoids OpenMP barrier stalls; see embedder.auto_threads)
    embedder = router.resources.sentence
    configured = embedder.threads if embedder is not None else 1
    classify_ms, one_thread_ms, threads_used = [], [], []
    try:
        for i, p in enumerate(prompts):
            order = ["configured", "one"] if i % 2 else ["one", "configured"]
            for which in order if embedder is not None and configured != 1 else ["configured"]:
                if embedder is not None:
                    embedder.threads = configured if which == "configured" else 1
                if which == "configured":
                    threads_used.append(embedder.threads_now() if embedder is not None else 1)
                ms = _timed(lambda q: router.classify([q], use_cache=False), [p])[0]
                (classify_ms if which == "configured" else one_thread_ms).append(ms)
    finally:
        if embedder is not None:
            embedder.threads = configured
    router.cache_clear()
    decide_ms = _timed(lambda p: service.decide([{"role": "user", "content": p}]), prompts)
    decide_cached_ms = _timed(lambda p: service.decide([{"role": "user", "content": p}]), prompts)

    # what each block costs on one prompt (the classifier: the rest of an uncached classify)
    model = router.artifact.model
    sample = prompts[: min(50, n)]
    blocks = {}
    for block in model.features.blocks:
        single = dataclasses.replace(model.features, blocks=(block,))  # the fitted IDF weights come along
        blocks[block] = _percentiles(_timed(lambda p, f=single: f.transform([p], router.resources), sample))

    start, cpu_start = time.perf_counter(), time.process_time()
    service.route_many(prompts)
    batch_s, batch_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    lengths = [len(p) for p in prompts]
    single = _percentiles(classify_ms)
    result: dict[str, Any] = {
        "p50_ms": single["p50_ms"],
        "p95_ms": single["p95_ms"],
        "prompts_per_s_batch": round(n / batch_s, 1),
        # CPU seconds the batch got: on a shared machine wall time also counts other people's work
        "batch_cpu_s": round(batch_cpu_s, 3),
        "batch_wall_s": round(batch_s, 3),
        "what": "p50/p95: warm features+classify of one prompt, caches off; batch: route_many of n prompts",
        "n": n,
        "features_classify_uncached": single,
        "features_classify_uncached_1_thread": _percentiles(one_thread_ms) if one_thread_ms else None,
        "per_block": blocks,
        "decide_uncached": _percentiles(decide_ms),
        "decide_cached": _percentiles(decide_cached_ms),
        "router_version": router.version_id,
        "classifier": router.artifact.meta["classifier"]["name"],
        "features": list(model.features.blocks),
        "prompt_chars": {
            "mean": round(float(np.mean(lengths)), 1),
            "max": int(max(lengths)),
            "over_1000": int(sum(x > 1000 for x in lengths)),
        },
        "threads_setting": configured,
        "threads_used": dict(sorted(Counter(threads_used).items())),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "targets": TARGETS,
    }
    result["meets_targets"] = {
        "p50_ms": result["p50_ms"] <= TARGETS["p50_ms"],
        "p95_ms": result["p95_ms"] <= TARGETS["p95_ms"],
        "prompts_per_s_batch": result["prompts_per_s_batch"] >= TARGETS["prompts_per_s_batch"],
    }
    return result
