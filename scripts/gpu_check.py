"""GPU tier checks (CI has no GPU): run on a CUDA machine, paste the printed table into docs/benchmarks.md.

    python scripts/gpu_check.py [--json OUT.json]

Checks, on the packaged experts (materialised in bfloat16 into a scratch data dir):
1. promote: acquire puts every weight on the GPU, generation runs on CUDA;
2. evict: GPU -> CPU re-points the weights at the CPU copy (no device-to-host copy), GPU memory is freed;
3. LRU on the GPU tier: a budget for one expert evicts the other;
4. split: a GPU budget smaller than the expert places it across gpu/cpu(/disk) with accelerate, and it runs;
5. CPU -> GPU bandwidth against a pinned-copy ceiling of the same bytes;
6. engine tokens/s on CUDA;
7. batched decoding on CUDA: 8 concurrent turns through the batched decoder (``coe_core/experts/batched_decode``)
   against transformers' own continuous batching (``generate_batch``) and plain ``generate`` on the same batch
   of 8 (the ceiling): on CPU the hand-written loop won (docs/benchmarks.md); where the library wins on CUDA,
   the runtime should use it there;
8. ``coe bench serve`` on CUDA: single-expert traffic (batched decoding against the ceiling) and mixed traffic
   with a gpu tier that holds one expert (swaps on the gpu tier).

The functions of checks 7 and 8 take the device from the CoE they are given, so they also run on CPU
(``batching_vs_library`` and ``serve_checks`` with small sizes: how this script is checked without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coe_core.bench.serve import PROMPTS, bench_serve, generate_ceiling  # noqa: E402
from coe_core.bench.swap import cpu_to_gpu  # noqa: E402
from coe_core.config import load_config  # noqa: E402
from coe_core.engine import CoE  # noqa: E402


def batching_vs_library(coe, expert: str, *, tokens: int = 48, rows: int = 8) -> dict:
    """Tokens/s of ``rows`` turns at once on ``expert``: through the engine's batched decoder, through
    transformers' ``generate_batch`` (its continuous batching) and plain batched ``generate`` (the ceiling)."""
    import threading

    from transformers import GenerationConfig

    from coe_core.experts.generation import GenerationParams, GenerationResult

    cfg = coe.config.experts[expert]
    ceiling = generate_ceiling(coe, expert, tokens=tokens, batches=(rows,))[str(rows)]
    with coe.tiers.acquire(expert, trigger="bench") as lease:
        assert lease.runtime.batcher is not None, "the expert has no batched decoder"
        prompts = [
            lease.runtime.format_prompt(
                [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                cfg,
                context_length=2048,
                reserve_tokens=tokens,
            ).input_ids
            for i in range(rows)
        ]
        params = GenerationParams(max_new_tokens=tokens, temperature=0.0, min_new_tokens=tokens)
        results = [GenerationResult() for _ in prompts]

        def turn(i: int) -> None:
            for _ in lease.runtime.stream(prompts[i], params, cancel=threading.Event(), result=results[i]):
                pass

        threads = [threading.Thread(target=turn, args=(i,)) for i in range(rows)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ours = sum(r.new_tokens for r in results) / (time.perf_counter() - start)
        widest = lease.runtime.batcher.widest
        model = lease.model
        attention = model.config._attn_implementation  # generate_batch may switch it to a paged kernel
        try:
            gen = GenerationConfig(
                max_new_tokens=tokens,
                do_sample=False,
                pad_token_id=lease.tokenizer.pad_token_id,
                eos_token_id=model.generation_config.eos_token_id,
            )
            model.generate_batch(prompts, generation_config=gen)  # warm-up (CUDA graphs, its cache)
            start = time.perf_counter()
            outputs = model.generate_batch(prompts, generation_config=gen)
            library = sum(len(o.generated_tokens) for o in outputs.values()) / (time.perf_counter() - start)
        finally:
            model.set_attn_implementation(attention)
    return {
        "batched_decode_tok_s": round(ours, 1),
        "generate_batch_tok_s": round(library, 1),
        "generate_ceiling_tok_s": round(ceiling, 1),
        "ratio_to_ceiling": round(ours / ceiling, 2),
        "widest_batch": widest,
        "faster": "batched_decode" if ours >= library else "generate_batch",
    }


def serve_checks(config, *, levels=(1, 4, 8), tokens: int = 48, turns: int = 2) -> dict:
    """``coe bench serve`` twice: all traffic on the first expert (against the generate ceiling), then mixed
    traffic with an execution tier that holds one expert (swaps). The summary keeps the table's columns."""
    out = {}
    single = bench_serve(
        config,
        levels=levels,
        turns=turns,
        tokens=tokens,
        think_s=0.0,
        runtime="transformers",
        expert=next(iter(config.experts)),
    )
    mixed = bench_serve(config, levels=levels, turns=turns, tokens=max(tokens // 3, 8), runtime="transformers")
    for name, result in (("single", single), ("mixed", mixed)):
        rows = []
        for level in result["levels"]:
            a, b = level["scheduler"], level["one_at_a_time"]
            assert a["errors"] == b["errors"] == 0 and a["refused"] == b["refused"] == 0, level
            rows.append(
                {
                    "users": level["users"],
                    "tok_s": a["tokens_per_s"],
                    "one_at_a_time": b["tokens_per_s"],
                    "ratio": level["tokens_per_s_ratio"],
                    "ceiling": level.get("ceiling_tokens_per_s"),
                    "to_ceiling": level.get("ratio_to_ceiling"),
                    "to_per_turn": level.get("ratio_to_per_turn"),
                    "ttft_p50_s": a["ttft_p50_s"],
                    "swaps_per_100": a["swaps_per_100_turns"],
                }
            )
        out[name] = {"exec_tier": result["exec_tier"], "levels": rows}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--data-dir", default=None, help="scratch data dir (default: a temp dir)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="coe-gpu-"))
    rows: list[dict] = []

    def check(name, fn):
        start = time.perf_counter()
        try:
            detail = fn()
            rows.append({"check": name, "ok": True, "seconds": round(time.perf_counter() - start, 3), "detail": detail})
        except Exception as exc:  # report every check, keep going
            traceback.print_exc()
            rows.append(
                {
                    "check": name,
                    "ok": False,
                    "seconds": round(time.perf_counter() - start, 3),
                    "detail": f"{type(exc).__name__}: {exc}",
                }
            )

    config = load_config(REPO / "spaces.yaml", env=False, data_dir=str(data_dir))
    coe = CoE(config, routing=None, store=None)
    tiers = coe.tiers
    experts = list(config.experts)
    check("materialise bf16", lambda: {e: tiers.ensure_disk(e).manifest["dtype"] for e in experts})

    def promote():
        with tiers.acquire(experts[0]) as lease:
            devices = {p.device.type for p in lease.model.parameters()}
            assert devices == {"cuda"}, devices
            phases = [e.to_dict() for e in lease.events]
        return {"state": tiers.state(experts[0]), "events": phases}

    check("promote to gpu", promote)

    def evict():
        before = torch.cuda.memory_allocated()
        cpu_ptr = tiers.slots[experts[0]].cpu_buffer.data_ptr()
        tiers.evict(experts[0], "gpu")
        model = tiers.slots[experts[0]].model
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        first = next(model.parameters())
        assert cpu_ptr <= first.data_ptr() < cpu_ptr + tiers.slots[experts[0]].bytes, "not the CPU copy"
        torch.cuda.empty_cache()
        return {"state": tiers.state(experts[0]), "gpu_freed_bytes": before - torch.cuda.memory_allocated()}

    check("evict gpu -> cpu (re-point)", evict)

    def lru():
        budget = max(tiers.slots[e].bytes for e in experts) + 1
        tiers.tiers["gpu"].budget_bytes = budget
        for e in experts:
            with tiers.acquire(e):
                pass
        states = {e: tiers.state(e) for e in experts}
        assert list(states.values()).count("gpu") == 1, states
        return states

    check("gpu LRU with a one-expert budget", lru)

    def bandwidth():
        tiers.tiers["gpu"].budget_bytes = 10**12
        return cpu_to_gpu(tiers, experts[-1], repeats=5)

    check("cpu -> gpu bandwidth vs pinned copy", bandwidth)

    def generate():
        _, swaps, stats = coe.run(
            "Explain why the sky is blue.", {"expert": experts[0]}, temperature=0, max_new_tokens=64, min_new_tokens=64
        )
        assert stats.status == "ok", stats.error
        return {
            "tokens_per_s": round(stats.tokens_per_s, 1),
            "ttft_s": round(stats.ttft_s, 3),
            "swaps": [f"{s.src}->{s.dst} {s.seconds:.3f}s" for s in swaps],
        }

    check("generation on cuda", generate)

    def split():
        for e in experts:
            tiers.evict(e, "cpu")
        target = experts[-1]
        tiers.tiers["gpu"].budget_bytes = tiers.slots[target].bytes // 2
        with tiers.acquire(target) as lease:
            out = lease.model(torch.tensor([[1, 2, 3]], device="cuda")).logits
            assert out.isfinite().all()
        info = tiers.snapshot().experts[target]
        assert info.state == "split", info
        return info.bytes_by_tier

    check("split across gpu/cpu with accelerate", split)

    def batching():
        tiers.tiers["gpu"].budget_bytes = 10**12
        return batching_vs_library(coe, experts[0])

    check("batched decoding vs generate_batch vs generate", batching)
    for e in experts:  # the serve benchmark builds its own CoE: leave it the GPU
        tiers.evict(e, "cpu")
    coe.close()
    torch.cuda.empty_cache()

    def serve():
        result = serve_checks(config)
        assert result["single"]["exec_tier"] == "gpu", result
        return result

    check("coe bench serve on the gpu tier", serve)

    width = max(len(r["check"]) for r in rows)
    print(f"\nGPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'check':<{width}}  ok    seconds  detail")
    for r in rows:
        print(
            f"{r['check']:<{width}}  {'yes' if r['ok'] else 'NO ':<4}  {r['seconds']:>7}  "
            f"{json.dumps(r['detail'], default=str)[:160]}"
        )
    serve_row = next((r for r in rows if r["check"].startswith("coe bench serve") and r["ok"]), None)
    if serve_row:  # the table for docs/benchmarks.md
        print(
            "\ntraffic | users | tok/s | one at a time | ratio | ceiling | to ceiling | to per-turn | ttft p50 s | "
            "swaps/100"
        )
        for name, result in serve_row["detail"].items():
            for v in result["levels"]:
                print(
                    f"{name} | {v['users']} | {v['tok_s']} | {v['one_at_a_time']} | {v['ratio']} | {v['ceiling']} | "
                    f"{v['to_ceiling']} | {v['to_per_turn']} | {v['ttft_p50_s']} | {v['swaps_per_100']}"
                )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"gpu": torch.cuda.get_device_name(0), "checks": rows}, indent=2, default=str)
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
