"""The interaction log: exactly-once logging, concurrency, feedback, stats, export, privacy, schema upgrades,
crash safety and the spool. Set COE_TEST_DATABASE_URLS (comma separated SQLAlchemy URLs of empty, dedicated
databases) to run the same tests on e.g. PostgreSQL; by default each test gets a SQLite file in tmp_path
(list ``sqlite-in-tmp_path`` among the URLs to run both)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from coe_core.events import RouteDecision, SwapEvent, TurnStats
from coe_core.store import SchemaVersionError, Store, StoreError, TurnLogger, TurnNotLoggedError, TurnRecord
from coe_core.store.migrations import SCHEMA_VERSION, V1_STATUS_CHECK, replace_status_check
from coe_core.store.models import STATUS_CHECK, Base
from coe_core.store.queries import labelled_prompts

CATEGORIES = ["coding", "math", "writing"]
_DEFAULT = "sqlite-in-tmp_path"


def _urls() -> list[str]:
    env = os.environ.get("COE_TEST_DATABASE_URLS", "")
    return [u.strip() for u in env.split(",") if u.strip()] or [_DEFAULT]


def _wipe(url: str) -> None:
    """Drop the store's tables from a shared test database so each test starts empty."""
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            table.drop(conn, checkfirst=True)
    engine.dispose()


@pytest.fixture(params=_urls())
def db_url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == _DEFAULT:
        # a folder that does not exist yet: the store creates it
        yield f"sqlite:///{tmp_path / 'data' / 'nested' / 'coe.sqlite3'}"
        return
    _wipe(request.param)
    yield request.param
    _wipe(request.param)


@pytest.fixture
def store(db_url: str):
    with Store(db_url) as s:
        yield s


def turn(prompt: str = "write a python function", **kw) -> TurnRecord:
    base = dict(
        expert="coder",
        prompt=prompt,
        routing_context=prompt,
        response="def f(): pass",
        category="coding",
        probabilities={"coding": 0.9, "math": 0.1},
        confidence=0.9,
        ttft_s=0.1,
        total_s=1.0,
        new_tokens=10,
        tokens_per_s=10.0,
        client="cli",
    )
    base.update(kw)
    return TurnRecord(**base)


