"""GPU tier checks (CI has no GPU): run on a CUDA machine, paste the printed table into docs/benchmarks.md.

    python scripts/gpu_check.py [--json OUT.json]

Checks, on the packaged experts (materialised in bfloat16 into a scratch data dir):
1. promote: acquire puts every weight on the GPU, generation runs on CUDA;
2. evict: GPU -> CPU re-points the weights at the CPU copy (no device-to-host copy), GPU memory is freed;
3. LRU on the GPU tier: a budget for one expert evicts the other;
4. split: a GPU budget smaller than the expert places it across gpu/cpu(/disk) with accelerate, and it runs;
5. CPU -> GPU bandwidth against a pinned-copy ceiling of the same bytes;
6. engine tokens/s on CUDA.
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

from coe_core.bench.swap import cpu_to_gpu  # noqa: E402
from coe_core.config import load_config  # noqa: E402
from coe_core.engine import CoE  # noqa: E402


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
            rows.append({"check": name, "ok": True, "seconds": round(time.perf_counter() - start, 3),
                         "detail": detail})
        except Exception as exc:  # report every check, keep going
            traceback.print_exc()
            rows.append({"check": name, "ok": False, "seconds": round(time.perf_counter() - start, 3),
                         "detail": f"{type(exc).__name__}: {exc}"})

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
        _, swaps, stats = coe.run("Explain why the sky is blue.", {"expert": experts[0]}, temperature=0,
                                  max_new_tokens=64, min_new_tokens=64)
        assert stats.status == "ok", stats.error
        return {"tokens_per_s": round(stats.tokens_per_s, 1), "ttft_s": round(stats.ttft_s, 3),
                "swaps": [f"{s.src}->{s.dst} {s.seconds:.3f}s" for s in swaps]}

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
    coe.close()

    width = max(len(r["check"]) for r in rows)
    print(f"\nGPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'check':<{width}}  ok    seconds  detail")
    for r in rows:
        print(f"{r['check']:<{width}}  {'yes' if r['ok'] else 'NO ':<4}  {r['seconds']:>7}  "
              f"{json.dumps(r['detail'], default=str)[:160]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "checks": rows}, indent=2,
                                              default=str))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
