"""Hostile visitors of the playground (issue 11): every private Gradio event called by its fn_index through
``POST /gradio_api/queue/join`` without the admin token gives away no other session's prompts and changes
nothing; the gradio API's feedback is bound to the session that made the turn."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from app.admin import AdminGate
from coe_core.store.records import TurnRecord
from tests.test_app import app_server, client  # noqa: F401 (fixtures: one packaged app per test session)

TOKEN = "hostile-test-token"


def call(
    url: str,
    fn_index: int,
    data: list,
    session: str,
    *,
    trigger: int | None = None,
    event_data: dict | None = None,
    timeout: float = 120,
) -> tuple[dict | None, str]:
    """Run one event as a plain HTTP client would; returns (the completed message or None, everything read)."""
    joined = httpx.post(
        url + "gradio_api/queue/join",
        timeout=30,
        json={
            "data": data,
            "fn_index": fn_index,
            "session_hash": session,
            "event_data": event_data,
            "trigger_id": trigger,
        },
    )
    assert joined.status_code < 500, joined.text
    if joined.status_code != 200:
        return None, joined.text
    event_id = joined.json()["event_id"]
    seen = []
    deadline = time.monotonic() + timeout
    with httpx.stream(
        "GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=timeout
    ) as response:
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"event {fn_index} did not finish within {timeout} s"
            seen.append(line)
            if not line.startswith("data: "):
                continue
            msg = json.loads(line[6:])
            if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                return msg, "\n".join(seen)
    return None, "\n".join(seen)


@pytest.fixture(scope="module")
def gated(app_server):  # noqa: F811
    """The packaged app's engine behind a second playground whose admin token is set."""
    from app.ui import build_app, launch_kwargs

    demo = build_app(app_server.coe, gate=AdminGate(TOKEN))
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, **launch_kwargs()
    )
    yield app_server.coe, url
    demo.close()


def _system_state(coe) -> dict:
    routing = coe.routing
    return {
        "active": routing.active_version()["id"],
        "threshold": routing.active_version().get("threshold"),
        "budget": routing.active_params_budget,
        "versions": len(routing.list_versions()),
        "pending": coe.store.pending_count(),
        "accepted": coe.store.stats()["feedback"],
    }


@pytest.mark.slow
def test_every_private_event_without_the_token_gives_away_no_other_sessions_prompt(gated):
    coe, url = gated
    marker = f"SECRET-{uuid.uuid4().hex[:12]}"
    other = coe.store.log_turn(
        TurnRecord(
            expert="smollm2-135m",
            prompt=f"{marker} my bank password is hunter2",
            routing_context=marker,
            response=f"{marker} answer",
            category="general",
            client="app",
            session_id="someone-else",
        )
    )
    coe.store.add_feedback(
        other, "wrong_category", "coding", categories=coe.config.all_categories, review="pending", author="someone-else"
    )
    before = _system_state(coe)
    config = httpx.get(url + "config", timeout=30).json()
    components = {c["id"]: c for c in config["components"]}
    private = [d for d in config["dependencies"] if d.get("api_visibility") == "private"]
    assert len(private) >= 20  # every tab's events, not a handful
    session = uuid.uuid4().hex[:11]
    failures, leaks = 0, []
    for dep in private:
        data = []
        for cid in dep["inputs"]:
            comp = components[cid]
            # a State input is taken from the server's session, whatever the client sends: try to spoof it
            data.append(True if comp["type"] == "state" else comp.get("props", {}).get("value"))
        trigger, kind = dep["targets"][0] if dep["targets"] else (None, None)
        event_data = {"index": [1, 0], "value": "x", "liked": "Wrong category"} if kind == "like" else None
        done, seen = call(url, dep["id"], data, session, trigger=trigger, event_data=event_data)
        if done is None or not done.get("success"):
            failures += 1
        if marker in seen:
            leaks.append(dep["id"])
    print(
        f"\nprivate events called without the token: {len(private)}, failed with a message: {failures}, "
        f"leaks: {len(leaks)}"
    )
    assert leaks == [], f"events {leaks} returned another session's prompt without the admin token"
    assert _system_state(coe) == before  # no retrain, promotion, threshold, mapping or review happened
    assert failures < len(private)  # most events are views that run fine for a visitor

    recent_id = next(
        i for i, c in components.items() if c.get("props", {}).get("label") == "Recent turns (newest first)"
    )
    refresh = next(d for d in private if recent_id in d["outputs"] and d["targets"][0][1] == "click")
    # a visitor sees their own session's turns there, not the other session's
    mine = f"MINE-{uuid.uuid4().hex[:12]}"
    coe.store.log_turn(
        TurnRecord(expert="smollm2-135m", prompt=mine, category="general", client="app", session_id=session)
    )
    done, seen = call(url, refresh["id"], [None], session, trigger=refresh["targets"][0][0])
    assert done["success"] and mine in seen and marker not in seen

    # the same view after unlocking with the token shows every session's turns: the check above can fail
    unlock = next(
        d
        for d in private
        if [components[i].get("props", {}).get("label") for i in d["inputs"]] == ["Admin token"]
        and d["targets"][0][1] == "click"
    )
    call(url, unlock["id"], [TOKEN], session, trigger=unlock["targets"][0][0])
    done, seen = call(url, refresh["id"], [None], session, trigger=refresh["targets"][0][0])
    assert done["success"] and marker in seen


