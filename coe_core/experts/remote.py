"""Remote experts: an OpenAI-compatible server (vLLM, TGI, another CoE) answering over HTTP.

A remote expert has no weights here and no memory tiers: ``open`` connects (with retries), waits for the
first server-sent event and returns a ``RemoteReply`` whose text pieces pass through token by token.
Every wait is bounded by the expert's ``timeout_s``; a server that is down, slow or answers garbage raises
``RemoteExpertError`` (the engine then falls back to a local expert). ``health`` is a cached ``GET /models``,
refreshed in the background, so residency snapshots stay cheap.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from coe_core.config import ExpertConfig
from coe_core.errors import RemoteExpertError
from coe_core.experts.generation import GenerationParams
from coe_core.experts.prompt_format import with_system

#: how long a health result (or a failed turn) stands before the endpoint is checked again
HEALTH_TTL_S = 15.0
#: a health check waits at most this long
HEALTH_TIMEOUT_S = 3.0
_MAX_ERROR_BODY = 500


@dataclass
class EndpointHealth:
    ok: bool | None = None  # None: not checked yet
    checked_at: float | None = None  # time.monotonic()
    latency_s: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        age = None if self.checked_at is None else round(time.monotonic() - self.checked_at, 1)
        return {"ok": self.ok, "latency_s": self.latency_s, "error": self.error, "age_s": age}


@dataclass
class RemoteTimings:
    """Seconds from the start of ``open``: TCP connect done (0 on a reused connection), response headers
    received, first server-sent event read."""

    connect_s: float = 0.0
    headers_s: float = 0.0
    first_byte_s: float = 0.0
    attempts: int = 1


class RemoteReply:
    """One streaming answer of a remote expert. Iterate for text pieces; always ``close`` it."""

    def __init__(
        self,
        expert: RemoteExpert,
        response: httpx.Response,
        events: Iterator[dict],
        first: dict | None,
        timings: RemoteTimings,
    ):
        self.expert, self.timings = expert, timings
        self.new_tokens = 0
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.cancelled = False
        self._response, self._events, self._first = response, events, first

    def text(self, cancel: threading.Event | None = None) -> Iterator[str]:
        pieces = 0
        try:
            event = self._first
            while event is not None:
                if cancel is not None and cancel.is_set():
                    self.cancelled = True
                    return
                piece = self._absorb(event)
                if piece:
                    pieces += 1
                    yield piece
                event = next(self._events, None)
        except httpx.TimeoutException:
            raise RemoteExpertError(
                f"{self.expert.describe()} stopped answering for {self.expert.cfg.timeout_s:g} s "
                "(timeout_s) in the middle of its answer"
            ) from None
        except httpx.HTTPError as exc:
            raise RemoteExpertError(f"{self.expert.describe()} broke off its answer: {exc}") from None
        finally:
            if not self.new_tokens:
                self.new_tokens = pieces

    def _absorb(self, event: dict) -> str:
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.new_tokens = int(usage.get("completion_tokens") or 0)
            self.prompt_tokens = usage.get("prompt_tokens")
        choices = event.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return (choice.get("delta") or {}).get("content") or ""

    def close(self) -> None:
        self._response.close()


class RemoteExpert:
    """Client of one remote expert (thread-safe: turns share its connection pool)."""

    def __init__(self, expert_id: str, cfg: ExpertConfig):
        if not cfg.is_remote:
            raise ValueError(f"{expert_id} is not a remote expert (source {cfg.source})")
        self.id, self.cfg = expert_id, cfg
        self.base_url = cfg.base_url
        self._client = httpx.Client(timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)))
        self._health = EndpointHealth()
        self._lock = threading.Lock()
        self._refreshing = False

    def describe(self) -> str:
        return f"remote expert {self.id} ({self.cfg.model} at {self.base_url})"

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    # -- health ------------------------------------------------------------------------------------
    def health(self) -> EndpointHealth:
        """The last known health, never blocking; a stale one is refreshed in the background."""
        with self._lock:
            stale = self._health.checked_at is None or time.monotonic() - self._health.checked_at > HEALTH_TTL_S
            if stale and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, name=f"health-{self.id}", daemon=True).start()
            return self._health

    def _refresh(self) -> None:
        try:
            self.check()
        finally:
            with self._lock:
                self._refreshing = False

    def check(self) -> EndpointHealth:
        """``GET <base_url>/models`` now (at most HEALTH_TIMEOUT_S); records and returns the result."""
        start = time.perf_counter()
        error = None
        try:
            response = self._client.get(
                f"{self.base_url}/models", headers=self._headers(), timeout=min(self.cfg.timeout_s, HEALTH_TIMEOUT_S)
            )
            if response.status_code != 200:
                error = f"GET /models answered HTTP {response.status_code}"
            else:
                served = {m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)}
                if self.cfg.model not in served:
                    error = f"the server does not list model {self.cfg.model!r} (it serves {sorted(served)})"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except RuntimeError as exc:  # the client was closed (the engine shut down) during a background check
            error = str(exc)
        except (ValueError, AttributeError):
            error = "GET /models did not answer an OpenAI model list"
        health = EndpointHealth(error is None, time.monotonic(), round(time.perf_counter() - start, 4), error)
        with self._lock:
            self._health = health
        return health

    def down_reason(self) -> str | None:
        """Why the endpoint counts as down now (a failure within HEALTH_TTL_S), else None."""
        h = self._health
        if h.ok is False and h.checked_at is not None and time.monotonic() - h.checked_at < HEALTH_TTL_S:
            return h.error
        return None

    def _mark_down(self, error: str) -> None:
        with self._lock:
            self._health = EndpointHealth(False, time.monotonic(), None, error)

    # -- chat --------------------------------------------------------------------------------------
    def request_body(self, messages: list[dict], params: GenerationParams) -> dict:
        body = {
            "model": self.cfg.model,
            "messages": with_system(messages, self.cfg),
            "stream": True,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def open(
        self, messages: list[dict], params: GenerationParams, cancel: threading.Event | None = None
    ) -> RemoteReply:
        """Send the chat request and read up to the first event. Raises RemoteExpertError (never hangs:
        each connect and read waits at most ``timeout_s``; connection errors and 5xx/429 are retried)."""
        body = self.request_body(messages, params)
        attempts = 1 + self.cfg.retries
        last = "no attempt"
        for attempt in range(1, attempts + 1):
            if cancel is not None and cancel.is_set():
                raise RemoteExpertError(f"{self.describe()}: cancelled before it answered")
            try:
                return self._open_once(body, attempt)
            except _Retryable as exc:
                last = str(exc)
                if attempt < attempts:
                    time.sleep(min(0.25 * 2 ** (attempt - 1), 2.0))
            except RemoteExpertError as exc:
                self._mark_down(str(exc))
                raise
        message = f"{self.describe()} is unreachable after {attempts} attempt(s): {last}"
        self._mark_down(message)
        raise RemoteExpertError(message)

    def _open_once(self, body: dict, attempt: int) -> RemoteReply:
        start = time.perf_counter()
        timings = RemoteTimings(attempts=attempt)

        def trace(name: str, info: dict) -> None:
            if name == "connection.connect_tcp.complete":
                timings.connect_s = time.perf_counter() - start

        request = self._client.build_request(
            "POST", f"{self.base_url}/chat/completions", json=body, headers=self._headers(), extensions={"trace": trace}
        )
        try:
            response = self._client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        except httpx.TimeoutException:
            raise RemoteExpertError(
                f"{self.describe()} did not answer within {self.cfg.timeout_s:g} s (timeout_s)"
            ) from None
        except httpx.HTTPError as exc:
            raise RemoteExpertError(f"{self.describe()}: {type(exc).__name__}: {exc}") from None
        timings.headers_s = time.perf_counter() - start
        try:
            first, events = self._first_event(response)
        except BaseException:
            response.close()
            raise
        timings.first_byte_s = time.perf_counter() - start
        return RemoteReply(self, response, events, first, timings)

    def _first_event(self, response: httpx.Response) -> tuple[dict | None, Iterator[dict]]:
        if response.status_code != 200:
            detail = _error_detail(response)
            message = f"{self.describe()} answered HTTP {response.status_code}: {detail}"
            if response.status_code >= 500 or response.status_code == 429:
                raise _Retryable(message)
            raise RemoteExpertError(message)
        kind = response.headers.get("content-type", "")
        if not kind.startswith("text/event-stream"):
            raise RemoteExpertError(
                f"{self.describe()} answered {kind or 'no content type'}, not a stream of "
                "server-sent events: is the base URL an OpenAI-compatible /v1?"
            )
        events = _sse_events(response, self.describe())
        try:
            return next(events, None), events
        except httpx.TimeoutException:
            raise RemoteExpertError(
                f"{self.describe()} sent no answer within {self.cfg.timeout_s:g} s (timeout_s)"
            ) from None
        except httpx.HTTPError as exc:
            raise RemoteExpertError(f"{self.describe()} broke off before answering: {exc}") from None

    def close(self) -> None:
        self._client.close()


class _Retryable(RemoteExpertError):
    """A failure worth another attempt (connection refused or reset, 5xx, 429)."""


def _error_detail(response: httpx.Response) -> str:
    try:
        raw = response.read()[:_MAX_ERROR_BODY].decode("utf-8", "replace")
    except httpx.HTTPError:
        return "(no body)"
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.strip() or "(no body)"


def _sse_events(response: httpx.Response, who: str) -> Iterator[dict]:
    """The JSON payloads of an OpenAI chat completion stream, until ``data: [DONE]``."""
    for line in response.iter_lines():
        if not line or line.startswith(":") or line.startswith(("event:", "id:", "retry:")):
            continue
        if not line.startswith("data:"):
            raise RemoteExpertError(f"{who} sent a line that is not a server-sent event: {line[:80]!r}")
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise RemoteExpertError(f"{who} sent an event that is not JSON: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise RemoteExpertError(f"{who} sent an event that is not a JSON object: {data[:80]!r}")
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise RemoteExpertError(f"{who} reported an error: {message}")
        yield event
