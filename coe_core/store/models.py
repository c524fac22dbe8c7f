"""SQLAlchemy declarative models of the interaction log (schema version: see migrations.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

#: running: logged when the turn starts and completed at its end; interrupted: a running turn the process
#: never completed (it crashed or was killed), marked at the next start
STATUSES = ("ok", "cancelled", "error", "running", "interrupted")
STATUS_CHECK = "status IN ({})".format(", ".join(f"'{s}'" for s in STATUSES))
FEEDBACK_KINDS = ("like", "dislike", "wrong_category", "retracted")
#: feedback from a trusted author (admin, API key holder, CLI) is accepted as it comes; an anonymous
#: visitor's waits (pending) until an admin accepts or rejects it; only accepted feedback trains the router
REVIEW_STATES = ("accepted", "pending", "rejected")
#: the feedback kinds that become training labels (so an untrusted author's wait for review)
LABEL_KINDS = ("like", "wrong_category")


def review_of(kind: str, trusted: bool) -> str:
    """The review state new feedback starts in: ``pending`` for an untrusted author's label, else ``accepted``."""
    return "pending" if not trusted and kind in LABEL_KINDS else "accepted"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect.

    Hand-written because SQLite has no timezone type: SQLAlchemy stores its datetimes as naive strings and
    returns naive values, while PostgreSQL returns aware ones. Storing naive UTC and attaching UTC on the way
    out gives the same aware values everywhere, so comparisons (``--since``) never mix naive and aware.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class SchemaInfo(Base):
    """One row (id 1): the schema version the database is at."""

    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: which front end started it: cli, app, api
    client: Mapped[str] = mapped_column(String(32))
    session_id: Mapped[str | None] = mapped_column(String(128), index=True)
    title: Mapped[str | None] = mapped_column(String(200))

    interactions: Mapped[list[Interaction]] = relationship(back_populates="conversation")


class Interaction(Base):
    """One turn: what was routed where, how the expert got resident, what it answered, how fast."""

    __tablename__ = "interactions"
    __table_args__ = (
        UniqueConstraint("conversation_id", "turn_index", name="uq_interactions_conversation_turn"),
        CheckConstraint(STATUS_CHECK, name="ck_interactions_status"),
        Index("ix_interactions_started_at", "started_at"),
        Index("ix_interactions_category", "category"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: client-side id of the turn: a retried or replayed write of the same turn is stored once
    uid: Mapped[str] = mapped_column(String(36), unique=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    turn_index: Mapped[int]
    #: NULL when the store runs with log_prompts false
    prompt: Mapped[str | None] = mapped_column(Text)
    routing_context: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    router_version: Mapped[str | None] = mapped_column(String(64))
    category: Mapped[str | None] = mapped_column(String(64))
    probabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    confidence: Mapped[float | None] = mapped_column(Float)
    fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    override: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    expert: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    #: SwapEvent.to_dict() of every move this turn caused
    swaps: Mapped[list[Any]] = mapped_column(default=list)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    total_s: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    new_tokens: Mapped[int | None] = mapped_column(Integer)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    # schema v2: how long routing took and the confidence threshold it used (analytics of the fallback)
    route_latency_ms: Mapped[float | None] = mapped_column(Float)
    route_threshold: Mapped[float | None] = mapped_column(Float)
    # schema v4: seconds the turn waited in the serving queue (coe_core/serving) before it ran
    queue_s: Mapped[float | None] = mapped_column(Float)
    # schema v5: RemoteConnect.to_dict() when a remote expert served (its connection is no swap)
    remote_connection: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    conversation: Mapped[Conversation] = relationship(back_populates="interactions")
    feedback: Mapped[list[Feedback]] = relationship(back_populates="interaction", order_by="Feedback.id")


class Feedback(Base):
    """A user's verdict on a turn; the latest row of a turn wins, 'retracted' clears it."""

    __tablename__ = "feedback"
    __table_args__ = (
        CheckConstraint("kind IN ('like', 'dislike', 'wrong_category', 'retracted')", name="ck_feedback_kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    corrected_category: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # schema v3: accepted | pending | rejected (REVIEW_STATES); the session or key that filed it
    review: Mapped[str] = mapped_column(String(16), default="accepted")
    author: Mapped[str | None] = mapped_column(String(128))

    interaction: Mapped[Interaction] = relationship(back_populates="feedback")


class RouterVersion(Base):
    """A trained router artifact and where its training data came from."""

    __tablename__ = "router_versions"

    #: the artifact's version id
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    artifact_path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: training samples by source (seed, feedback-corrected, feedback-like)
    sample_counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    #: no foreign key on purpose: a parent may be a shipped seed router that was never recorded here
    parent_id: Mapped[str | None] = mapped_column(String(64))