def count_turns(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM interactions")).scalar_one()
    engine.dispose()
    return n


class FlakyStore(Store):
    """Commits the write, then reports a failure the first ``fail_after_commit`` times (a lost ack)."""

    fail_after_commit = 1

    def log_turn(self, record: TurnRecord) -> int:
        interaction_id = super().log_turn(record)
        if self.fail_after_commit > 0:
            self.fail_after_commit -= 1
            raise StoreError("connection lost after commit")
        return interaction_id


class DownStore(Store):
    """A database that refuses every write."""

    def log_turn(self, record: TurnRecord) -> int:
        raise StoreError("database is locked")


# -- logging ---------------------------------------------------------------------------------------------
def test_turn_logger_stores_each_turn_exactly_once_even_when_an_ack_is_lost(db_url: str, tmp_path: Path):
    store = FlakyStore(db_url)
    logger = TurnLogger(store, tmp_path / "spool.jsonl", backoff_s=0.01)
    futures = [logger.submit(turn(f"prompt {i}")) for i in range(3)]
    ids = [f.result(timeout=10) for f in futures]
    logger.close()
    assert len(set(ids)) == 3
    assert count_turns(db_url) == 3  # the retry after the lost ack did not store a second copy
    assert [store.get_interaction(i)["prompt"] for i in ids] == ["prompt 0", "prompt 1", "prompt 2"]
    assert not (tmp_path / "spool.jsonl").exists()
    store.close()


def test_turn_logger_close_drains_everything_submitted(store: Store, db_url: str, tmp_path: Path):
    logger = TurnLogger(store, tmp_path / "spool.jsonl")
    futures = [logger.submit(turn(f"p{i}")) for i in range(25)]
    logger.close()
    assert all(f.done() for f in futures)
    assert count_turns(db_url) == 25
    with pytest.raises(StoreError, match="closed"):
        logger.submit(turn())


def test_turn_logger_rejects_a_bad_record_in_the_caller(store: Store, tmp_path: Path):
    with TurnLogger(store, tmp_path / "spool.jsonl") as logger:
        with pytest.raises(StoreError, match="ok, cancelled"):
            logger.submit(turn(status="finished"))
        assert logger.submit(turn()).result(timeout=10) > 0


def test_turns_from_8_threads_are_all_logged_with_distinct_turn_indexes(store: Store, db_url: str):
    shared = store.start_conversation("api", session_id="s1")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(8):
                conv = shared if i % 2 == 0 else None
                store.log_turn(turn(f"thread {n} turn {i}", conversation_id=conv))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert count_turns(db_url) == 64
    in_shared = [r for r in store.recent_interactions(100) if r["conversation_id"] == shared]
    assert sorted(r["turn_index"] for r in in_shared) == list(range(32))


def test_log_turn_appends_to_a_conversation_and_titles_new_ones(store: Store):
    first = store.log_turn(turn("how do I sort a list in python?", session_id="abc", client="app"))
    row = store.get_interaction(first)
    second = store.log_turn(turn("and in reverse?", conversation_id=row["conversation_id"]))
    assert (row["turn_index"], store.get_interaction(second)["turn_index"]) == (0, 1)
    assert row["client"] == "app" and row["session_id"] == "abc"
    with pytest.raises(StoreError, match="no conversation 999"):
        store.log_turn(turn(conversation_id=999))
    with pytest.raises(StoreError, match="category must be text of at most 64"):
        store.log_turn(turn(category="c" * 65))


def test_record_from_engine_events_keeps_route_swaps_and_timings(store: Store):
    decision = RouteDecision(
        category="math",
        expert="mathy",
        reason="mapped",
        probabilities={"math": 0.8},
        confidence=0.8,
        latency_ms=3.5,
        threshold=0.35,
        router_version="r1",
        routed_text="what is 2+2",
    )
    swap = SwapEvent(expert="mathy", src="disk", dst="cpu", bytes=2_000_000_000, seconds=0.5)
    stats = TurnStats(expert="mathy", response="4", status="cancelled", ttft_s=0.2, total_s=0.4, new_tokens=1)
    rec = TurnRecord.from_turn(decision, [swap], stats, prompt="what is 2+2", started_at=datetime.now(UTC))
    row = store.get_interaction(store.log_turn(rec))
    assert row["status"] == "cancelled" and row["router_version"] == "r1"
    assert row["route_latency_ms"] == 3.5 and row["route_threshold"] == 0.35
    assert row["swaps"][0]["src"] == "disk" and row["swaps"][0]["gbps"] == 4.0


# -- feedback --------------------------------------------------------------------------------------------
def test_feedback_is_validated_with_messages_that_name_the_valid_choices(store: Store):
    tid = store.log_turn(turn())
    with pytest.raises(StoreError, match="no interaction 12345"):
        store.add_feedback(12345, "like", categories=CATEGORIES)
    with pytest.raises(StoreError, match="like, dislike, wrong_category, retracted"):
        store.add_feedback(tid, "love", categories=CATEGORIES)
    with pytest.raises(StoreError, match="coding, math, writing"):
        store.add_feedback(tid, "wrong_category", "cooking", categories=CATEGORIES)
    with pytest.raises(StoreError, match="only wrong_category"):
        store.add_feedback(tid, "like", "math", categories=CATEGORIES)
    assert store.latest_feedback(tid) is None


def test_latest_feedback_wins_and_a_retraction_clears_it(store: Store):
    tid = store.log_turn(turn())
    store.add_feedback(tid, "like", categories=CATEGORIES)
    store.add_feedback(tid, "wrong_category", "math", "it was algebra", categories=CATEGORIES)
    fb = store.latest_feedback(tid)
    assert (fb["kind"], fb["corrected_category"]) == ("wrong_category", "math")
    assert fb["comment"] == "it was algebra"
    assert store.stats()["feedback"] == {"like": 0, "dislike": 0, "wrong_category": 1, "corrected": 1}
    store.add_feedback(tid, "retracted", categories=CATEGORIES)
    assert store.latest_feedback(tid) is None
    assert store.get_interaction(tid)["feedback"] is None
    assert store.stats()["feedback"]["wrong_category"] == 0
    store.add_feedback(tid, "dislike", categories=CATEGORIES)
    assert store.latest_feedback(tid)["kind"] == "dislike"


# -- stats, export -------------------------------------------------------------------------------------------
def _swap(src: str, dst: str, seconds: float) -> dict:
    return SwapEvent(expert="x", src=src, dst=dst, bytes=10**9, seconds=seconds).to_dict()


def test_stats_have_the_documented_keys_and_numbers(store: Store):
    empty = store.stats()
    assert empty["turns"] == 0 and empty["ttft_p50_s"] is None and empty["fallback_rate"] == 0.0
    store.log_turn(turn(ttft_s=0.1, swaps=[_swap("disk", "cpu", 0.2)]))
    store.log_turn(turn(ttft_s=0.2, swaps=[_swap("disk", "cpu", 0.4), _swap("cpu", "gpu", 0.1)]))
    store.log_turn(turn(ttft_s=0.3, category="math", expert="mathy"))
    tid = store.log_turn(turn(ttft_s=0.4, category="general", fallback=True, status="error", error="boom"))
    store.add_feedback(tid, "dislike", categories=CATEGORIES)
    s = store.stats()
    assert {
        "turns",
        "by_category",
        "by_expert",
        "fallback_rate",
        "feedback",
        "ttft_p50_s",
        "ttft_p95_s",
        "swaps",
    } <= set(s)
    assert s["turns"] == 4
    assert s["by_category"] == {"coding": 2, "math": 1, "general": 1}
    assert s["by_expert"] == {"coder": 3, "mathy": 1}
    assert s["by_status"] == {"ok": 3, "error": 1}
    assert s["fallback_rate"] == pytest.approx(0.25)
    assert s["ttft_p50_s"] == pytest.approx(0.25) and s["ttft_p95_s"] == pytest.approx(0.385)
    assert s["swaps"]["disk->cpu"] == {"count": 2, "mean_s": pytest.approx(0.3)}
    assert s["swaps"]["cpu->gpu"]["count"] == 1
    assert sorted(s["swap_seconds"]["disk->cpu"]) == [0.2, 0.4]
    assert s["feedback"]["dislike"] == 1 and s["feedback_rates"]["dislike"] == pytest.approx(0.25)
    today = datetime.now(UTC).date().isoformat()
    assert {"day": today, "category": "coding", "turns": 2} in s["turns_by_day_category"]
    assert store.category_counts() == {"coding": 2, "math": 1, "general": 1}
    json.dumps(s)  # the CLI and the app serialise it as is


def test_export_has_one_row_per_turn_with_its_latest_feedback(store: Store):
    old = store.log_turn(turn("old prompt", started_at=datetime.now(UTC) - timedelta(days=10)))
    a = store.log_turn(turn('a, with "quotes"\nand a newline'))
    b = store.log_turn(turn("b"))
    store.add_feedback(a, "like", categories=CATEGORIES)
    store.add_feedback(a, "dislike", comment="too long", categories=CATEGORIES)
    store.add_feedback(b, "wrong_category", "math", categories=CATEGORIES)

    out = io.StringIO()
    assert store.export("jsonl", out) == 3
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["id"] for r in rows] == [old, a, b]
    assert (rows[1]["feedback_kind"], rows[1]["feedback_comment"]) == ("dislike", "too long")
    assert (rows[2]["feedback_kind"], rows[2]["feedback_category"]) == ("wrong_category", "math")
    assert rows[0]["feedback_kind"] is None and rows[1]["probabilities"] == {"coding": 0.9, "math": 0.1}

    out = io.StringIO()
    assert store.export("csv", out, since=datetime.now(UTC) - timedelta(days=1)) == 2
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [int(r["id"]) for r in rows] == [a, b]
    assert rows[0]["prompt"] == 'a, with "quotes"\nand a newline' and rows[0]["feedback_kind"] == "dislike"
    assert json.loads(rows[1]["probabilities"])["coding"] == 0.9
    with pytest.raises(StoreError, match="jsonl, csv"):
        store.export("xml", io.StringIO())


