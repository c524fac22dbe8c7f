"""Export of the log: one row per turn with its latest feedback, as JSON lines or CSV."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy.orm import Session

from coe_core.store.errors import InvalidStoreRequest
from coe_core.store.models import Interaction
from coe_core.store.selects import interaction_dict, turns_with_feedback

FORMATS = ("jsonl", "csv")
COLUMNS = [
    "id",
    "uid",
    "conversation_id",
    "turn_index",
    "client",
    "session_id",
    "started_at",
    "finished_at",
    "prompt",
    "routing_context",
    "response",
    "router_version",
    "category",
    "probabilities",
    "confidence",
    "fallback",
    "override",
    "expert",
    "reason",
    "swaps",
    "ttft_s",
    "total_s",
    "prompt_tokens",
    "new_tokens",
    "tokens_per_s",
    "status",
    "error",
    "route_latency_ms",
    "route_threshold",
    "queue_s",
    "remote_connection",
    "feedback_kind",
    "feedback_category",
    "feedback_comment",
    "feedback_at",
]
_JSON_COLUMNS = {"probabilities", "override", "swaps", "remote_connection"}


def export_rows(session: Session, since: datetime | None = None) -> Any:
    """Flat rows (dicts with COLUMNS) oldest first, streamed from the database in batches."""
    stmt = turns_with_feedback()
    if since is not None:
        stmt = stmt.where(Interaction.started_at >= since)
    for row, conv, fb in session.execute(stmt.execution_options(yield_per=500)):
        data = interaction_dict(row, conv, fb)
        feedback = data.pop("feedback") or {}
        data.update(
            feedback_kind=feedback.get("kind"),
            feedback_category=feedback.get("corrected_category"),
            feedback_comment=feedback.get("comment"),
            feedback_at=feedback.get("created_at"),
        )
        yield data


def write_export(session: Session, fmt: str, out: TextIO, since: datetime | None = None) -> int:
    if fmt not in FORMATS:
        raise InvalidStoreRequest(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    count = 0
    if fmt == "jsonl":
        for data in export_rows(session, since):
            out.write(json.dumps(data, ensure_ascii=False) + "\n")
            count += 1
        return count
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for data in export_rows(session, since):
        for key in _JSON_COLUMNS:
            data[key] = json.dumps(data[key], ensure_ascii=False) if data[key] is not None else ""
        writer.writerow(data)
        count += 1
    return count
