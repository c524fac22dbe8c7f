"""Reusable SELECTs over the log: turns joined with their conversation and their latest feedback."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select

from coe_core.store.models import Conversation, Feedback, Interaction


def turns_with_feedback() -> Select[tuple[Interaction, Conversation, Feedback | None]]:
    """(interaction, conversation, latest feedback or None) per turn, oldest turn first."""
    latest = (
        select(Feedback.interaction_id, func.max(Feedback.id).label("feedback_id"))
        .group_by(Feedback.interaction_id)
        .subquery("latest_feedback")
    )
    return (
        select(Interaction, Conversation, Feedback)
        .join(Conversation, Conversation.id == Interaction.conversation_id)
        .outerjoin(latest, latest.c.interaction_id == Interaction.id)
        .outerjoin(Feedback, Feedback.id == latest.c.feedback_id)
        .order_by(Interaction.id)
    )


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def feedback_dict(fb: Feedback | None) -> dict[str, Any] | None:
    """The feedback that counts: None when there is none or the latest one is a retraction."""
    if fb is None or fb.kind == "retracted":
        return None
    return {
        "id": fb.id,
        "interaction_id": fb.interaction_id,
        "kind": fb.kind,
        "corrected_category": fb.corrected_category,
        "comment": fb.comment,
        "created_at": iso(fb.created_at),
    }


def interaction_dict(row: Interaction, conv: Conversation, fb: Feedback | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "uid": row.uid,
        "conversation_id": row.conversation_id,
        "turn_index": row.turn_index,
        "client": conv.client,
        "session_id": conv.session_id,
        "prompt": row.prompt,
        "routing_context": row.routing_context,
        "response": row.response,
        "router_version": row.router_version,
        "category": row.category,
        "probabilities": row.probabilities or {},
        "confidence": row.confidence,
        "fallback": bool(row.fallback),
        "override": row.override,
        "expert": row.expert,
        "reason": row.reason,
        "swaps": row.swaps or [],
        "ttft_s": row.ttft_s,
        "total_s": row.total_s,
        "prompt_tokens": row.prompt_tokens,
        "new_tokens": row.new_tokens,
        "tokens_per_s": row.tokens_per_s,
        "status": row.status,
        "error": row.error,
        "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at),
        "route_latency_ms": row.route_latency_ms,
        "route_threshold": row.route_threshold,
        "queue_s": row.queue_s,
        "remote_connection": row.remote_connection,
        "feedback": feedback_dict(fb),
    }