# -- privacy -------------------------------------------------------------------------------------------------
def test_log_prompts_false_keeps_metadata_but_no_text(db_url: str, tmp_path: Path):
    secret = "my secret passphrase is hunter2"
    with Store(db_url, log_prompts=False) as store:
        tid = store.log_turn(turn(secret, response=f"echo {secret}"))
        row = store.get_interaction(tid)
        assert (row["prompt"], row["routing_context"], row["response"]) == (None, None, None)
        assert row["category"] == "coding" and row["ttft_s"] == 0.1
        out = io.StringIO()
        store.export("jsonl", out)
        assert "hunter2" not in out.getvalue()
        # a turn that cannot be written goes to the spool without its text either
        down = DownStore(db_url, log_prompts=False)
        with TurnLogger(down, tmp_path / "spool.jsonl", attempts=1) as logger, pytest.raises(TurnNotLoggedError):
            logger.submit(turn(secret)).result(timeout=10)
        assert "hunter2" not in (tmp_path / "spool.jsonl").read_text()
        down.close()
    if db_url.startswith("sqlite:///"):
        files = Path(db_url.removeprefix("sqlite:///")).parent.glob("coe.sqlite3*")
        assert all(b"hunter2" not in f.read_bytes() for f in files)


# -- training data -------------------------------------------------------------------------------------------
def test_labelled_prompts_follow_the_feedback_rules(db_url: str):
    with Store(db_url) as store:
        liked = store.log_turn(turn("liked coding prompt", routing_context="ctx: liked coding prompt"))
        corrected = store.log_turn(turn("really a math prompt"))
        disliked = store.log_turn(turn("disliked"))
        wrong_no_fix = store.log_turn(turn("wrong, no correction"))
        retracted = store.log_turn(turn("retracted like"))
        fallback_liked = store.log_turn(turn("liked fallback", category="general", fallback=True))
        store.log_turn(turn("no feedback"))
        for tid, kind, cat in [
            (liked, "like", None),
            (corrected, "wrong_category", "math"),
            (disliked, "dislike", None),
            (wrong_no_fix, "wrong_category", None),
            (retracted, "like", None),
            (retracted, "retracted", None),
            (fallback_liked, "like", None),
        ]:
            store.add_feedback(tid, kind, cat, categories=CATEGORIES)
        conv = store.get_interaction(corrected)["conversation_id"]
        labels = labelled_prompts(store, CATEGORIES)
    assert {(p.prompt, p.category, p.source) for p in labels} == {
        ("ctx: liked coding prompt", "coding", "feedback-like"),
        ("really a math prompt", "math", "feedback-corrected"),
    }
    assert next(p for p in labels if p.category == "math").group == f"conv-{conv}"
    with Store(db_url, log_prompts=False) as private:
        hidden = private.log_turn(turn("not kept"))
        private.add_feedback(hidden, "like", categories=CATEGORIES)
        assert len(labelled_prompts(private, CATEGORIES)) == 2


