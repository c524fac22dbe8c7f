"""The OpenAI-compatible routes (``/v1``) over a ``CoE``: chat completions, models, route, feedback.

``model`` is ``coe`` (the router picks the expert) or an expert id (that expert serves). Every chat turn is
logged like any other (``client="api"``); the routing decision, swaps and timings come back in an extra
``coe`` object and in ``x-coe-*`` headers. Errors are in OpenAI's shape (see ``coe_core/api/errors.py``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from coe_core.api.errors import APIError, api_error
from coe_core.api.schemas import (
    COE_MODEL,
    ChatCompletionRequest,
    ChatMessage,
    FeedbackRequest,
    ModelCard,
    ModelList,
    RouteRequest,
)
from coe_core.api.turns import ApiTurn, TurnStream
from coe_core.engine import CoE, clean_text
from coe_core.errors import CoEError
from coe_core.store.models import review_of


def build_v1_routes(coe: CoE, *, identity: str = "api:anonymous", trusted: bool = False) -> APIRouter:
    """``identity``: the session id the API's turns are logged under and feedback must come from;
    ``trusted``: whether its likes and corrections train the router without an admin's review."""
    routes = APIRouter(prefix="/v1")  # FastAPI's name; "router" in this project is the category classifier
    started = int(time.time())

    def overrides(model: str, category: str | None) -> dict[str, str]:
        found: dict[str, str] = {}
        if model != COE_MODEL:
            if model not in coe.config.experts:
                raise APIError(
                    404,
                    f"model {model!r} does not exist: use '{COE_MODEL}' (routed) or an expert: "
                    f"{', '.join(coe.config.experts)}",
                    code="model_not_found",
                    param="model",
                )
            found["expert"] = model
        if category is not None:
            if category not in coe.config.all_categories:
                raise APIError(
                    400,
                    f"unknown category {category!r}: use one of {', '.join(coe.config.all_categories)}",
                    code="invalid_value",
                    param="category",
                )
            found["category"] = category
        return found

    def engine_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
        try:
            return [m.as_engine_message() for m in messages]
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value", param="messages") from None

    @routes.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """An answer from the routed (``model: coe``) or the named expert, streamed or whole."""
        forced = overrides(body.model, body.category)
        messages = engine_messages(body.messages)
        if not coe.available_experts():
            raise APIError(
                503,
                "no expert is available: see GET /readyz or `coe experts` for the reasons",
                code="no_expert_available",
            )
        cancel = threading.Event()
        events = coe.chat(
            messages,
            forced or None,
            max_new_tokens=body.new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            cancel=cancel,
            client="api",
            session_id=identity,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        turn = ApiTurn(
            events,
            cancel,
            include_usage=include_usage,
            max_new_tokens=body.new_tokens or coe.config.limits.max_new_tokens,
        )
        refused: APIError | None = None
        # a client that gives up stops the compute, from the moment the request arrived (validation, routing,
        # swap-in and prefill included), not only once the first event is out
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(_cancel_when_gone, request, turn)
            try:
                await turn.start()
                if not body.stream:
                    await turn.run_to_end()
            except APIError as exc:  # raised out of the task group it would come wrapped in an ExceptionGroup
                refused = exc
            finally:
                watchers.cancel_scope.cancel()
        if refused is not None:
            raise refused
        if body.stream:
            return TurnStream(turn)
        return JSONResponse(turn.completion().model_dump(), headers=turn.headers())

    @routes.get("/models")
    async def models() -> ModelList:
        """``coe`` (routed) and every available expert, with its state and size."""
        info = await run_in_threadpool(coe.experts_info)
        available = [e for e in info["experts"] if e["available"]]
        cards = [
            ModelCard(
                id=COE_MODEL,
                created=started,
                owned_by="coe",
                coe={"routed": True, "experts": [e["id"] for e in available], "categories": coe.config.all_categories},
            )
        ]
        for e in available:
            cards.append(
                ModelCard(
                    id=e["id"],
                    created=started,
                    owned_by="coe",
                    coe={
                        "routed": False,
                        "display_name": e["display_name"],
                        "state": e["state"],
                        "params": e["params"],
                        "source_kind": coe.config.experts[e["id"]].source.split(":", 1)[0],
                        "generalist": e["generalist"],
                        **({"remote": e["remote"]} if "remote" in e else {}),
                    },
                )
            )
        return ModelList(data=cards)

    @routes.post("/route")
    async def route(body: RouteRequest) -> dict[str, Any]:
        """The routing decision only (category, probabilities, confidence, expert and why); nothing runs."""
        forced = overrides(body.model, body.category)
        if body.messages:
            messages = engine_messages(body.messages)
        elif body.prompt is not None:
            messages = [{"role": "user", "content": body.prompt}]
        else:
            raise APIError(
                400,
                "give `messages` (a conversation) or `prompt` (one user message)",
                code="invalid_value",
                param="messages",
            )
        try:
            decision = await run_in_threadpool(coe.route, messages, forced or None)
        except CoEError as exc:
            raise api_error(exc) from None
        return {**decision.to_dict(), "expert_available": decision.expert in coe.available_experts()}

    @routes.post("/feedback")
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        """Like, dislike, wrong_category (with ``corrected_category``) or retracted, on an interaction id."""
        if coe.store is None:
            raise APIError(503, "this server runs without a store: feedback cannot be kept", code="no_store")
        try:  # only on turns this door made (another session's turn is "not found"), rate-limited per identity
            feedback_id = await run_in_threadpool(
                lambda: coe.feedback(
                    body.interaction_id,
                    body.kind,
                    body.corrected_category,
                    clean_text(body.comment) if body.comment else None,
                    owner=identity,
                    trusted=trusted,
                )
            )
        except CoEError as exc:  # another session's turn is "not found"; too much feedback is 429
            raise api_error(exc) from None
        return {
            "id": feedback_id,
            "interaction_id": body.interaction_id,
            "kind": body.kind,
            "corrected_category": body.corrected_category,
            "review": review_of(body.kind, trusted),
        }

    known = {route.path: route.methods for route in routes.routes}

    @routes.api_route(
        "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
    )
    async def not_here(rest: str, request: Request) -> None:
        """Unknown /v1 paths and wrong methods in OpenAI's error shape (not the playground's "Not Found")."""
        methods = known.get(request.url.path)
        if methods:
            raise APIError(
                405,
                f"{request.method} is not allowed on {request.url.path}: use {', '.join(sorted(methods))}",
                code="method_not_allowed",
                headers={"Allow": ", ".join(sorted(methods))},
            )
        raise APIError(404, f"no API route {request.url.path}: see /v1/docs", code="not_found")

    return routes


async def _cancel_when_gone(request: Request, turn: ApiTurn, every_s: float = 0.5) -> None:
    while not await request.is_disconnected():
        await anyio.sleep(every_s)
    turn.cancel()
