"""The app's public API (gradio_client): ``/route``, ``/chat`` (streaming) and ``/feedback``.

Every other event of the UI is private. Errors a caller causes come back as ``gr.Error`` with one
clear message (gradio_client raises it as ``AppError``).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from app.chat_tab import GENERATION_CONCURRENCY
from app.context import AppContext, user_message
from coe_core.engine import InvalidRequest
from coe_core.events import Notice, RouteDecision, SwapEvent, TextChunk, TurnDone


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


def _overrides(category: str | None, expert: str | None) -> dict[str, str] | None:
    found = {k: v for k, v in (("category", category), ("expert", expert)) if v}
    return found or None


class PublicAPI:
    def __init__(self, ctx: AppContext) -> None:
        self.coe = ctx.coe

    def register(self) -> None:
        gr.api(self.route, api_name="route")
        gr.api(self.chat, api_name="chat", concurrency_limit=GENERATION_CONCURRENCY, concurrency_id="generation")
        gr.api(self.feedback, api_name="feedback")

    def route(self, prompt: str, history: list[dict] | None = None, category: str | None = None,
              expert: str | None = None) -> dict[str, Any]:
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
        messages = _history(history) + [{"role": "user", "content": prompt or ""}]
        try:
            return self.coe.route(messages, _overrides(category, expert)).to_dict()
        except (InvalidRequest, ValueError, KeyError) as exc:
            raise gr.Error(user_message(exc)) from None

    def chat(self, prompt: str, history: list[dict] | None = None, category: str | None = None,
             expert: str | None = None, max_new_tokens: int = 128, temperature: float = 0.7) -> Iterator[dict]:
        """Answer a prompt with the Composition of Experts: the router picks a category, the mapping picks one
        expert LLM, the memory tiers swap it in, and it generates the answer (small open models: good for
        short answers, drafts and routing demos, not for facts you cannot check). Each turn is logged.

        Streams updates {"text": answer so far, "route": decision, "done": false}; the last one has
        "done": true, "status", "interaction_id" (for /feedback), "swaps" (the memory-tier moves) and "stats"
        (time to first token, tokens/s).

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
        messages = _history(history) + [{"role": "user", "content": prompt or ""}]
        cancel = threading.Event()
        events = self.coe.chat(messages, _overrides(category, expert), max_new_tokens=max_new_tokens,
                               temperature=temperature, cancel=cancel, client="api")
        text, route, swaps, notices = "", None, [], []
        with contextlib.closing(events):
            try:
                for event in events:
                    if isinstance(event, RouteDecision):
                        route = event.to_dict()
                        yield {"text": text, "route": route, "done": False}
                    elif isinstance(event, SwapEvent):
                        swaps.append(event.to_dict())
                    elif isinstance(event, Notice):
                        notices.append(event.message)
                    elif isinstance(event, TextChunk):
                        text += event.text
                        yield {"text": text, "route": route, "done": False}
                    elif isinstance(event, TurnDone):
                        stats = event.stats.to_dict()
                        yield {"text": text, "route": route, "done": True, "status": stats["status"],
                               "error": stats["error"], "interaction_id": stats["interaction_id"],
                               "swaps": swaps, "notices": notices, "stats": stats}
            except (InvalidRequest, ValueError, KeyError) as exc:
                raise gr.Error(user_message(exc)) from None
            finally:
                cancel.set()  # the caller went away mid-stream: stop generating (the engine logs it)

    def feedback(self, interaction_id: int, kind: str, corrected_category: str | None = None) -> dict[str, Any]:
        """Give feedback on a logged turn (from /chat's interaction_id); it helps retrain the router.

        Args:
            interaction_id: the turn's id, as returned by /chat.
            kind: one of like, dislike, wrong_category (with corrected_category) or retracted.
            corrected_category: the category the prompt should have gone to, for kind wrong_category.
        """
        try:
            feedback_id = self.coe.feedback(int(interaction_id), kind, corrected_category or None)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise gr.Error(user_message(exc)) from None
        return {"feedback_id": feedback_id, "interaction_id": int(interaction_id), "kind": kind,
                "corrected_category": corrected_category or None}