# -- router versions -------------------------------------------------------------------------------------
def test_router_versions_keep_one_active(store: Store):
    store.record_router_version("r1", "/a/r1", {"accuracy": 0.8}, {"seed": 100}, None, active=True)
    store.record_router_version("r2", "/a/r2", {"accuracy": 0.85}, {"seed": 100, "feedback-like": 5}, "r1", active=True)
    versions = {v["id"]: v for v in store.list_router_versions()}
    assert (versions["r1"]["active"], versions["r2"]["active"]) == (False, True)
    assert versions["r2"]["parent_id"] == "r1" and versions["r2"]["sample_counts"]["feedback-like"] == 5
    store.set_active_router_version("r1")
    assert [v["id"] for v in store.list_router_versions() if v["active"]] == ["r1"]
    with pytest.raises(StoreError, match="no router version 'r9'.*r1"):
        store.set_active_router_version("r9")
    with pytest.raises(StoreError, match="already recorded"):
        store.record_router_version("r1", "/a/r1b", {}, {}, None, False)


# -- schema versions -----------------------------------------------------------------------------------------
#: how releases before schema v5 logged a remote expert's connection: as a swap from tier "remote", its phases
#: cumulative seconds
_LEGACY_REMOTE_SWAP = {
    "expert": "edge",
    "src": "remote",
    "dst": "connect",
    "bytes": 0,
    "seconds": 0.3,
    "phases": {"connect": 0.05, "headers": 0.2, "first_byte": 0.3},
    "started_at": 0.01,
}


