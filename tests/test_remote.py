"""Remote experts (``source: openai:...``): streamed through, falling back to a local expert when the server
is down, slow or answers garbage (always within the timeout), and a second CoE serving as an expert of the
first one across a real HTTP hop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from coe_core.api import build_server
from coe_core.config import config_from_dict
from coe_core.engine import CoE
from coe_core.errors import ConfigError, RemoteExpertError
from coe_core.events import Notice, RemoteConnect, SwapEvent, TextChunk, TurnDone
from coe_core.experts.generation import GenerationParams
from coe_core.store import Store
from tests.conftest import REPO, SHARED_EXPERTS, tiny_config_dict
from tests.http_server import ServerThread, free_port, smollm2_data_dir, start_process, stop_process, wait_ready

STUB_PIECES = ["Hello", " from", " the stub"]
HELLO = [{"role": "user", "content": "hello there"}]


def _sse(*events: dict | str) -> list[str]:
    return [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]


def _delta(text: str | None = None, finish: str | None = None) -> dict:
    delta = {"content": text} if text is not None else {"role": "assistant", "content": ""}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def stub_server(received: list[dict]) -> FastAPI:
    """An OpenAI-compatible stub whose behaviour is the first path segment: ok, slow, garbage, broken, midway."""
    app = FastAPI()

    @app.get("/{mode}/v1/models")
    async def models(mode: str) -> dict:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.post("/{mode}/v1/chat/completions")
    async def chat(mode: str, request: Request):
        received.append(await request.json())
        if mode == "slow":  # answers nothing for 30 s (or until the client gives up)
            for _ in range(300):
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.1)
            return JSONResponse({"error": {"message": "too late"}}, status_code=504)
        if mode == "garbage":
            return PlainTextResponse("hello, I am not an OpenAI server")
        if mode == "broken":
            return StreamingResponse(iter(["data: {not json at all\n\n"]), media_type="text/event-stream")
        if mode == "midway":
            return StreamingResponse(
                iter(_sse(_delta(), _delta("Half an answer")) + ["data: {oops\n\n"]), media_type="text/event-stream"
            )
        usage = {
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": len(STUB_PIECES), "total_tokens": 10},
        }
        events = [_delta(), *[_delta(p) for p in STUB_PIECES], _delta(finish="stop"), usage, "[DONE]"]
        return StreamingResponse(iter(_sse(*events)), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub():
    received: list[dict] = []
    with ServerThread(stub_server(received)) as url:
        yield url, received


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


def remote_coe(tiny_sources, tmp_path, base_url: str, *, local: bool = True, **remote) -> CoE:
    """The tiny experts plus remote expert ``edge`` (the default expert: without a router it serves)."""
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    experts = raw["profiles"]["offline"]["experts"] if local else {}
    experts["edge"] = {"source": f"openai:{base_url}", "model": "stub-model", "timeout_s": 5, "retries": 0, **remote}
    raw["profiles"]["offline"] = {"default_expert": "edge", "experts": experts}
    return CoE(config_from_dict(raw, env=False), routing=None, progress=False)


def run(coe: CoE, **kwargs) -> tuple[list, float]:
    start = time.perf_counter()
    events = list(coe.chat(HELLO, max_new_tokens=8, **kwargs))
    return events, time.perf_counter() - start


def of(events: list, kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


# -- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expert, says",
    [
        ({"source": "openai:http://gpu-box:8000/v1"}, "needs `model`"),
        ({"source": "openai:gpu-box:8000"}, "base URL"),
        ({"source": "dir:/models/x", "model": "x"}, "only apply to remote experts"),
    ],
)
def test_remote_expert_config_is_checked(tmp_path, expert, says):
    raw = {"data_dir": str(tmp_path), "profiles": {"offline": {"default_expert": "e", "experts": {"e": expert}}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, env=False)
    assert "profiles.offline.experts.e" in str(err.value) and says in str(err.value)


# -- a working remote ------------------------------------------------------------------------------------
def test_remote_expert_streams_token_by_token(tiny_sources, tmp_path, stub):
    url, received = stub
    coe = remote_coe(tiny_sources, tmp_path, f"{url}/ok/v1")
    try:
        assert coe.prepare(["edge"]) == {"edge": None}  # GET /models answered and lists the model
        events, _ = run(coe, stop=["\nUser:"], temperature=0.2)
        assert [c.text for c in of(events, TextChunk)] == STUB_PIECES  # passed through piece by piece
        assert not of(events, SwapEvent)  # nothing moved between tiers: a connection is no swap
        (connection,) = of(events, RemoteConnect)
        assert connection.expert == "edge" and connection.base_url.endswith("/ok/v1")
        assert 0 <= connection.connect_s <= connection.headers_s <= connection.first_byte_s
        assert set(connection.phases) == {"connect", "headers", "first_byte"}
        assert sum(connection.phases.values()) == pytest.approx(connection.first_byte_s)
        stats = of(events, TurnDone)[0].stats
        assert (stats.status, stats.expert, stats.response) == ("ok", "edge", "Hello from the stub")
        assert (stats.new_tokens, stats.prompt_tokens) == (3, 7)  # from the server's usage
        sent = received[-1]
        assert sent["model"] == "stub-model" and sent["stream"] is True and sent["max_tokens"] == 8
        assert sent["stop"] == ["\nUser:"] and sent["temperature"] == 0.2 and sent["messages"] == HELLO
        info = coe.experts_info()["experts"]
        edge = next(e for e in info if e["id"] == "edge")
        assert edge["state"] == "remote" and edge["tiers"] == {"gpu": 0, "cpu": 0, "disk": 0}
        assert edge["remote"]["health"]["ok"] is True and edge["reason"] is None
        turn = coe.store.get_interaction(stats.interaction_id)
        assert turn["expert"] == "edge" and turn["swaps"] == []
        assert turn["remote_connection"]["first_byte_s"] == connection.first_byte_s
        assert coe.store.stats()["serving_by_hour"][-1]["swaps_per_100_turns"] == 0
    finally:
        coe.close()


# -- a remote that fails: fall back, or fail clearly, within the timeout -----------------------------------
@pytest.mark.parametrize(
    "mode, says",
    [
        ("down", "unreachable"),
        ("slow", "did not answer within 1 s"),
        ("garbage", "not a stream of server-sent events"),
        ("broken", "not JSON"),
    ],
)
def test_failing_remote_falls_back_to_a_local_expert(tiny_sources, tmp_path, stub, mode, says):
    url, _ = stub
    base = closed_port_url() if mode == "down" else f"{url}/{mode}/v1"
    coe = remote_coe(tiny_sources, tmp_path, base, timeout_s=1, retries=1 if mode == "down" else 0)
    try:
        events, seconds = run(coe)
        assert seconds < 10  # bounded by timeout_s (1 s), never hangs
        (notice,) = [n for n in of(events, Notice) if n.expert]
        assert notice.expert == "small" and says in notice.message and "edge" in notice.message
        stats = of(events, TurnDone)[0].stats
        assert stats.status == "ok" and stats.expert == "small" and stats.new_tokens >= 1
        turn = coe.store.get_interaction(stats.interaction_id)
        assert turn["reason"] == "remote-fallback" and turn["expert"] == "small"
        # the failure is remembered: the next turn falls back at once instead of waiting again
        events, _ = run(coe)
        (notice,) = [n for n in of(events, Notice) if n.expert]
        assert "is down" in notice.message
        assert coe.experts_info()["experts"][-1]["remote"]["health"]["ok"] is False
    finally:
        coe.close()


def test_remote_breaking_off_midway_fails_the_turn(tiny_sources, tmp_path, stub):
    url, _ = stub
    coe = remote_coe(tiny_sources, tmp_path, f"{url}/midway/v1")
    try:
        events, _ = run(coe)
        stats = of(events, TurnDone)[0].stats
        assert [c.text for c in of(events, TextChunk)] == ["Half an answer"]
        assert stats.status == "error" and "not JSON" in stats.error and stats.expert == "edge"
        assert coe.store.get_interaction(stats.interaction_id)["status"] == "error"
    finally:
        coe.close()


def test_only_remote_and_down_is_a_clear_503(tiny_sources, tmp_path, monkeypatch):
    monkeypatch.delenv("COE_API_KEY", raising=False)
    coe = remote_coe(tiny_sources, tmp_path, closed_port_url(), local=False, timeout_s=1)
    try:
        with pytest.raises(RemoteExpertError):
            coe.catalog.remote("edge").open(HELLO, GenerationParams(max_new_tokens=4))
        with ServerThread(build_server(coe)) as url:
            response = httpx.post(f"{url}/v1/chat/completions", json={"model": "coe", "messages": HELLO}, timeout=30)
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "no_expert_available" and "no local expert" in error["message"]
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 503 and "edge" in ready.json()["unavailable"]
    finally:
        coe.close()


def test_a_remote_expert_known_to_be_down_never_stands_in(tiny_sources, tmp_path):
    coe = remote_coe(tiny_sources, tmp_path, closed_port_url(), timeout_s=1)
    try:
        assert coe._stand_in("small", "general", "small failed") == "edge"  # the default expert ranks first
        with pytest.raises(RemoteExpertError):  # its endpoint fails: the catalog remembers it is down
            coe.catalog.remote("edge").open(HELLO, GenerationParams(max_new_tokens=4))
        assert coe._stand_in("small", "general", "small failed") != "edge"
    finally:
        coe.close()


# -- scale-out: a CoE as an expert of another CoE ---------------------------------------------------------
@pytest.fixture(scope="module")
def downstream_coe(tmp_path_factory, seed_router_dir):
    """A second CoE in its own process (``python -m coe_core.api``) serving the packaged SmolLM2 over /v1."""
    base = tmp_path_factory.mktemp("downstream")
    config, data = smollm2_data_dir(base, REPO, SHARED_EXPERTS, seed_router_dir)
    port = free_port()
    proc = start_process(
        ["-m", "coe_core.api", "--port", str(port), "--config", str(config), "--data-dir", str(data)],
        base / "server.log",
        REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=240)
        yield url, data
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_a_coe_serves_as_an_expert_of_another_coe(downstream_coe, tiny_sources, tmp_path, seed_router_dir):
    url, downstream_data = downstream_coe
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    raw["profiles"]["offline"] = {
        "default_expert": "edge",
        "experts": {
            "edge": {"source": f"openai:{url}/v1", "model": "smollm2-135m", "timeout_s": 60, "generalist": True},
            "small": raw["profiles"]["offline"]["experts"]["small"],
        },
    }
    config = config_from_dict(raw, env=False)
    shutil.copytree(seed_router_dir, config.data_path / "router")
    coe = CoE(config, progress=False)  # routed: no score table, so every category maps to the default, edge
    try:
        prompt = [{"role": "user", "content": "Write a Python function that reverses a string."}]
        events = list(coe.chat(prompt, max_new_tokens=12, temperature=0))
        decision, stats = events[0], of(events, TurnDone)[0].stats
        assert decision.category == "coding" and decision.expert == "edge" and decision.router_version
        assert stats.status == "ok" and stats.expert == "edge" and stats.response.strip()
        assert of(events, RemoteConnect) and not of(events, SwapEvent)
        assert not [n for n in of(events, Notice) if n.expert]
        assert 1 <= stats.new_tokens <= 12
        with Store(f"sqlite:///{downstream_data / 'coe.sqlite3'}") as downstream:  # the hop was a logged API turn
            (turn,) = downstream.recent_interactions(5)
        assert turn["client"] == "api" and turn["expert"] == "smollm2-135m" and turn["response"] == stats.response
    finally:
        coe.close()


def _postgres_url() -> str | None:
    urls = [u.strip() for u in os.environ.get("COE_TEST_DATABASE_URLS", "").split(",")]
    return next((u for u in urls if u.startswith("postgresql")), None)


@pytest.mark.skipif(_postgres_url() is None, reason="needs a PostgreSQL URL in COE_TEST_DATABASE_URLS (.ci/run)")
def test_two_coe_servers_share_one_postgresql_log(tiny_sources, tmp_path, monkeypatch):
    """Routers behind a load balancer: each has its own data dir, both log to one PostgreSQL database, and
    feedback sent to either one reaches a turn served by the other."""
    from sqlalchemy import create_engine

    from coe_core.store.models import Base

    url = _postgres_url()
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    monkeypatch.delenv("COE_API_KEY", raising=False)
    coes = []
    for name in ("a", "b"):
        raw = tiny_config_dict(tiny_sources, tmp_path / name)
        raw["store"] = {"url": url}
        coes.append(CoE(config_from_dict(raw, env=False), routing=None, progress=False))
    try:
        with ServerThread(build_server(coes[0])) as a, ServerThread(build_server(coes[1])) as b:
            ids = []
            for server in (a, b, a):
                answer = httpx.post(
                    f"{server}/v1/chat/completions",
                    timeout=60,
                    json={"model": "coe", "messages": HELLO, "max_tokens": 4},
                ).json()
                ids.append(answer["coe"]["interaction_id"])
            assert len(set(ids)) == 3  # one sequence of ids across both servers
            ok = httpx.post(f"{b}/v1/feedback", json={"interaction_id": ids[0], "kind": "like"})
            assert ok.status_code == 200
        assert coes[0].store.latest_feedback(ids[0])["kind"] == "like"
        assert sorted(t["id"] for t in coes[0].store.recent_interactions(10)) == sorted(ids)
    finally:
        for coe in coes:
            coe.close()
        engine = create_engine(url)
        Base.metadata.drop_all(engine)
        engine.dispose()
