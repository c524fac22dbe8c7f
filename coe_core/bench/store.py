"""`coe bench store`: what logging costs a turn, on a scratch database (never the user's log).

Figures: latency of TurnLogger.submit (what the streaming path pays), latency of a synchronous
Store.log_turn (what the background thread pays), end-to-end turns/s through the logger, and how long
stats() and export() take over the logged turns. JSON out; no pass/fail.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from coe_core.events import SwapEvent
from coe_core.store.records import TurnRecord
from coe_core.store.store import Store
from coe_core.store.writer import TurnLogger


def _record(i: int) -> TurnRecord:
    swap = SwapEvent(expert="e", src="disk", dst="cpu", bytes=270_000_000, seconds=0.05 + (i % 7) / 100)
    return TurnRecord(
        expert=f"expert-{i % 3}",
        prompt=f"prompt {i} " + "x" * 400,
        routing_context=f"prompt {i}",
        response="y" * 1200,
        category=["coding", "math", "writing"][i % 3],
        probabilities={"coding": 0.6, "math": 0.3, "writing": 0.1},
        confidence=0.6,
        swaps=[swap.to_dict()],
        ttft_s=0.1 + (i % 10) / 100,
        total_s=2.0,
        new_tokens=64,
        tokens_per_s=32.0,
        client="bench",
    )


def _ms(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 4),
        "p95_ms": round(float(np.percentile(arr, 95)), 4),
        "mean_ms": round(float(arr.mean()), 4),
    }


def bench_store(n: int = 500, url: str | None = None) -> dict[str, Any]:
    """Time logging ``n`` turns; ``url`` defaults to a SQLite file in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="coe-bench-store-") as tmp:
        url = url or f"sqlite:///{Path(tmp) / 'bench.sqlite3'}"
        with Store(url) as store:
            sync = []
            for i in range(n):
                t0 = time.perf_counter()
                store.log_turn(_record(i))
                sync.append(time.perf_counter() - t0)

            submit = []
            logger = TurnLogger(store, Path(tmp) / "spool.jsonl", replay_on_start=False)
            t_all = time.perf_counter()
            futures = []
            for i in range(n):
                t0 = time.perf_counter()
                futures.append(logger.submit(_record(n + i)))
                submit.append(time.perf_counter() - t0)
            for f in futures:
                f.result()
            through_logger_s = time.perf_counter() - t_all
            logger.close()

            t0 = time.perf_counter()
            store.stats()
            stats_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            exported = store.export("jsonl", io.StringIO())
            export_s = time.perf_counter() - t0
        return {
            "benchmark": "store",
            "database": store.display_url.split("://", 1)[0],
            "turns_per_phase": n,
            "submit_latency": _ms(submit),
            "log_turn_latency": _ms(sync),
            "logger_turns_per_s": round(n / through_logger_s, 1),
            "stats_s": round(stats_s, 4),
            "export_jsonl_s": round(export_s, 4),
            "exported_turns": exported,
        }
