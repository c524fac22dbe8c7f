"""What stands in front of the ``/v1`` routes: the optional API key, the body size limit, the turn limit."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coe_core.api.errors import APIError


class ApiGuard:
    """ASGI middleware: for paths under ``prefix``, a bearer token when ``api_key`` is set (401); for every
    path (the playground's ``/gradio_api/queue/join`` too, but not Gradio's file uploads), request bodies of
    at most ``max_body_bytes`` (413), by Content-Length or, for chunked bodies, while reading. Checked before
    the body is parsed, so a caller without the key learns nothing about the request."""

    #: Gradio's upload route has its own limit (``max_file_size``); the app has no upload component
    UNBOUNDED = ("/gradio_api/upload",)

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, prefix: str = "/v1"):
        self.app, self.api_key, self.max_body_bytes, self.prefix = app, api_key, max_body_bytes, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(self.UNBOUNDED):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._check(headers, api=path == self.prefix or path.startswith(self.prefix + "/"))
        if problem is not None:
            await problem.response()(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _check(self, headers: dict[str, str], api: bool = True) -> APIError | None:
        if api and self.api_key is not None:
            given = headers.get("authorization", "")
            if not bearer_matches(given, self.api_key):
                what = "no API key given" if not bearer_token(given) else "the API key is wrong"
                return APIError(
                    401,
                    f"{what}: send 'Authorization: Bearer <COE_API_KEY>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than {self.max_body_bytes} bytes (api.max_body_bytes)",
            code="request_too_large",
        )

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # FastAPI passes HTTPException through body parsing
                    raise HTTPException(413, self._too_large().message)
            return message

        return wrapped


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value ("" when there is none)."""
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""


def bearer_matches(authorization: str, key: str) -> bool:
    """Whether the header value carries ``key`` (compared in constant time: no timing oracle for the key)."""
    return hmac.compare_digest(bearer_token(authorization).encode(), key.encode())
