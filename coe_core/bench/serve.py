"""``coe bench serve``: many users at once through the serving queue, against one turn at a time.

Simulated users are threads. Each runs ``--turns`` turns from a fixed list of prompts that alternates between
the profile's experts (forced with the expert override, so both packaged experts are needed whatever the router
says), greedy, with ``min_new_tokens == max_new_tokens == --tokens`` (every turn decodes the same number of
tokens), and ``--think-s`` seconds between a user's turns. At 1, 4, 8 and 16 users, the same workload runs twice
in the same process, on the same engine:

- ``scheduler``: the engine's queue as configured (``serve.*``, ``coe_core/serving/policy.next_turn``);
- ``one_at_a_time``: the baseline, one turn at a time in arrival order (``policy.fifo``, ``max_running`` 1).

Before each run every expert leaves the execution tier, so both runs start alike. With ``--tight`` (default) the
execution tier's budget holds one expert only (the largest resident footprint plus half the smallest), the case
where the order of turns decides how often the tiers swap; ``--no-tight`` keeps the configured budget.

``--runtime transformers`` runs every local expert on the transformers runtime (batched decoding per expert,
``coe_core/experts/batched_decode.py``); ``--expert NAME`` sends all traffic to one expert (single-expert traffic:
it stays resident, so runs measure decoding, not swaps). Beside the levels:

- ``ceiling``: plain ``model.generate`` on a batch of 1, 4, 8 and 16 of the same prompts (the engine's prompt
  format, left-padded), greedy, ``--tokens`` new tokens each, per transformers expert, in the same run: the
  tokens/s a batch of that size can reach on this machine. Each level adds ``ceiling_tokens_per_s`` (the batch
  of min(users, ``serve.max_running``)) and ``ratio_to_ceiling`` = scheduler / that (single-expert traffic only);
- ``per_turn`` (at 1 user, transformers experts): the same run with batching off (one ``generate`` per turn, the
  engine before batched decoding); ``ratio_to_per_turn`` = scheduler / that.

Figures per run: ``tokens_per_s`` (all new tokens / wall time of the run), ``ttft_p50_s``, ``ttft_p95_s`` (from
the turn's start, queueing included), ``queue_wait_p95_s``, ``swaps_per_100_turns`` (loads into the execution
tier during the run), ``refused`` (QueueFull), ``errors``, ``turns``, ``logged`` (rows of the run in the log,
each turn once).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from coe_core.config import CoEConfig
from coe_core.errors import QueueFull
from coe_core.serving import Scheduler, fifo

PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is 17 times 23? Explain the steps.",
    "Write a haiku about autumn leaves.",
    "Explain why the sky is blue in two sentences.",
    "Summarise the plot of Romeo and Juliet.",
    "List three uses of a hash map.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
    "Write a short thank-you note to a colleague.",
]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))], 3)


def _run(coe, experts: list[str], *, users: int, turns: int, tokens: int, think_s: float, tag: str) -> dict:
    for expert in experts if len(experts) > 1 else ():  # every run starts with no expert on the execution tier
        if coe.tiers.state(expert) == coe.tiers.exec_tier:
            coe.tiers.evict(expert, coe.tiers.exec_tier)
    exec_tier = coe.tiers.exec_tier
    seen_before = {id(e) for e in coe.tiers.history}
    records: list[dict] = []
    refused = errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(users)

    def user(u: int) -> None:
        nonlocal refused, errors
        barrier.wait()
        for k in range(turns):
            i = (u * turns + k) % len(PROMPTS)
            expert = experts[(u + k) % len(experts)]
            try:
                _, _, stats = coe.run(
                    PROMPTS[i],
                    {"expert": expert},
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    temperature=0,
                    session_id=f"{tag}-{u}",
                    client="cli",
                )
            except QueueFull:
                with lock:
                    refused += 1
                continue
            except Exception:
                with lock:
                    errors += 1
                continue
            with lock:
                if stats.status != "ok":
                    errors += 1
                records.append({"ttft_s": stats.ttft_s, "queue_s": stats.queue_s, "new_tokens": stats.new_tokens})
            if think_s and k < turns - 1:
                time.sleep(think_s)

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    new_events = [e for e in coe.tiers.history if id(e) not in seen_before]
    swaps = sum(1 for e in new_events if e.dst == exec_tier and e.trigger != "eviction")
    rows = coe.store.recent_interactions(100_000) if coe.store is not None else []
    logged = sum(1 for r in rows if (r.get("session_id") or "").startswith(f"{tag}-"))
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    return {
        "tokens_per_s": round(sum(r["new_tokens"] for r in records) / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_s": _pct(ttfts, 0.5),
        "ttft_p95_s": _pct(ttfts, 0.95),
        "queue_wait_p95_s": _pct([r["queue_s"] for r in records], 0.95),
        "swaps_per_100_turns": round(100 * swaps / max(len(records), 1), 1),
        "refused": refused,
        "errors": errors,
        "turns": users * turns,
        "completed": len(records),
        "logged": logged,
        "wall_s": round(wall, 2),
    }


#: batch sizes of the plain ``generate`` ceiling
CEILING_BATCHES = (1, 4, 8, 16)


def generate_ceiling(coe, expert: str, *, tokens: int, batches: tuple[int, ...] = CEILING_BATCHES) -> dict:
    """Tokens/s of plain ``model.generate`` on a batch of ``n`` prompts of ``PROMPTS`` (formatted as the engine
    formats them, left-padded), greedy, ``tokens`` new tokens each: what batched decoding can reach here."""
    import torch

    cfg = coe.config.experts[expert]
    out = {}
    with coe.tiers.acquire(expert, trigger="bench") as lease:
        tokenizer = lease.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompts = [
            lease.runtime.format_prompt(
                [{"role": "user", "content": p}], cfg, context_length=2048, reserve_tokens=tokens
            ).input_ids
            for p in PROMPTS
        ]
        # greedy, with the sampling defaults a model's generation config may set cleared (no warnings)
        greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        with torch.inference_mode():  # the first generate of a process pays one-time costs: not counted
            lease.model.generate(input_ids=torch.tensor([prompts[0]], device=lease.device), max_new_tokens=2, **greedy)
        for n in batches:
            rows = [prompts[i % len(prompts)] for i in range(n)]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=lease.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=lease.device)
            start = time.perf_counter()
            with torch.inference_mode():
                generated = lease.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, **greedy
                )
            if lease.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out[str(n)] = round((generated.shape[1] - width) * n / seconds, 2)
    return out


def bench_serve(
    config: CoEConfig,
    *,
    levels: tuple[int, ...] = (1, 4, 8, 16),
    turns: int = 2,
    tokens: int = 16,
    think_s: float = 0.2,
    tight: bool = True,
    runtime: str | None = None,
    expert: str | None = None,
) -> dict:
    from coe_core.bench.swap import with_runtime
    from coe_core.engine import CoE
    from coe_core.store.store import Store

    if runtime is not None:
        config = with_runtime(config, runtime)
    experts = [e for e, c in config.experts.items() if not c.is_remote]
    if expert is not None:
        if expert not in experts:
            raise ValueError(f"unknown local expert {expert!r}; experts: {', '.join(experts)}")
        experts = [expert]
    with tempfile.TemporaryDirectory(prefix="coe-bench-serve-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'bench.sqlite3'}")
        coe = CoE(config, routing=None, store=store, progress=False)
        try:
            problems = coe.prepare(experts)
            experts = [e for e in experts if problems.get(e) is None]
            if not experts:
                raise RuntimeError(f"no expert is available: {problems}")
            tier = coe.tiers.tiers[coe.tiers.exec_tier]
            budget_note = f"configured ({tier.budget_bytes} bytes)"
            if tight and len(experts) > 1:
                sizes = [coe.tiers.slots[e].resident_bytes for e in experts]
                tier.budget_bytes = max(sizes) + min(sizes) // 2
                budget_note = f"tight: one expert at a time ({tier.budget_bytes} bytes)"
            for expert in experts:  # the first turn of a process pays one-time costs (llama.cpp start-up): not counted
                coe.run(PROMPTS[0], {"expert": expert}, max_new_tokens=2, temperature=0, session_id="warmup")
            serve = config.serve
            result = {
                "experts": experts,
                "exec_tier": coe.tiers.exec_tier,
                "budget": budget_note,
                "runtime": {e: coe.tiers.slots[e].runtime for e in experts},
                "tokens": tokens,
                "turns_per_user": turns,
                "think_s": think_s,
                "serve": serve.model_dump(),
                "levels": [],
            }
            transformers = [e for e in experts if coe.tiers.slots[e].runtime == "transformers"]
            batches = tuple(sorted({*CEILING_BATCHES, *(min(u, serve.max_running) for u in levels)}))
            result["ceiling"] = {e: generate_ceiling(coe, e, tokens=tokens, batches=batches) for e in transformers}
            for users in levels:
                row = {"users": users}
                runs = ["scheduler", "one_at_a_time"] + (["per_turn"] if users == 1 and transformers else [])
                for name in runs:
                    coe.tiers.batching = name != "per_turn"
                    if name in ("scheduler", "per_turn"):
                        coe.scheduler = Scheduler.from_config(serve, coe.swap_cost_s)
                    else:
                        coe.scheduler = Scheduler.from_config(serve, coe.swap_cost_s, max_running=1, policy=fifo)
                    row[name] = _run(
                        coe, experts, users=users, turns=turns, tokens=tokens, think_s=think_s, tag=f"{name}-{users}"
                    )
                a, b = row["scheduler"], row["one_at_a_time"]
                row["tokens_per_s_ratio"] = _ratio(a["tokens_per_s"], b["tokens_per_s"])
                if "per_turn" in row:
                    row["ratio_to_per_turn"] = _ratio(a["tokens_per_s"], row["per_turn"]["tokens_per_s"])
                if len(experts) == 1 and experts[0] in result["ceiling"]:
                    ceiling = result["ceiling"][experts[0]]
                    batch = str(min(users, serve.max_running))
                    row["ceiling_tokens_per_s"] = ceiling[batch]
                    row["ratio_to_ceiling"] = _ratio(a["tokens_per_s"], ceiling[batch])
                result["levels"].append(row)
            result["median_ratio"] = statistics.median(
                [r["tokens_per_s_ratio"] for r in result["levels"] if r["tokens_per_s_ratio"]] or [0]
            )
            return result
        finally:
            coe.close()
