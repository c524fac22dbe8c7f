"""Errors of the OpenAI-compatible API, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

=====  ==========================  ===========================================================================
400    ``invalid_request_error``   malformed JSON, missing/empty messages, bad or wrongly typed parameters, a
                                   conversation over ``limits.max_prompt_chars`` or ``limits.max_messages``
                                   (code ``context_length_exceeded``)
401    ``authentication_error``    ``COE_API_KEY`` is set and the bearer token is missing or wrong
404    ``invalid_request_error``   unknown model (code ``model_not_found``), interaction id (or another
                                   session's; code ``interaction_not_found``), or /v1 path (code ``not_found``)
405    ``invalid_request_error``   wrong method on a /v1 path (code ``method_not_allowed``)
413    ``invalid_request_error``   request body over ``api.max_body_bytes`` (code ``request_too_large``)
429    ``rate_limit_error``        ``serve.max_queue`` turns already wait (Retry-After estimated from the
                                   queue), or the tiers are held by experts that are generating (code
                                   ``busy``); too much feedback
                                   (code ``rate_limited``); comes with Retry-After
503    ``server_error``            no expert can serve (code ``no_expert_available``), something else the turn
                                   needs is not available now (``unavailable``: a ZeroGPU slice...), the log
                                   failed (``store_error``) or there is none (``no_store``)
500    ``server_error``            a configuration problem (``config_error``), anything else (``turn_failed``;
                                   the turn is logged as an error)
=====  ==========================  ===========================================================================

``api_error`` is the one place an engine error (``coe_core/errors.py``) becomes one of these.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe_core.errors import (
    Busy,
    ConfigError,
    ExpertUnavailable,
    InvalidRequest,
    PromptTooLong,
    RateLimited,
    StoreError,
    Unavailable,
    error_message,
)
from coe_core.store.errors import InteractionNotFound

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    """An error a caller of the API gets back, with its status code and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, code=self.code, param=self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> APIError:
    """The status, code and message a caller gets for an engine error (raised, or the one that failed a
    turn before its first text); anything that is not a ``CoEError`` is a 500 ``turn_failed``."""
    message = error_message(exc)
    if isinstance(exc, PromptTooLong):
        return APIError(400, message, code="context_length_exceeded", param="messages")
    if isinstance(exc, RateLimited):
        return APIError(429, message, code="rate_limited", headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, InteractionNotFound):
        return APIError(404, message, code="interaction_not_found", param="interaction_id")
    if isinstance(exc, InvalidRequest):
        return APIError(400, message, code="invalid_value")
    if isinstance(exc, Busy):
        return APIError(429, message, code="busy", headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, ExpertUnavailable):
        return APIError(503, message, code="no_expert_available")
    if isinstance(exc, Unavailable):
        return APIError(503, message, code="unavailable")
    if isinstance(exc, StoreError):
        return APIError(503, message, code="store_error")
    if isinstance(exc, ConfigError):
        return APIError(500, message, code="config_error")
    return APIError(500, message, code="turn_failed")


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")), None, "invalid_json"
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return (
            "the request body must be a JSON object (send it with Content-Type: application/json)",
            None,
            "invalid_json",
        )
    msg = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        msg = "required parameter is missing"
    elif first.get("type") == "too_short" and loc == ["messages"]:
        msg = "messages must hold at least one message"
    return (f"{param}: {msg}" if param else msg), param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    """Every error of the app's own routes in the OpenAI shape (the mounted Gradio app keeps its own)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return JSONResponse(error_body(400, message, param=param, code=code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), code=code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