@pytest.mark.slow
def test_gradio_feedback_only_on_own_turns_and_visitors_labels_wait_for_review(client, app_server):  # noqa: F811
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    coe = app_server.coe
    final = client.submit("What is 2 + 2?", None, None, "smollm2-135m", 4, 0.0, api_name="/chat").result()
    turn = final["interaction_id"]
    stranger = Client(app_server.url, verbose=False)  # another gradio session
    with pytest.raises(AppError, match="no interaction"):
        stranger.predict(turn, "wrong_category", "roleplay", api_name="/feedback")
    with pytest.raises(AppError, match="no interaction"):
        stranger.predict(2**63 + 5, "like", None, api_name="/feedback")
    answer = client.predict(turn, "wrong_category", "math", api_name="/feedback")
    assert answer["review"] == "pending"
    assert any(p["interaction_id"] == turn for p in coe.store.pending_feedback())


# -- the gradio API's endpoints, fuzzed ----------------------------------------------------------------------
def gradio_call(url: str, name: str, data: list, bound_s: float = 60.0) -> tuple[int, str]:
    """POST /gradio_api/call/<name>, then read its result; (HTTP status of the call, the SSE event kind)."""
    start = time.perf_counter()
    body = json.dumps({"data": data}, ensure_ascii=True).encode()  # lone surrogates travel as \ud800 escapes
    posted = httpx.post(
        f"{url}gradio_api/call/{name}", content=body, timeout=bound_s, headers={"content-type": "application/json"}
    )
    assert posted.status_code < 500, (name, data, posted.text[:300])
    if posted.status_code != 200:
        return posted.status_code, "refused"
    event = posted.json()["event_id"]
    kind = None
    with httpx.stream("GET", f"{url}gradio_api/call/{name}/{event}", timeout=bound_s) as response:
        assert response.status_code < 500
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                if kind in ("complete", "error"):
                    break
    assert time.perf_counter() - start < bound_s, f"{name} took too long"
    return posted.status_code, kind


