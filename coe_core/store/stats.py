"""Aggregates over the log for `coe stats` and the app's analytics tab."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coe_core.store.models import LABEL_KINDS, Feedback, Interaction

#: the distributions (ttft_values, swap_seconds) keep this many most recent values for plotting
MAX_VALUES = 5000
#: hours the serving figures cover (the newest)
MAX_HOURS = 24 * 14
_COUNTED_FEEDBACK = ("like", "dislike", "wrong_category")


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def compute_stats(session: Session) -> dict[str, Any]:
    turns = session.scalar(select(func.count(Interaction.id))) or 0

    def counts(column: Any) -> dict[str, int]:
        rows = session.execute(select(column, func.count()).group_by(column).order_by(func.count().desc()))
        return {(key if key is not None else "unknown"): n for key, n in rows}

    fallbacks = session.scalar(select(func.count()).where(Interaction.fallback.is_(True))) or 0

    latest = select(func.max(Feedback.id)).group_by(Feedback.interaction_id).scalar_subquery()
    kinds = dict(
        session.execute(
            select(Feedback.kind, func.count()).where(Feedback.id.in_(latest)).group_by(Feedback.kind)
        ).all()
    )
    feedback = {kind: int(kinds.get(kind, 0)) for kind in _COUNTED_FEEDBACK}
    feedback["corrected"] = (
        session.scalar(select(func.count()).where(Feedback.id.in_(latest), Feedback.corrected_category.is_not(None)))
        or 0
    )

    # newest first, so the capped lists keep the most recent values
    ttft = [
        v
        for (v,) in session.execute(
            select(Interaction.ttft_s).where(Interaction.ttft_s.is_not(None)).order_by(Interaction.id.desc())
        )
    ]

    route_ms = [
        v
        for (v,) in session.execute(
            select(Interaction.route_latency_ms).where(Interaction.route_latency_ms.is_not(None))
        )
    ]

    # one pass over the log, most recent first (the distributions keep their most recent values)
    swap_seconds: dict[str, list[float]] = defaultdict(list)
    #: a remote expert's seconds to its first byte, by expert (its connection is no swap)
    connect_seconds: dict[str, list[float]] = defaultdict(list)
    by_day: Counter[tuple[str, str]] = Counter()
    # serving by hour: swaps per 100 turns (loads between tiers; a remote connection is logged apart) and queue wait
    hours: dict[str, dict[str, Any]] = {}
    rows = select(
        Interaction.started_at,
        Interaction.category,
        Interaction.status,
        Interaction.swaps,
        Interaction.remote_connection,
        Interaction.queue_s,
    ).order_by(Interaction.id.desc())
    for started_at, category, status, swaps, connection, queue_s in session.execute(rows):
        for swap in swaps or []:
            try:
                swap_seconds[f"{swap['src']}->{swap['dst']}"].append(float(swap["seconds"]))
            except (KeyError, TypeError, ValueError):
                continue  # a malformed swap entry must not break the analytics of everything else
        try:
            if connection:
                connect_seconds[str(connection["expert"])].append(float(connection["first_byte_s"]))
        except (KeyError, TypeError, ValueError):
            pass
        by_day[(started_at.date().isoformat(), category or "unknown")] += 1
        if status in ("ok", "cancelled", "error"):  # finished turns (not running or interrupted)
            hour = hours.setdefault(started_at.strftime("%Y-%m-%dT%H:00"), {"turns": 0, "swaps": 0, "waits": []})
            hour["turns"] += 1
            hour["swaps"] += len(swaps or [])
            if queue_s is not None:
                hour["waits"].append(float(queue_s))
    serving_by_hour = [
        {
            "hour": h,
            "turns": v["turns"],
            "swaps_per_100_turns": 100.0 * v["swaps"] / v["turns"],
            "queue_wait_p50_s": _percentile(v["waits"], 50),
            "queue_wait_p95_s": _percentile(v["waits"], 95),
        }
        for h, v in sorted(hours.items())
    ][-MAX_HOURS:]

    by_status = counts(Interaction.status)
    pending = (
        session.scalar(
            select(func.count()).where(
                Feedback.id.in_(latest), Feedback.review == "pending", Feedback.kind.in_(LABEL_KINDS)
            )
        )
        or 0
    )
    return {
        "turns": turns,
        #: turns a crash or kill ended (logged at their start, never completed), and turns running now
        "interrupted": by_status.get("interrupted", 0),
        "running": by_status.get("running", 0),
        #: anonymous feedback waiting for an admin's review before it may train the router
        "feedback_pending_review": pending,
        "by_category": counts(Interaction.category),
        "by_expert": counts(Interaction.expert),
        "fallback_rate": fallbacks / turns if turns else 0.0,
        "feedback": feedback,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p95_s": _percentile(ttft, 95),
        "swaps": {
            pair: {"count": len(secs), "mean_s": sum(secs) / len(secs)} for pair, secs in sorted(swap_seconds.items())
        },
        "by_status": by_status,
        "turns_by_day_category": [
            {"day": day, "category": cat, "turns": n} for (day, cat), n in sorted(by_day.items())
        ],
        "swap_seconds": {pair: secs[:MAX_VALUES] for pair, secs in sorted(swap_seconds.items())},
        "remote_first_byte_seconds": {e: secs[:MAX_VALUES] for e, secs in sorted(connect_seconds.items())},
        "ttft_values": ttft[:MAX_VALUES],
        "serving_by_hour": serving_by_hour,
        "route_latency_p50_ms": _percentile(route_ms, 50),
        "route_latency_p95_ms": _percentile(route_ms, 95),
        "feedback_rates": {kind: (feedback[kind] / turns if turns else 0.0) for kind in _COUNTED_FEEDBACK},
    }
