"""One chat completion over the API: drives ``CoE.chat`` in worker threads and speaks OpenAI's format.

The engine's iterator blocks (routing, swaps, generation), so every step runs in starlette's thread pool and
the event loop never waits on it. ``start`` runs the turn up to its first text: the routing decision, swaps
and notices are known by then, so they go into the response headers, the ``coe`` object and the first
stream chunk, and a turn that fails before any text gets a real HTTP error status. Closing the turn (the
client went away) cancels the compute; the engine logs the turn as cancelled. The turn's events are kept in
an ``events.Transcript``; its errors become HTTP errors in ``errors.api_error`` alone.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from coe_core.api.errors import APIError, api_error
from coe_core.api.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from coe_core.errors import CoEError
from coe_core.events import Event, RouteDecision, TextChunk, Transcript, TurnStats

_END = object()


class ApiTurn:
    def __init__(
        self, events: Iterator[Event], cancel: threading.Event, *, max_new_tokens: int, include_usage: bool = False
    ):
        self._events, self._cancel = events, cancel
        self._closed = False
        self.max_new_tokens, self.include_usage = max_new_tokens, include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.transcript = Transcript()
        self._held: list[str] = []  # text read by start(), not sent yet

    # -- driving the engine -----------------------------------------------------------------------
    async def _next(self) -> Event | object:
        return await run_in_threadpool(next, self._events, _END)

    def _absorb(self, event: Event) -> str | None:
        """Keep the event; its text, if it is a piece of the answer."""
        self.transcript.add(event)
        return event.text if isinstance(event, TextChunk) else None

    async def _next_text(self) -> str | None:
        """The next piece of the answer (events between are kept in the transcript), or None once the turn has
        ended: its stats arrived or its events ran out."""
        while self.stats is None:
            event = await self._next()
            if event is _END:
                return None
            text = self._absorb(event)
            if text:
                return text
        return None

    @property
    def decision(self) -> RouteDecision | None:
        return self.transcript.decision

    @property
    def stats(self) -> TurnStats | None:
        return self.transcript.stats

    async def start(self) -> None:
        """Run the turn up to its first text. Raises APIError for a bad request or a turn that failed first."""
        try:
            text = await self._next_text()
            if text:
                self._held.append(text)
        except CoEError as exc:  # refused before anything ran (a bad request, a full queue): nothing was logged
            await self.aclose()
            raise api_error(exc) from None
        except BaseException:
            await self.aclose()
            raise
        if self.transcript.failed and not self.stats.response:  # it failed before its first text
            await self.aclose()
            error = self.transcript.error
            raise (
                api_error(error)
                if error is not None
                else APIError(500, self.stats.error or "the turn failed", code="turn_failed")
            )

    def cancel(self) -> None:
        """Ask the engine to stop generating (the turn ends at the next token)."""
        self._cancel.set()

    async def aclose(self) -> None:
        """Stop the compute and end the turn (logged as cancelled unless it had finished); never blocks the
        event loop, and runs to the end even when the request task is being cancelled. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cancel.set()
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(self._events.close)

    # -- what the caller sees -------------------------------------------------------------------------
    @property
    def served_by(self) -> str:
        return self.transcript.served_by or ""

    def headers(self) -> dict[str, str]:
        d = self.decision
        return {
            "x-coe-category": d.category,
            "x-coe-expert": self.served_by,
            "x-coe-confidence": f"{d.confidence:.4f}",
            "x-coe-reason": d.reason,
        }

    def route_summary(self) -> dict[str, Any]:
        d = self.decision
        return {
            "category": d.category,
            "expert": self.served_by,
            "routed_expert": d.expert,
            "reason": d.reason,
            "confidence": d.confidence,
            "fallback": d.fallback,
            "probabilities": d.probabilities,
            "router_version": d.router_version,
            "explanation": d.explanation,
            "swaps": [s.to_dict() for s in self.transcript.swaps],
            "connection": self.transcript.connection.to_dict() if self.transcript.connection else None,
            "notices": [{"kind": n.kind, "message": n.message} for n in self.transcript.notices],
        }

    def end_summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "interaction_id": s.interaction_id,
            "status": s.status,
            "error": s.error,
            "ttft_s": s.ttft_s,
            "total_s": s.total_s,
            "tokens_per_s": s.tokens_per_s,
            "truncated": s.truncated,
        }

    def usage(self) -> Usage:
        s = self.stats
        return Usage(
            prompt_tokens=s.prompt_tokens, completion_tokens=s.new_tokens, total_tokens=s.prompt_tokens + s.new_tokens
        )

    def finish_reason(self) -> str:
        return "length" if self.stats.new_tokens >= self.max_new_tokens else "stop"

    # -- non-streaming --------------------------------------------------------------------------------
    async def run_to_end(self) -> None:
        """Run the rest of the turn (for a whole, non-streamed answer: see ``completion``)."""
        try:
            while await self._next_text() is not None:
                pass  # the answer is the logged response in the turn's stats
        finally:
            await self.aclose()

    def completion(self) -> ChatCompletion:
        """The whole answer of a turn that ran to its end; APIError when the expert failed mid-answer."""
        if self.stats.status == "error":
            raise APIError(500, f"the expert failed mid-answer: {self.stats.error}", code="turn_failed")
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.served_by,
            usage=self.usage(),
            choices=[Choice(message=AssistantMessage(content=self.stats.response), finish_reason=self.finish_reason())],
            coe={**self.route_summary(), **self.end_summary()},
        )

    # -- streaming ------------------------------------------------------------------------------------
    def _chunk(self, delta: Delta, **fields: Any) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.served_by,
            choices=[ChunkChoice(delta=delta, finish_reason=fields.pop("finish", None))],
            **fields,
        )
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        try:
            yield self._chunk(Delta(role="assistant", content=""), coe=self.route_summary())
            for text in self._held:
                yield self._chunk(Delta(content=text))
            self._held.clear()
            while (text := await self._next_text()) is not None:
                yield self._chunk(Delta(content=text))
            if self.stats.status == "error":
                error = APIError(500, f"the expert failed mid-answer: {self.stats.error}", code="turn_failed")
                yield f"data: {json.dumps(error.body())}\n\n"
            else:
                yield self._chunk(Delta(), finish=self.finish_reason(), coe=self.end_summary())
                if self.include_usage:
                    chunk = ChatCompletionChunk(
                        id=self.id, created=self.created, model=self.served_by, choices=[], usage=self.usage()
                    )
                    yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnected: stop generating, log the turn as cancelled
            await self.aclose()


class TurnStream(StreamingResponse):
    """The SSE response of a turn; closes the turn however the response ends (even if never iterated)."""

    def __init__(self, turn: ApiTurn):
        super().__init__(
            turn.sse(),
            media_type="text/event-stream",
            headers={**turn.headers(), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.turn = turn

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await super().listen_for_disconnect(receive)
        self.turn.cancel()  # at once: the worker thread may be waiting for the next token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.turn.aclose()