@pytest.mark.slow
def test_fuzz_the_gradio_api(app_server):  # noqa: F811
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.test_fuzz import edge_text, huge_int, json_value

    url = app_server.url
    seen: list[str] = []
    fuzz = settings(
        max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    small_tokens = st.one_of(st.integers(-2, 3), st.sampled_from(["4", None, True, 1e300, float("nan")]))

    @fuzz
    @given(st.lists(st.one_of(edge_text, json_value), max_size=5))
    def route(data):
        seen.append(gradio_call(url, "route", data)[1])

    @fuzz
    @given(
        st.tuples(
            st.one_of(edge_text, edge_text, json_value),
            st.one_of(st.none(), st.just([]), json_value),
            st.none(),
            st.sampled_from([None, "smollm2-135m", "smollm2-135m", "nope", "../x"]),
            small_tokens,
            st.one_of(st.sampled_from([0.0, 0.7]), st.floats(allow_nan=True), st.none()),
        )
    )
    def chat(data):
        seen.append(gradio_call(url, "chat", list(data), bound_s=120)[1])

    @fuzz
    @given(
        st.tuples(st.one_of(huge_int, json_value), st.one_of(edge_text, json_value), st.one_of(st.none(), edge_text))
    )
    def feedback(data):
        seen.append(gradio_call(url, "feedback", list(data))[1])

    route()
    chat()
    feedback()
    from collections import Counter

    print(f"\ngradio fuzz: {len(seen)} calls, {dict(Counter(seen))}")
    assert "complete" in seen and "error" in seen  # both outcomes happened: the inputs reached the handlers
    assert httpx.get(url, timeout=30).status_code == 200
    assert app_server.coe.store.stats()["running"] == 0


# -- crash safety: kill -9 with turns streaming, restart ---------------------------------------------------------
@pytest.mark.slow
def test_kill_9_with_turns_streaming_leaves_each_turn_once_as_interrupted(tmp_path, seed_router_dir):
    import signal
    import threading

    from coe_core.store import Store
    from tests.conftest import REPO, SHARED_EXPERTS
    from tests.http_server import free_port, smollm2_data_dir, start_process, stop_process, wait_ready

    config, data = smollm2_data_dir(tmp_path, REPO, SHARED_EXPERTS, seed_router_dir)
    args = ["-m", "coe_core.api", "--config", str(config), "--data-dir", str(data)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process([*args, "--port", str(port)], tmp_path / "first.log", REPO)
    streaming = threading.Barrier(5)
    prompts = [f"Tell me a long story about dragon number {i}." for i in range(4)]

    def stream(prompt: str) -> None:
        body = {
            "model": "smollm2-135m",
            "max_tokens": 400,
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                # the iterator stays referenced: a closed one would close the connection, and the server
                # would rightly cancel the turn as a client that left
                lines = response.iter_lines()
                for line in lines:
                    if '"content":"' in line and '"content":""' not in line:
                        break  # text is streaming: this turn was seen by its user
                streaming.wait(120)
                time.sleep(60)  # keep the connection while the server is killed
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass

    try:
        wait_ready(url, proc, timeout=240)
        threads = [threading.Thread(target=stream, args=(p,), daemon=True) for p in prompts]
        for t in threads:
            t.start()
        streaming.wait(180)  # all four are streaming text
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        db = data / "coe.sqlite3"
        assert db.exists()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_process([*args, "--port", str(port)], tmp_path / "second.log", REPO)
        wait_ready(url, proc, timeout=240)
        with Store(f"sqlite:///{db}") as store:
            turns = store.recent_interactions(100)
            stats = store.stats()
        assert sorted(t["prompt"] for t in turns) == sorted(prompts)  # each turn present, once
        assert {t["status"] for t in turns} == {"interrupted"} and stats["interrupted"] == 4
        assert all(t["category"] and t["expert"] == "smollm2-135m" for t in turns)  # the decision was kept
        assert "logged as interrupted" in (tmp_path / "second.log").read_text()
        # a clean stop closes the store: no WAL or shared-memory file is left next to the database
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert not (data / "coe.sqlite3-wal").exists() and not (data / "coe.sqlite3-shm").exists()
    finally:
        if proc.poll() is None:
            stop_process(proc)


@pytest.mark.slow
def test_the_api_key_guards_the_gradio_api_too(app_server, monkeypatch):  # noqa: F811
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from app.ui import build_app, launch_kwargs

    monkeypatch.setenv("COE_API_KEY", "k3y")
    demo = build_app(app_server.coe, gate=AdminGate(TOKEN))
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, **launch_kwargs()
    )
    try:
        with pytest.raises(AppError, match="needs the API key"):
            Client(url, verbose=False).predict("Solve 2x + 3 = 7", api_name="/route")
        with pytest.raises(AppError, match="needs the API key"):
            Client(url, verbose=False, headers={"Authorization": "Bearer wrong"}).predict("hi", api_name="/route")
        keyed = Client(url, verbose=False, headers={"Authorization": "Bearer k3y"})
        assert keyed.predict("Solve 2x + 3 = 7", api_name="/route")["category"]
    finally:
        demo.close()
