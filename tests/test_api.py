"""The OpenAI-compatible API, through the real ``openai`` client and raw HTTP against a served app.

Tiny random-weight experts (no router: the default expert serves) where routing is not the point; `python -m app`
(the playground and the API on one port) with the packaged SmolLM2 and the seed-trained router for real calls.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from coe_core.api import build_server
from coe_core.api.errors import api_error
from coe_core.config import config_from_dict
from coe_core.engine import CoE
from coe_core.errors import (
    ConfigError,
    ExpertUnavailable,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RateLimited,
    RemoteExpertError,
    StoreError,
    TierBusy,
)
from coe_core.events import RouteDecision, TextChunk, TurnDone, TurnStats
from coe_core.hf_spaces import GPUQuotaError
from coe_core.store import Store
from coe_core.store.errors import InteractionNotFound
from tests.conftest import REPO, SHARED_EXPERTS, tiny_config_dict
from tests.http_server import ServerThread, free_port, smollm2_data_dir, start_process, stop_process, wait_ready

HELLO = [{"role": "user", "content": "hello there"}]


def make_tiny(tiny_sources, tmp_path, **overrides) -> CoE:
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    for key, value in overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return CoE(config_from_dict(raw, env=False), routing=None, progress=False)


@pytest.fixture
def tiny_server(tiny_sources, tmp_path, monkeypatch):
    """(coe, base url) of a served CoE of tiny experts, without an API key."""
    monkeypatch.delenv("COE_API_KEY", raising=False)
    coe = make_tiny(tiny_sources, tmp_path)
    with ServerThread(build_server(coe)) as url:
        yield coe, url
    coe.close()


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def logged(coe: CoE) -> list[dict]:
    return coe.store.recent_interactions(100)


# -- the openai client ---------------------------------------------------------------------------------
def test_openai_client_whole_answer_is_logged_with_its_route(tiny_server):
    coe, url = tiny_server
    raw = client(url).chat.completions.with_raw_response.create(model="coe", messages=HELLO, max_tokens=8)
    assert raw.headers["x-coe-expert"] == "small" and raw.headers["x-coe-category"] == "general"
    assert 0 < float(raw.headers["x-coe-confidence"]) <= 1
    completion = raw.parse()
    extra = completion.model_extra["coe"]
    assert completion.model == "small" and extra["expert"] == "small" and extra["reason"] == "default"
    assert 1 <= completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.choices[0].finish_reason in ("stop", "length")
    turn = coe.store.get_interaction(extra["interaction_id"])
    assert turn["client"] == "api" and turn["status"] == "ok"
    assert turn["response"] == completion.choices[0].message.content
    assert turn["new_tokens"] == completion.usage.completion_tokens


def test_openai_client_stream_forced_expert(tiny_server):
    coe, url = tiny_server
    stream = client(url).chat.completions.create(
        model="medium", messages=HELLO, max_tokens=8, stream=True, stream_options={"include_usage": True}, temperature=0
    )
    chunks = list(stream)
    first, text = chunks[0], "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert first.choices[0].delta.role == "assistant"
    route = first.model_extra["coe"]
    assert route["expert"] == "medium" and route["reason"] == "override-expert"
    assert route["swaps"] and route["swaps"][0]["dst"] == "cpu"  # medium was not resident: it was swapped in
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["coe"]["status"] == "ok"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 1 <= usage.completion_tokens <= 8
    turn = coe.store.get_interaction(finish[0].model_extra["coe"]["interaction_id"])
    assert turn["response"] == text and turn["expert"] == "medium" and turn["client"] == "api"


def test_raw_sse_stream(tiny_server):
    _, url = tiny_server
    body = {"model": "coe", "messages": HELLO, "max_tokens": 6, "stream": True, "stop": ["\n\n\n"]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-coe-expert"] == "small"
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1
    assert events[0]["coe"]["category"] == "general" and events[-1]["choices"][0]["finish_reason"]


# -- models, route, feedback, probes --------------------------------------------------------------------
def test_models_route_feedback_and_probes(tiny_server):
    coe, url = tiny_server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["coe", "small", "medium", "large", "plain"]
    decision = httpx.post(f"{url}/v1/route", json={"prompt": "hi", "model": "large"}).json()
    assert decision["expert"] == "large" and decision["reason"] == "override-expert"
    assert logged(coe) == []  # routing runs nothing and logs nothing
    completion = client(url).chat.completions.create(model="coe", messages=HELLO, max_tokens=4)
    iid = completion.model_extra["coe"]["interaction_id"]
    ok = httpx.post(
        f"{url}/v1/feedback", json={"interaction_id": iid, "kind": "wrong_category", "corrected_category": "coding"}
    )
    assert ok.status_code == 200 and coe.store.latest_feedback(iid)["corrected_category"] == "coding"
    missing = httpx.post(f"{url}/v1/feedback", json={"interaction_id": iid + 999, "kind": "like"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "interaction_id"
    bad = httpx.post(f"{url}/v1/feedback", json={"interaction_id": iid, "kind": "meh"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kind"
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["router"] == "none"


# -- bad input ------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    (
        "malformed json",
        {"content": b'{"model": "coe", "messages": [', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    ("not a json object", {"content": b"model=coe"}, 400, "invalid_json"),
    ("no messages", {"json": {"model": "coe"}}, 400, None),
    ("empty messages", {"json": {"model": "coe", "messages": []}}, 400, None),
    ("empty prompt", {"json": {"model": "coe", "messages": [{"role": "user", "content": "  "}]}}, 400, None),
    ("assistant last", {"json": {"model": "coe", "messages": [{"role": "assistant", "content": "hi"}]}}, 400, None),
    ("unknown role", {"json": {"model": "coe", "messages": [{"role": "tool", "content": "hi"}]}}, 400, None),
    ("two choices", {"json": {"model": "coe", "messages": HELLO, "n": 2}}, 400, None),
    ("temperature", {"json": {"model": "coe", "messages": HELLO, "temperature": 3}}, 400, None),
    ("too many tokens", {"json": {"model": "coe", "messages": HELLO, "max_tokens": 10**6}}, 400, None),
    ("unknown category", {"json": {"model": "coe", "messages": HELLO, "category": "cooking"}}, 400, None),
    (
        "prompt over max_prompt_chars",
        {"json": {"model": "coe", "messages": [{"role": "user", "content": "x" * 5000}]}},
        400,
        "context_length_exceeded",
    ),
    ("unknown model", {"json": {"model": "gpt-4o", "messages": HELLO}}, 404, "model_not_found"),
    (
        "body over max_body_bytes",
        {"json": {"model": "coe", "messages": [{"role": "user", "content": "x" * 70_000}]}},
        413,
        "request_too_large",
    ),
]


def test_bad_input_gets_status_and_openai_error_shape_and_logs_nothing(tiny_sources, tmp_path, monkeypatch):
    monkeypatch.delenv("COE_API_KEY", raising=False)
    coe = make_tiny(tiny_sources, tmp_path, limits__max_prompt_chars=4000, api__max_body_bytes=65536)
    try:
        with ServerThread(build_server(coe)) as url:
            for name, request, status, code in BAD_REQUESTS:
                response = httpx.post(f"{url}/v1/chat/completions", timeout=60, **request)
                assert response.status_code == status, (name, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], name
                assert error["type"] == "invalid_request_error", name
                if code:
                    assert error["code"] == code, (name, error)
            # a chunked body (no Content-Length) over the limit is cut off while reading
            chunks = (b"x" * 16384 for _ in range(8))
            chunked = httpx.post(f"{url}/v1/chat/completions", content=chunks, timeout=60)
            assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
            # the openai client raises its typed errors for them
            with pytest.raises(openai.NotFoundError):
                client(url).chat.completions.create(model="nope", messages=HELLO)
            with pytest.raises(openai.BadRequestError):
                client(url).chat.completions.create(model="coe", messages=[])
    finally:
        coe.close()
    assert logged(coe) == []


def test_api_key_guards_every_v1_route(tiny_sources, tmp_path, monkeypatch):
    monkeypatch.setenv("COE_API_KEY", "s3cret")
    coe = make_tiny(tiny_sources, tmp_path)
    try:
        with ServerThread(build_server(coe)) as url:
            with pytest.raises(openai.AuthenticationError):
                client(url, "wrong").chat.completions.create(model="coe", messages=HELLO, max_tokens=4)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                for method, path in (("GET", "/v1/models"), ("POST", "/v1/route"), ("POST", "/v1/feedback")):
                    response = httpx.request(method, url + path, headers=headers, json={"prompt": "hi"})
                    assert response.status_code == 401, (path, headers)
                    assert response.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
            answer = client(url, "s3cret").chat.completions.create(model="coe", messages=HELLO, max_tokens=4)
            assert answer.choices[0].message.content is not None
    finally:
        coe.close()
    assert [t["status"] for t in logged(coe)] == ["ok"]  # only the authorised turn


def test_full_queue_answers_429_with_retry_after_from_the_queue(tiny_sources, tmp_path, monkeypatch):
    """With serve.max_running 1 and serve.max_queue 0, a turn while another runs gets 429 busy, with a
    Retry-After estimated from the queue; once that turn ends, the next one is served."""
    monkeypatch.delenv("COE_API_KEY", raising=False)
    coe = make_tiny(tiny_sources, tmp_path, serve__max_running=1, serve__max_queue=0)
    held = coe.scheduler.admit("small")  # another door's turn holds the one running place
    try:
        with ServerThread(build_server(coe)) as url:
            with pytest.raises(openai.RateLimitError) as busy:
                client(url).chat.completions.create(model="coe", messages=HELLO, max_tokens=4)
            assert int(busy.value.response.headers["retry-after"]) >= 1
            assert busy.value.body["code"] == "busy"
            assert "serve.max_queue" in busy.value.body["message"]
            coe.scheduler.leave(held)
            answer = client(url).chat.completions.create(model="coe", messages=HELLO, max_tokens=4)
            assert answer.model_extra["coe"]["status"] == "ok"
    finally:
        coe.scheduler.leave(held)
        coe.close()
    assert [t["status"] for t in logged(coe)] == ["ok"]  # the refused turn was never logged


def test_turn_failing_before_text_maps_to_status(tiny_sources, tmp_path, monkeypatch):
    """The exception that failed a turn before its text picks the status: TierBusy -> 429 with Retry-After, no
    expert -> 503, anything else -> 500, in the OpenAI error shape, for streaming requests too."""
    monkeypatch.delenv("COE_API_KEY", raising=False)
    coe = make_tiny(tiny_sources, tmp_path)
    failure: dict = {}

    def failing_turn(messages, overrides=None, **kwargs):
        yield RouteDecision(category="general", expert="small", reason="default")
        exc = failure["exc"]
        yield TurnDone(
            TurnStats(expert="small", response="", status="error", error=str(exc), error_type=type(exc).__name__),
            error=exc,
        )

    coe.chat = failing_turn
    try:
        with ServerThread(build_server(coe)) as url:
            for exc, status, code in (
                (TierBusy("TierBusy happened", 3), 429, "busy"),
                (ExpertUnavailable("ExpertUnavailable happened"), 503, "no_expert_available"),
                (RemoteExpertError("the remote is down"), 503, "no_expert_available"),
                (OSError("OSError happened"), 500, "turn_failed"),
            ):
                failure["exc"] = exc
                for stream in (False, True):
                    response = httpx.post(
                        f"{url}/v1/chat/completions",
                        timeout=60,
                        json={"model": "coe", "messages": HELLO, "stream": stream},
                    )
                    assert response.status_code == status
                    assert response.json()["error"]["message"] == str(exc)
                    assert response.json()["error"]["code"] == code
                    assert response.headers.get("retry-after") == ("3" if status == 429 else None)
    finally:
        coe.close()


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (PromptTooLong("too long"), 400, "context_length_exceeded"),
        (InvalidRequest("unknown expert 'x'"), 400, "invalid_value"),
        (InteractionNotFound("no turn 5"), 404, "interaction_not_found"),
        (RateLimited("too much feedback"), 429, "rate_limited"),
        (QueueFull("busy: 64 turns wait", 7), 429, "busy"),
        (TierBusy("the gpu tier is full"), 429, "busy"),
        (ExpertUnavailable("no weights"), 503, "no_expert_available"),
        (GPUQuotaError("the GPU of this Space is not available to you right now"), 503, "unavailable"),
        (StoreError("the interaction store failed"), 503, "store_error"),
        (ConfigError("router.embedder: no such package"), 500, "config_error"),
        (RuntimeError("a bug"), 500, "turn_failed"),
    ],
)
def test_every_engine_error_has_one_status(exc, status, code):
    """``api_error`` is the API's one map from the engine's errors to HTTP: a caller's mistake is a 4xx, a busy
    CoE a 429 that says when to retry, a CoE that cannot serve a 503, anything else a 500."""
    error = api_error(exc)
    assert (error.status, error.code, error.message) == (status, code, str(exc))
    if status == 429:
        assert int(error.headers["Retry-After"]) == exc.retry_after_s >= 1
    if isinstance(exc, InvalidRequest):
        assert isinstance(exc, ValueError)  # code that still catches ValueError keeps working


def test_failure_after_text_ends_the_stream_with_an_error(tiny_sources, tmp_path, monkeypatch):
    """Text already streamed cannot be taken back: the stream ends with an error event the client raises."""
    monkeypatch.delenv("COE_API_KEY", raising=False)
    coe = make_tiny(tiny_sources, tmp_path)

    def breaking_turn(messages, overrides=None, **kwargs):
        yield RouteDecision(category="general", expert="small", reason="default")
        yield TextChunk("Half an")
        yield TurnDone(
            TurnStats(
                expert="small", response="Half an", status="error", error="the GPU fell over", error_type="RuntimeError"
            )
        )

    coe.chat = breaking_turn
    try:
        with ServerThread(build_server(coe)) as url:
            received = []
            with pytest.raises(openai.APIError, match="the GPU fell over"):
                for chunk in client(url).chat.completions.create(model="coe", messages=HELLO, stream=True):
                    received.append(chunk.choices[0].delta.content or "")
            assert "".join(received) == "Half an"
            whole = httpx.post(f"{url}/v1/chat/completions", json={"model": "coe", "messages": HELLO}, timeout=60)
            assert whole.status_code == 500 and whole.json()["error"]["code"] == "turn_failed"
    finally:
        coe.close()


# -- python -m app: the packaged expert, the router and the playground on one port ----------------------------
@pytest.fixture(scope="module")
def playground(tmp_path_factory, seed_router_dir):
    """``python -m app`` (playground + API on one port) serving the packaged SmolLM2 with the seed router;
    yields (url, its store)."""
    base = tmp_path_factory.mktemp("playground")
    config, data = smollm2_data_dir(base, REPO, SHARED_EXPERTS, seed_router_dir)
    port = free_port()
    proc = start_process(
        ["-m", "app", "--port", str(port), "--config", str(config), "--data-dir", str(data)], base / "app.log", REPO
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=240)
        with Store(f"sqlite:///{data / 'coe.sqlite3'}") as store:
            yield url, store
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_playground_and_api_share_one_port(playground):
    url, _ = playground
    page = httpx.get(url + "/", timeout=60)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    assert "smollm2-135m" in [m.id for m in client(url).models.list().data]
    ready = httpx.get(url + "/readyz").json()
    assert ready["ready"] and ready["router"] == "loaded"


@pytest.mark.slow
def test_real_expert_routed_through_the_openai_client(playground):
    url, store = playground
    raw = client(url).chat.completions.with_raw_response.create(
        model="coe",
        max_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": "Write a Python function that reverses a string."}],
    )
    completion = raw.parse()
    route = completion.model_extra["coe"]
    assert raw.headers["x-coe-category"] == route["category"] == "coding"
    assert route["router_version"] and route["probabilities"]["coding"] == pytest.approx(route["confidence"])
    assert completion.choices[0].message.content.strip()  # a real answer, not empty
    turn = store.get_interaction(route["interaction_id"])
    assert turn["category"] == "coding" and turn["client"] == "api"


def _next_logged_turn(store: Store, before: set[int], within_s: float = 90) -> dict:
    # generous: on a busy shared 2-core box llama.cpp's spinning threads can make one prefill 5-10x slower
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        new = [t for t in store.recent_interactions(100) if t["id"] not in before]
        assert len(new) <= 1  # a turn is one row: logged (running) at its start, completed at its end
        if new and new[0]["status"] != "running":
            return new[0]
        time.sleep(0.2)
    raise AssertionError(f"no turn was completed in the log within {within_s:g} s")


STORY = {
    "model": "smollm2-135m",
    "max_tokens": 400,
    "messages": [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}],
}


@pytest.mark.slow
def test_client_disconnect_cancels_the_turn(playground):
    """Closing the stream stops the compute: the turn is logged as cancelled, far short of max_tokens."""
    url, store = playground
    before = {t["id"] for t in store.recent_interactions(100)}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**STORY, "stream": True}, timeout=60) as response:
        texts = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                texts += 1
            if texts == 2:
                break  # leaving the block closes the connection
    turn = _next_logged_turn(store, before)
    assert turn["status"] == "cancelled" and turn["client"] == "api" and turn["new_tokens"] < 100


@pytest.mark.slow
def test_client_giving_up_on_a_whole_answer_cancels_the_turn(playground):
    """A non-streamed request whose client times out (here after 1 s of a story that takes several seconds even
    on the llama.cpp runtime, ~30 s on transformers) stops the compute."""
    url, store = playground
    before = {t["id"] for t in store.recent_interactions(100)}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=STORY, timeout=httpx.Timeout(60, read=1))
    turn = _next_logged_turn(store, before)
    assert turn["status"] == "cancelled" and turn["new_tokens"] < 200


@pytest.mark.slow
def test_a_client_leaving_during_a_long_prefill_stops_it_before_the_first_token(playground):
    """The disconnect is watched from the request's arrival and the prefill is chunked: a client that gives up
    2 s into a ~2,000-token prefill (about 17 s of CPU here) stops it; no token is ever generated."""
    url, store = playground
    before = {t["id"] for t in store.recent_interactions(100)}
    long = " ".join(f"word{i}" for i in range(1500)) + " Summarise that."
    body = {"model": "smollm2-135m", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": long}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=2))
    turn = _next_logged_turn(store, before)
    assert turn["status"] == "cancelled" and turn["new_tokens"] == 0 and turn["ttft_s"] is None
    assert turn["prompt_tokens"] > 1000
