"""TurnRecord: everything the store keeps about one turn, as the engine hands it over."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from coe_core.events import RouteDecision, SwapEvent, TurnStats
from coe_core.store.errors import StoreError
from coe_core.store.models import STATUSES, utcnow

_TEXT_FIELDS = ("prompt", "routing_context", "response")


@dataclass
class TurnRecord:
    expert: str
    prompt: str | None = None
    #: the text the router saw (latest user turn plus earlier context)
    routing_context: str | None = None
    response: str | None = None
    category: str | None = None
    router_version: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None
    fallback: bool = False
    #: what the user forced: {"category": ...} or {"expert": ...}
    override: dict[str, str] | None = None
    reason: str | None = None
    #: SwapEvent.to_dict() (SwapEvent objects are converted on write)
    swaps: list[dict[str, Any]] = field(default_factory=list)
    ttft_s: float | None = None
    total_s: float | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    tokens_per_s: float | None = None
    status: str = "ok"
    error: str | None = None
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None
    #: how long routing took (RouteDecision.latency_ms) and the confidence threshold it applied
    route_latency_ms: float | None = None
    route_threshold: float | None = None
    #: seconds it waited in the serving queue before it ran
    queue_s: float | None = None
    #: RemoteConnect.to_dict() when a remote expert served (None: a local one)
    remote_connection: dict[str, Any] | None = None
    #: None: a new conversation is started for this turn
    conversation_id: int | None = None
    #: None: the next index in the conversation
    turn_index: int | None = None
    client: str = "api"
    session_id: str | None = None
    #: identifies the turn across retries and spool replays so it is stored exactly once
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @classmethod
    def from_turn(
        cls,
        decision: RouteDecision,
        swaps: list[SwapEvent],
        stats: TurnStats,
        *,
        prompt: str,
        started_at: datetime,
        finished_at: datetime | None = None,
        client: str = "api",
        conversation_id: int | None = None,
        session_id: str | None = None,
    ) -> TurnRecord:
        """Build the record from the engine's events of one turn."""
        return cls(
            expert=stats.expert or decision.expert,
            prompt=prompt,
            routing_context=decision.routed_text or None,
            response=stats.response,
            category=decision.category,
            router_version=decision.router_version,
            probabilities=dict(decision.probabilities),
            confidence=decision.confidence,
            fallback=decision.fallback,
            override=decision.override,
            reason=decision.reason,
            route_latency_ms=decision.latency_ms,
            route_threshold=decision.threshold,
            queue_s=round(stats.queue_s, 4),
            remote_connection=stats.connection.to_dict() if stats.connection else None,
            swaps=[s.to_dict() for s in swaps],
            ttft_s=stats.ttft_s,
            total_s=stats.total_s,
            prompt_tokens=stats.prompt_tokens,
            new_tokens=stats.new_tokens,
            tokens_per_s=stats.tokens_per_s,
            status=stats.status,
            error=stats.error,
            started_at=started_at,
            finished_at=finished_at or utcnow(),
            client=client,
            conversation_id=conversation_id,
            session_id=session_id,
        )

    def validate(self) -> None:
        """Raise StoreError for a record no retry could store (bad status, no expert, bad client)."""
        if self.status not in STATUSES:
            raise StoreError(f"turn status {self.status!r} is not one of {', '.join(STATUSES)}")
        if not isinstance(self.expert, str) or not self.expert:
            raise StoreError("a turn needs the expert that served it (TurnRecord.expert)")
        check_client(self.client)
        # the column sizes (PostgreSQL enforces them; SQLite would silently keep longer values)
        for name, limit in (("expert", 128), ("category", 64), ("router_version", 64), ("session_id", 128)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > limit):
                raise StoreError(f"turn {name} must be text of at most {limit} characters, not {value!r:.80}")

    def without_text(self) -> TurnRecord:
        """A copy with prompt, routing context and response dropped (the privacy switch)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(dict.fromkeys(_TEXT_FIELDS))
        return TurnRecord(**data)

    def normalised_swaps(self) -> list[dict[str, Any]]:
        return [s.to_dict() if isinstance(s, SwapEvent) else dict(s) for s in self.swaps]

    # -- JSON (the spool file) -------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["swaps"] = self.normalised_swaps()
        for key in ("started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> TurnRecord:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise StoreError(f"turn record has unknown fields {sorted(unknown)}")
        data = dict(data)
        for key in ("started_at", "finished_at"):
            if data.get(key):
                data[key] = datetime.fromisoformat(data[key])
        try:
            return cls(**data)
        except TypeError as exc:
            raise StoreError(f"turn record is incomplete: {exc}") from None


def check_client(client: str) -> None:
    if not isinstance(client, str) or not client.strip() or len(client) > 32:
        raise StoreError(f"client must be a short name such as 'cli', 'app' or 'api', not {client!r}")
