"""The app's public API (gradio_client): ``/route``, ``/chat`` (streaming) and ``/feedback``.

Every other event of the UI is private (hidden from the API docs; each handler checks what it gives away).
Errors a caller causes come back as ``gr.Error`` with one clear message (gradio_client raises it as
``AppError``). The same door policy as ``/v1``: ``COE_API_KEY``, when set, is needed here too
(``Client(url, headers={"Authorization": "Bearer KEY"})``); turns wait in the engine's one queue
(``serve.*``, "busy" beyond ``serve.max_queue``); feedback binds to the gradio session that made the turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from app.chat_tab import generation_concurrency
from app.context import AppContext
from app.errors import ENGINE_ERRORS, app_error
from coe_core.api.guards import bearer_matches
from coe_core.events import Queued, RouteDecision, TextChunk, Transcript, TurnDone
from coe_core.store.models import review_of


def _history(history: list[dict] | str | None) -> list[dict]:
    if history is None or history == "":
        return []
    if isinstance(history, str):
        try:
            history = json.loads(history)
        except json.JSONDecodeError:
            raise gr.Error('history must be a JSON list of {"role": ..., "content": ...} messages') from None
    if not isinstance(history, list):
        raise gr.Error('history must be a list of {"role": ..., "content": ...} messages')
    return list(history)


def _text(prompt: Any) -> str:
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise gr.Error("prompt must be text")
    return prompt


def _overrides(category: str | None, expert: str | None) -> dict[str, str] | None:
    found = {k: v for k, v in (("category", category), ("expert", expert)) if v}
    return found or None


def _session(request: gr.Request | None) -> str:
    """The gradio session of a caller (gradio_client keeps one per Client): turns are logged under it and
    feedback must come from it."""
    return f"gradio:{getattr(request, 'session_hash', None) or 'none'}"


class PublicAPI:
    def __init__(self, ctx: AppContext, api_key: str | None = None) -> None:
        self.coe = ctx.coe
        key = api_key if api_key is not None else os.environ.get("COE_API_KEY")
        self._key = key.strip() if key and key.strip() else None

    def _check_key(self, request: gr.Request | None) -> None:
        """``COE_API_KEY`` guards every door that spends compute: these endpoints as well as /v1."""
        if self._key is None:
            return
        headers = getattr(request, "headers", None) or {}
        given = headers.get("authorization", "") if hasattr(headers, "get") else ""
        if not bearer_matches(given, self._key):
            raise gr.Error(
                "this endpoint needs the API key: Client(url, headers={'Authorization': 'Bearer <COE_API_KEY>'})",
                title="API key needed",
            )

    def register(self) -> None:
        gr.api(self.route, api_name="route")
        gr.api(
            self.chat, api_name="chat", concurrency_limit=generation_concurrency(self.coe), concurrency_id="generation"
        )
        gr.api(self.feedback, api_name="feedback")

    def route(
        self,
        prompt: str,
        history: list[dict] | None = None,
        category: str | None = None,
        expert: str | None = None,
        request: gr.Request = None,
    ) -> dict[str, Any]:
        """Route a prompt without generating an answer: which category the CoE's router puts it in (with the
        probability of every category and whether it fell back to `general`), which expert LLM the
        category-to-expert mapping picks, and why. Cheap (milliseconds, no GPU); nothing is logged.

        Args:
            prompt: the user message to route, e.g. "Write a Python function that reverses a list".
            history: earlier turns as a list of {"role": "user" | "assistant", "content": str}; optional.
            category: force this category instead of the router's choice (e.g. "math"); optional.
            expert: force this expert id instead of the mapping's choice; optional.

        Returns:
            The routing decision as JSON: category, probabilities, confidence, fallback, expert, reason,
            router_version.
        """
        self._check_key(request)
        messages = _history(history) + [{"role": "user", "content": _text(prompt)}]
        try:
            return self.coe.route(messages, _overrides(category, expert)).to_dict()
        except ENGINE_ERRORS as exc:
            raise app_error(exc) from None

    def chat(
        self,
        prompt: str,
        history: list[dict] | None = None,
        category: str | None = None,
        expert: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        request: gr.Request = None,
    ) -> Iterator[dict]:
        """Answer a prompt with the Composition of Experts: the router picks a category, the mapping picks one
        expert LLM, the memory tiers swap it in, and it generates the answer (small open models: good for
        short answers, drafts and routing demos, not for facts you cannot check). Each turn is logged.

        Streams updates {"text": answer so far, "route": decision, "done": false}; the last one has
        "done": true, "status", "interaction_id" (for /feedback), "expert" (who served), "swaps" (the
        memory-tier moves), "connection" (a remote expert's connection timings, else null) and "stats" (time to
        first token, tokens/s).

        Args:
            prompt: the user message to answer.
            history: earlier turns as a list of {"role": "user" | "assistant", "content": str}; optional.
            category: force this category instead of the router's choice (e.g. "coding"); optional.
            expert: force this expert id instead of the mapping's choice; optional.
            max_new_tokens: at most this many new tokens (default 128).
            temperature: sampling temperature, 0 for greedy (default 0.7).

        Returns:
            The answer and its routing decision, swaps and timings as JSON.
        """
        self._check_key(request)
        messages = _history(history) + [{"role": "user", "content": _text(prompt)}]
        # the engine's one queue (serve.*): "queued" updates while others go first; "busy" beyond serve.max_queue
        yield from self._chat(messages, category, expert, max_new_tokens, temperature, _session(request))

    def _chat(
        self,
        messages: list[dict],
        category: str | None,
        expert: str | None,
        max_new_tokens: Any,
        temperature: Any,
        session_id: str,
    ) -> Iterator[dict]:
        cancel = threading.Event()
        events = self.coe.chat(
            messages,
            _overrides(category, expert),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            cancel=cancel,
            client="api",
            session_id=session_id,
        )
        turn, route = Transcript(), None
        with contextlib.closing(events):
            try:
                for event in turn.follow(events):
                    if isinstance(event, RouteDecision):
                        route = event.to_dict()
                    if isinstance(event, (RouteDecision, TextChunk)):
                        yield {"text": turn.text, "route": route, "done": False}
                    elif isinstance(event, Queued):
                        yield {"text": turn.text, "route": route, "done": False, "queued": event.to_dict()}
                    elif isinstance(event, TurnDone):
                        stats = event.stats.to_dict()
                        yield {
                            "text": turn.text,
                            "route": route,
                            "done": True,
                            "status": stats["status"],
                            "error": stats["error"],
                            "interaction_id": stats["interaction_id"],
                            "expert": turn.served_by,
                            "swaps": [s.to_dict() for s in turn.swaps],
                            "connection": turn.connection.to_dict() if turn.connection else None,
                            "notices": [n.message for n in turn.notices],
                            "stats": stats,
                        }
            except ENGINE_ERRORS as exc:
                raise app_error(exc) from None
            finally:
                cancel.set()  # the caller went away mid-stream: stop generating (the engine logs it)

    def feedback(
        self, interaction_id: int, kind: str, corrected_category: str | None = None, request: gr.Request = None
    ) -> dict[str, Any]:
        """Give feedback on a turn this client made (from /chat's interaction_id); it helps retrain the router.
        Likes and corrections wait for an admin's review before they train anything.

        Args:
            interaction_id: the turn's id, as returned by /chat (only this client's own turns).
            kind: one of like, dislike, wrong_category (with corrected_category) or retracted.
            corrected_category: the category the prompt should have gone to, for kind wrong_category.
        """
        self._check_key(request)
        try:
            turn = int(interaction_id)
        except (TypeError, ValueError, OverflowError):
            raise gr.Error("interaction_id must be the whole number /chat returned") from None
        try:
            feedback_id = self.coe.feedback(
                turn, str(kind), corrected_category or None, owner=_session(request), trusted=False
            )
        except ENGINE_ERRORS as exc:
            raise app_error(exc) from None
        return {
            "feedback_id": feedback_id,
            "interaction_id": turn,
            "kind": kind,
            "corrected_category": corrected_category or None,
            "review": review_of(str(kind), trusted=False),
        }