def _make_v1_database(url: str) -> None:
    """The layout of schema version 1 (before route_latency_ms / route_threshold, queue_s, remote_connection)
    with one logged local turn and one remote turn logged the old way."""
    with Store(url) as store:
        odd = {**_LEGACY_REMOTE_SWAP, "expert": "odd", "seconds": None, "phases": {"connect": None, "headers": None}}
        store.log_turn(turn("a remote answer with null phases", expert="odd", swaps=[odd]))
        store.log_turn(turn("from the old release"))
        store.log_turn(turn("a remote answer", expert="edge", swaps=[_LEGACY_REMOTE_SWAP]))
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE interactions DROP COLUMN remote_connection"))
        conn.execute(text("ALTER TABLE interactions DROP COLUMN route_latency_ms"))
        conn.execute(text("ALTER TABLE interactions DROP COLUMN route_threshold"))
        conn.execute(text("ALTER TABLE interactions DROP COLUMN queue_s"))
        conn.execute(text("ALTER TABLE feedback DROP COLUMN review"))
        conn.execute(text("ALTER TABLE feedback DROP COLUMN author"))
        replace_status_check(conn, STATUS_CHECK, V1_STATUS_CHECK)
        conn.execute(text("UPDATE schema_info SET version = 1"))
    engine.dispose()


def test_an_older_database_is_upgraded_and_keeps_its_turns(db_url: str):
    _make_v1_database(db_url)
    with Store(db_url) as store:
        assert store.schema_version == SCHEMA_VERSION == 5
        remote, old = store.recent_interactions(2)
        assert old["prompt"] == "from the old release" and old["route_latency_ms"] is None and old["queue_s"] is None
        assert old["remote_connection"] is None
        # v5: the remote connection left the swaps, with its phases as consecutive stretches
        assert remote["swaps"] == [] and remote["remote_connection"]["expert"] == "edge"
        assert remote["remote_connection"]["phases"] == pytest.approx(
            {"connect": 0.05, "headers": 0.15, "first_byte": 0.1}
        )
        odd = store.recent_interactions(3)[2]  # null phases read as 0 s: the upgrade does not stop on them
        assert odd["swaps"] == [] and odd["remote_connection"]["first_byte_s"] == 0.0
        assert store.stats()["swaps"] == {} and store.stats()["remote_first_byte_seconds"]["edge"] == [0.3]
        new = store.log_turn(turn("after the upgrade", route_latency_ms=2.0))
        assert store.get_interaction(new)["route_latency_ms"] == 2.0
        running = store.log_turn(turn("still running", status="running"))  # v3 widened the status check
        assert store.mark_interrupted() == 1 and store.get_interaction(running)["status"] == "interrupted"
    engine = create_engine(db_url)
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:  # the upgraded layout is the one a fresh database gets
        columns = {c["name"] for c in insp.get_columns(table.name)}
        assert columns == {c.name for c in table.columns}, table.name
    engine.dispose()


