"""Store: the interaction log (conversations, turns, feedback, router versions) behind one small API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self, TextIO

from sqlalchemy import func, select, update
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from coe_core.store.database import create_store_engine, safe_url, writer_engine
from coe_core.store.errors import InteractionNotFound, InvalidStoreRequest, StoreError
from coe_core.store.export import write_export
from coe_core.store.migrations import ensure_schema
from coe_core.store.models import (
    FEEDBACK_KINDS,
    LABEL_KINDS,
    REVIEW_STATES,
    Conversation,
    Feedback,
    Interaction,
    RouterVersion,
)
from coe_core.store.records import TurnRecord, check_client
from coe_core.store.selects import feedback_dict, interaction_dict, iso, turns_with_feedback
from coe_core.store.stats import compute_stats

if TYPE_CHECKING:
    from coe_core.config import CoEConfig

_TITLE_CHARS = 80
#: attempts when a concurrent writer took the turn index this write picked
_INDEX_ATTEMPTS = 5


class Store:
    """The interaction log. Every method is one unit of work in its own transaction; thread-safe."""

    def __init__(self, url: str, *, log_prompts: bool = True) -> None:
        self.url = url
        self.display_url = safe_url(url)
        #: false: prompt, routing context and response are stored as NULL (metadata is kept)
        self.log_prompts = log_prompts
        self._engine = create_store_engine(url)
        self._writer = writer_engine(self._engine)
        try:
            self.schema_version = ensure_schema(self._writer, self.display_url)
        except OperationalError as exc:
            self._engine.dispose()
            raise StoreError(
                f"could not open the interaction store at {self.display_url}: {exc.orig}; check "
                "COE_DATABASE_URL / store.url and that the database is reachable and writable"
            ) from None
        except DatabaseError as exc:  # e.g. a file that is not a SQLite database at all
            self._engine.dispose()
            raise StoreError(
                f"the interaction store at {self.display_url} is not a usable database ({exc.orig}): move that "
                "file away (keep it if it may hold a log worth recovering) so a new one is created, or point "
                "COE_DATABASE_URL / store.url at another database"
            ) from None
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def from_config(cls, cfg: CoEConfig) -> Store:
        return cls(cfg.database_url, log_prompts=cfg.store.log_prompts)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.display_url!r}, log_prompts={self.log_prompts})"

    # -- units of work ---------------------------------------------------------------------------
    @contextmanager
    def _session(self, write: bool) -> Iterator[Session]:
        try:
            with Session(self._writer if write else self._engine, expire_on_commit=False) as s, s.begin():
                yield s
        except OperationalError as exc:
            raise StoreError(f"the interaction store at {self.display_url} failed: {exc.orig}") from exc

    def read_session(self) -> AbstractContextManager[Session]:
        """A read-only unit of work, for queries over the log (see queries.py)."""
        return self._session(write=False)

    # -- conversations and turns ------------------------------------------------------------------
    def start_conversation(self, client: str, session_id: str | None = None, title: str | None = None) -> int:
        check_client(client)
        if session_id is not None and len(session_id) > 128:
            raise StoreError("session_id must be at most 128 characters")
        with self._session(write=True) as s:
            conv = Conversation(
                client=client, session_id=session_id, title=title[:200] if title and self.log_prompts else None
            )
            s.add(conv)
            s.flush()
            return conv.id

    def log_turn(self, record: TurnRecord) -> int:
        """Store one turn and return its interaction id; a turn (by ``record.uid``) is stored only once."""
        if not isinstance(record, TurnRecord):
            raise StoreError(f"log_turn takes a TurnRecord, not {type(record).__name__}")
        record.validate()
        rec = record if self.log_prompts else record.without_text()
        for attempt in range(_INDEX_ATTEMPTS):
            try:
                return self._insert_turn(rec)
            except IntegrityError as exc:
                # Another writer took the same uid (then _insert_turn finds it next time) or the same
                # auto-assigned turn index (then it picks the next one); anything else is a real error.
                if rec.turn_index is not None and self._find_uid(rec.uid) is None:
                    raise StoreError(
                        f"conversation {rec.conversation_id} already has turn {rec.turn_index}: leave "
                        "turn_index None to append the turn"
                    ) from exc
                if attempt == _INDEX_ATTEMPTS - 1:
                    raise StoreError(f"could not store the turn: {exc.orig}") from exc
        raise AssertionError("unreachable")

    def _find_uid(self, uid: str) -> int | None:
        with self._session(write=False) as s:
            return s.scalar(select(Interaction.id).where(Interaction.uid == uid))

    def _insert_turn(self, rec: TurnRecord) -> int:
        with self._session(write=True) as s:
            existing = s.scalar(select(Interaction).where(Interaction.uid == rec.uid))
            if existing is not None:
                # the end of a turn logged at its start (interrupted: its end was spooled and replayed late)
                if existing.status in ("running", "interrupted") and rec.status not in ("running", "interrupted"):
                    self._complete(existing, rec)
                return existing.id
            conversation_id = rec.conversation_id
            if conversation_id is None:
                conv = Conversation(
                    client=rec.client,
                    session_id=rec.session_id,
                    title=rec.prompt[:_TITLE_CHARS] if rec.prompt else None,
                )
                s.add(conv)
                s.flush()
                conversation_id = conv.id
            # the row lock (PostgreSQL; SQLite already holds the write lock) makes concurrent appends to one
            # conversation take turn indexes one after the other instead of colliding
            elif s.get(Conversation, conversation_id, with_for_update=True) is None:
                raise StoreError(
                    f"no conversation {conversation_id}: start one with start_conversation() or leave "
                    "conversation_id None"
                )
            turn_index = rec.turn_index
            if turn_index is None:
                last = s.scalar(
                    select(func.max(Interaction.turn_index)).where(Interaction.conversation_id == conversation_id)
                )
                turn_index = 0 if last is None else last + 1
            row = Interaction(
                uid=rec.uid,
                conversation_id=conversation_id,
                turn_index=turn_index,
                prompt=rec.prompt,
                routing_context=rec.routing_context,
                response=rec.response,
                router_version=rec.router_version,
                category=rec.category,
                probabilities={k: float(v) for k, v in (rec.probabilities or {}).items()},
                confidence=rec.confidence,
                fallback=bool(rec.fallback),
                override=rec.override,
                expert=rec.expert,
                reason=rec.reason,
                swaps=rec.normalised_swaps(),
                ttft_s=rec.ttft_s,
                total_s=rec.total_s,
                prompt_tokens=rec.prompt_tokens,
                new_tokens=rec.new_tokens,
                tokens_per_s=rec.tokens_per_s,
                status=rec.status,
                error=rec.error,
                started_at=rec.started_at,
                finished_at=rec.finished_at,
                route_latency_ms=rec.route_latency_ms,
                route_threshold=rec.route_threshold,
                queue_s=rec.queue_s,
                remote_connection=rec.remote_connection,
            )
            s.add(row)
            s.flush()
            return row.id

    @staticmethod
    def _complete(row: Interaction, rec: TurnRecord) -> None:
        """Fill the row logged at a turn's start with how the turn ended."""
        row.response, row.expert, row.reason = rec.response, rec.expert, rec.reason
        row.swaps = rec.normalised_swaps()
        row.ttft_s, row.total_s, row.tokens_per_s = rec.ttft_s, rec.total_s, rec.tokens_per_s
        row.prompt_tokens, row.new_tokens = rec.prompt_tokens, rec.new_tokens
        row.status, row.error, row.finished_at = rec.status, rec.error, rec.finished_at
        row.queue_s, row.remote_connection = rec.queue_s, rec.remote_connection

    def mark_interrupted(self, started_before: datetime | None = None) -> int:
        """Turns logged as running that no process will complete (it crashed or was killed) become
        ``interrupted``; only those started before ``started_before`` when given. Returns how many."""
        stmt = update(Interaction).where(Interaction.status == "running")
        if started_before is not None:
            stmt = stmt.where(Interaction.started_at < started_before)
        with self._session(write=True) as s:
            return (
                s.execute(stmt.values(status="interrupted", error="the process ended before the turn did")).rowcount
                or 0
            )

    def get_interaction(self, interaction_id: int) -> dict[str, Any]:
        with self._session(write=False) as s:
            found = s.execute(turns_with_feedback().where(Interaction.id == interaction_id)).first()
            if found is None:
                raise InteractionNotFound(_no_interaction(interaction_id))
            return interaction_dict(*found)

    def recent_interactions(self, limit: int = 20, *, session_id: str | None = None) -> list[dict[str, Any]]:
        """The newest turns first; only those of ``session_id`` when it is given."""
        if limit < 1:
            raise InvalidStoreRequest(f"limit must be at least 1, not {limit}")
        stmt = turns_with_feedback().order_by(None).order_by(Interaction.id.desc()).limit(limit)
        if session_id is not None:
            stmt = stmt.where(Conversation.session_id == session_id)
        with self._session(write=False) as s:
            return [interaction_dict(*found) for found in s.execute(stmt)]

    # -- feedback -------------------------------------------------------------------------------------
    def add_feedback(
        self,
        interaction_id: int,
        kind: str,
        corrected_category: str | None = None,
        comment: str | None = None,
        *,
        categories: list[str],
        owner: str | None = None,
        review: str = "accepted",
        author: str | None = None,
    ) -> int:
        """Feedback on a turn. ``owner``: the session (or key) giving it, which must be the one that made the
        turn (None: not checked, a trusted caller such as the CLI). ``review``: ``pending`` keeps it out of
        training until an admin accepts it."""
        if review not in REVIEW_STATES:
            raise InvalidStoreRequest(f"review must be one of {', '.join(REVIEW_STATES)}, not {review!r}")
        if not isinstance(interaction_id, int) or not 0 < interaction_id < 2**63:
            raise InteractionNotFound(_no_interaction(interaction_id))
        if kind not in FEEDBACK_KINDS:
            raise InvalidStoreRequest(f"unknown feedback kind {kind!r}: use one of {', '.join(FEEDBACK_KINDS)}")
        if corrected_category is not None:
            if kind != "wrong_category":
                raise InvalidStoreRequest(
                    f"only wrong_category feedback may name a corrected category, not {kind!r}: "
                    f"use kind wrong_category with category {corrected_category!r}"
                )
            if corrected_category not in categories:
                raise InvalidStoreRequest(
                    f"unknown category {corrected_category!r}: use one of {', '.join(categories)}"
                )
        with self._session(write=True) as s:
            row = s.get(Interaction, interaction_id)
            if row is None or (owner is not None and row.conversation.session_id != owner):
                raise InteractionNotFound(_no_interaction(interaction_id))  # someone else's turn: as if there were none
            fb = Feedback(
                interaction_id=interaction_id,
                kind=kind,
                corrected_category=corrected_category,
                comment=comment or None,
                review=review,
                author=author[:128] if author else None,
            )
            s.add(fb)
            s.flush()
            return fb.id

    def latest_feedback(self, interaction_id: int) -> dict[str, Any] | None:
        """The feedback that counts for a turn; None when there is none, it was retracted, or no such turn."""
        with self._session(write=False) as s:
            fb = s.scalar(
                select(Feedback).where(Feedback.interaction_id == interaction_id).order_by(Feedback.id.desc())
            )
            return feedback_dict(fb)

    # -- review of anonymous feedback ------------------------------------------------------------------
    def pending_feedback(self, limit: int = 100) -> list[dict[str, Any]]:
        """Feedback waiting for an admin (latest per turn only: older ones no longer count), oldest first."""
        latest = select(func.max(Feedback.id)).group_by(Feedback.interaction_id).scalar_subquery()
        stmt = (
            select(Feedback, Interaction)
            .join(Interaction, Interaction.id == Feedback.interaction_id)
            .where(Feedback.id.in_(latest), Feedback.review == "pending", Feedback.kind.in_(LABEL_KINDS))
            .order_by(Feedback.id)
            .limit(limit)
        )
        with self._session(write=False) as s:
            return [
                {
                    **feedback_dict(fb),
                    "review": fb.review,
                    "author": fb.author,
                    "prompt": row.prompt,
                    "category": row.category,
                }
                for fb, row in s.execute(stmt)
            ]

    def pending_count(self) -> int:
        latest = select(func.max(Feedback.id)).group_by(Feedback.interaction_id).scalar_subquery()
        with self._session(write=False) as s:
            return (
                s.scalar(
                    select(func.count()).where(
                        Feedback.id.in_(latest),
                        Feedback.review == "pending",
                        Feedback.kind.in_(LABEL_KINDS),
                    )
                )
                or 0
            )

    def review_feedback(self, feedback_ids: list[int], accept: bool) -> int:
        """Accept (they count as training labels from then on) or reject pending feedback; returns how many."""
        ids = [int(i) for i in feedback_ids if 0 < int(i) < 2**63]
        if not ids:
            return 0
        with self._session(write=True) as s:
            result = s.execute(
                update(Feedback)
                .where(Feedback.id.in_(ids), Feedback.review == "pending")
                .values(review="accepted" if accept else "rejected")
            )
            return result.rowcount or 0

    # -- aggregates and export ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._session(write=False) as s:
            return compute_stats(s)

    def category_counts(self) -> dict[str, int]:
        """Turns per routed category (the traffic distribution the mapping optimiser weighs categories by)."""
        stmt = (
            select(Interaction.category, func.count())
            .where(Interaction.category.is_not(None))
            .group_by(Interaction.category)
        )
        with self._session(write=False) as s:
            return {category: int(n) for category, n in s.execute(stmt)}

    def export(self, fmt: str, out: TextIO, since: datetime | None = None) -> int:
        """Write one line per turn (with its latest feedback) to ``out``; return how many."""
        with self._session(write=False) as s:
            return write_export(s, fmt, out, since)

    # -- router versions -------------------------------------------------------------------------------
    def record_router_version(
        self,
        id: str,
        artifact_path: str,
        metrics: dict[str, Any] | None = None,
        sample_counts: dict[str, int] | None = None,
        parent_id: str | None = None,
        active: bool = False,
    ) -> None:
        if not isinstance(id, str) or not id or len(id) > 64:
            raise StoreError(f"a router version id must be text of 1 to 64 characters, not {id!r:.80}")
        with self._session(write=True) as s:
            if s.get(RouterVersion, id) is not None:
                raise StoreError(f"router version {id!r} is already recorded: give the new artifact a new id")
            if active:
                s.execute(update(RouterVersion).values(active=False))
            s.add(
                RouterVersion(
                    id=id,
                    artifact_path=str(artifact_path),
                    metrics=metrics or {},
                    sample_counts=sample_counts or {},
                    parent_id=parent_id,
                    active=active,
                )
            )

    def set_active_router_version(self, id: str) -> None:
        with self._session(write=True) as s:
            if s.get(RouterVersion, id) is None:
                known = s.scalars(select(RouterVersion.id).order_by(RouterVersion.created_at.desc())).all()
                recorded = ", ".join(known) if known else "none (run coe retrain)"
                raise InvalidStoreRequest(f"no router version {id!r}; recorded: {recorded}")
            s.execute(update(RouterVersion).values(active=RouterVersion.id == id))

    def list_router_versions(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._session(write=False) as s:
            rows = s.scalars(select(RouterVersion).order_by(RouterVersion.created_at.desc(), RouterVersion.id))
            return [
                {
                    "id": r.id,
                    "created_at": iso(r.created_at),
                    "artifact_path": r.artifact_path,
                    "metrics": r.metrics or {},
                    "sample_counts": r.sample_counts or {},
                    "active": bool(r.active),
                    "parent_id": r.parent_id,
                }
                for r in rows
            ]


def _no_interaction(interaction_id: int) -> str:
    return (
        f"no interaction {interaction_id} in the log: check the id (coe export or the app's history "
        "show the ids of logged turns)"
    )