def test_a_newer_database_is_refused_and_left_untouched(db_url: str):
    with Store(db_url) as store:
        store.log_turn(turn())
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_info SET version = 99"))
    with pytest.raises(SchemaVersionError, match="schema version 99.*upgrade coe-playground"):
        Store(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_info")).scalar_one() == 99
    engine.dispose()
    assert count_turns(db_url) == 1


def test_bad_urls_get_a_message_that_says_what_to_set():
    with pytest.raises(StoreError, match="COE_DATABASE_URL"):
        Store("not a url")
    with pytest.raises(StoreError, match="driver"):
        Store("nosuchdialect://user@host/db")


# -- crash safety -------------------------------------------------------------------------------------------
_WRITER = """
import sys
from coe_core.store import Store, TurnRecord
store = Store(sys.argv[1])
i = 0
while True:
    tid = store.log_turn(TurnRecord(expert="e", prompt="p" * 2000 + str(i), category="coding", client="cli"))
    print(tid, flush=True)
    i += 1
"""


def test_a_database_left_by_a_killed_writer_opens_with_every_committed_turn(db_url: str):
    Store(db_url).close()  # create the schema first, so the child only writes turns
    child = subprocess.Popen([sys.executable, "-c", _WRITER, db_url], stdout=subprocess.PIPE, text=True)
    committed: list[int] = []
    try:
        assert child.stdout is not None
        while len(committed) < 40:
            line = child.stdout.readline()
            assert line, "the writer process died before it was killed"
            committed.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    with Store(db_url) as store:
        for tid in committed:
            assert store.get_interaction(tid)["expert"] == "e"
        assert store.log_turn(turn()) > committed[-1]


# -- spool -------------------------------------------------------------------------------------------------
def test_a_turn_that_cannot_be_written_is_spooled_and_replayed(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    spool = tmp_path / "data" / "unlogged_turns.jsonl"
    down = DownStore(db_url)
    with (
        caplog.at_level(logging.WARNING, logger="coe_core.store.writer"),
        TurnLogger(down, spool, attempts=3, backoff_s=0.01) as logger,
    ):
        future = logger.submit(turn("keep me", session_id="sess"))
        with pytest.raises(TurnNotLoggedError, match="unlogged_turns.jsonl"):
            future.result(timeout=10)
    down.close()
    assert "database is locked" in caplog.text and "attempt 3 of 3" in caplog.text
    assert len(spool.read_text().splitlines()) == 1
    with spool.open("a") as f:
        f.write("{not json\n")  # a torn line, e.g. from a process killed while spooling

    with Store(db_url) as store:
        with TurnLogger(store, spool) as logger:  # replays on start, before new turns
            logger.submit(turn("new turn")).result(timeout=10)
        rows = store.recent_interactions(10)
        assert [r["prompt"] for r in rows] == ["new turn", "keep me"]
        assert rows[1]["session_id"] == "sess"
        assert not spool.exists()
        assert "{not json" in spool.with_name("unlogged_turns.jsonl.rejected").read_text()
        # a spool written twice (e.g. replayed by two starts) still stores the turn once
        spool.write_text(json.dumps(turn("twice", uid="fixed-uid").to_json_dict()) + "\n")
        replayer = TurnLogger(store, spool, replay_on_start=False)
        assert replayer.replay_spool() == 1
        spool.write_text(json.dumps(turn("twice", uid="fixed-uid").to_json_dict()) + "\n")
        assert replayer.replay_spool() == 1
        replayer.close()
        assert [r["prompt"] for r in store.recent_interactions(10)].count("twice") == 1


def test_a_turn_logged_at_its_start_is_completed_once_and_leftovers_become_interrupted(store: Store):
    start = turn("streaming", status="running", response=None, ttft_s=None)
    first = store.log_turn(start)
    assert store.get_interaction(first)["status"] == "running"
    end = turn("streaming", uid=start.uid, response="done", status="ok")
    assert store.log_turn(end) == first and store.log_turn(end) == first  # completed once, never twice
    done = store.get_interaction(first)
    assert done["status"] == "ok" and done["response"] == "done"
    assert store.log_turn(start) == first and store.get_interaction(first)["status"] == "ok"  # a late replay
    left = store.log_turn(turn("killed mid-answer", status="running"))
    assert store.stats()["running"] == 1
    assert store.mark_interrupted() == 1
    assert store.get_interaction(left)["status"] == "interrupted"
    stats = store.stats()
    assert stats["interrupted"] == 1 and stats["by_status"]["interrupted"] == 1 and stats["turns"] == 2


def test_feedback_is_bound_to_its_session_and_anonymous_labels_wait_for_review(store: Store):
    cats = ["coding", "math", "roleplay"]
    mine = store.log_turn(turn("write a python function", session_id="alice"))
    with pytest.raises(StoreError, match="no interaction"):
        store.add_feedback(mine, "wrong_category", "roleplay", categories=cats, owner="mallory")
    with pytest.raises(StoreError, match="no interaction"):
        store.add_feedback(2**63, "like", categories=cats)
    fb = store.add_feedback(mine, "wrong_category", "math", categories=cats, owner="alice", review="pending")
    assert labelled_prompts(store, cats) == []  # a suggestion until an admin accepts it
    assert store.pending_count() == 1 and store.pending_feedback()[0]["id"] == fb
    assert store.stats()["feedback_pending_review"] == 1
    assert store.review_feedback([fb], accept=True) == 1
    assert [p.category for p in labelled_prompts(store, cats)] == ["math"] and store.pending_count() == 0
