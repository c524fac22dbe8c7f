"""Hostile but fair visitors: CPU for free, other people's prompts, poisoned labels, crashes (issue 11).

Engine-level checks run on tiny random-weight experts; the HTTP checks on a served CoE of them.
"""

from __future__ import annotations

import time

import pytest

from coe_core.config import config_from_dict
from coe_core.engine import CoE
from coe_core.errors import PromptTooLong
from coe_core.experts.prompt_format import format_prompt
from tests.conftest import long_conversation, make_tokenizer, tiny_config_dict


def tiny_engine(tiny_sources, tmp_path, *, store=None, **limits) -> CoE:
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    raw["limits"] = limits
    return CoE(config_from_dict(raw, env=False), routing=None, store=store, gpu=False, progress=False)


def test_truncation_renders_a_logarithmic_number_of_times(monkeypatch):
    """10,000 short messages used to be re-rendered once per dropped turn (542 s of one core)."""
    from coe_core.config import ExpertConfig
    from coe_core.experts import prompt_format

    calls = []
    real = prompt_format.render
    monkeypatch.setattr(prompt_format, "render", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = make_tokenizer()
    messages = []
    for i in range(2000):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
    messages.append({"role": "user", "content": "the final question"})
    start = time.perf_counter()
    prompt = format_prompt(tok, messages, ExpertConfig(source="dir:/x"), context_length=120, reserve_tokens=8)
    assert prompt.truncated and len(prompt.input_ids) <= 112 and "oldest turn" in prompt.notice
    assert len(calls) <= 16  # 1 full render + ~log2(2000) candidates
    assert time.perf_counter() - start < 30  # generous on a shared box; the old way took minutes
    # the kept history is the longest that fits: one more turn would not
    kept = tok.decode(prompt.input_ids)
    assert "the final question" in kept


def test_too_many_messages_is_refused_before_any_model_work(tiny_sources, tmp_path):
    coe = tiny_engine(tiny_sources, tmp_path, max_messages=50)
    messages = [{"role": "user", "content": "hi"}] * 10_001
    start = time.perf_counter()
    with pytest.raises(PromptTooLong, match="limits.max_messages"):
        next(coe.chat(messages))
    assert time.perf_counter() - start < 1.0
    assert coe.tiers.snapshot().experts["small"].state in ("disk", "absent", "not materialised")
    coe.close()


def test_prompt_tokens_are_capped_whatever_the_experts_context(tiny_sources, tmp_path):
    coe = tiny_engine(tiny_sources, tmp_path, max_prompt_tokens=40)
    stats = list(coe.chat(long_conversation(20), temperature=0, max_new_tokens=4))[-1].stats
    assert stats.status == "ok" and stats.truncated and stats.prompt_tokens <= 40
    coe.close()


def test_lone_surrogates_and_nul_are_made_safe_text(tiny_sources, tmp_path):
    coe = tiny_engine(tiny_sources, tmp_path)
    stats = list(coe.chat("bad \ud800 text \x00 here", temperature=0, max_new_tokens=2, stop=["\udfff", "x\x00"]))[
        -1
    ].stats
    assert stats.status == "ok"
    coe.close()


def test_chat_text_is_escaped_html_with_markdown_kept():
    from app.chat_messages import engine_messages, escape_html, unescape_html

    hostile = (
        '<img src="https://tracker.example/p.png"> <form action=x><input></form> ![t](https://t.example/x.png) '
        "**bold** & `a < b` and\n```python\nif a < b:\n    print('<b>')\n```\n<script>alert(1)</script>"
    )
    shown = escape_html(hostile)
    outside_code = shown.split("`a < b`")[0] + shown.split("```")[-1]
    assert "<" not in outside_code and "![" not in shown  # no tag and no Markdown image outside code
    assert "**bold**" in shown and "`a < b`" in shown and "print('<b>')" in shown  # Markdown and code intact
    assert unescape_html(shown) == hostile
    history = [
        {"role": "user", "content": escape_html("is 1 < 2 & 3 > 2?")},
        {"role": "assistant", "content": escape_html("yes: 1 < 2")},
    ]
    assert engine_messages(history, "ok")[:2] == [
        {"role": "user", "content": "is 1 < 2 & 3 > 2?"},
        {"role": "assistant", "content": "yes: 1 < 2"},
    ]


def test_an_export_link_serves_its_file_once_and_deletes_it(tiny_sources, tmp_path):
    import httpx

    from coe_core.api import build_server
    from coe_core.api.downloads import DOWNLOADS
    from tests.http_server import ServerThread

    coe = tiny_engine(tiny_sources, tmp_path)
    export = tmp_path / "exports" / "coe-log.jsonl"
    export.parent.mkdir()
    export.write_text('{"turn": 1}\n')
    with ServerThread(build_server(coe, api_key="")) as url:
        link = DOWNLOADS.offer(export)
        first = httpx.get(url + link)
        assert first.status_code == 200 and first.text == '{"turn": 1}\n'
        deadline = time.monotonic() + 10  # deleted once sent (a background task after the response)
        while export.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not export.exists()
        again = httpx.get(url + link)
        assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
        assert httpx.get(url + "/coe-download/guessed-token").status_code == 404
    coe.close()


def test_a_garbage_database_file_is_one_clear_error(tmp_path):
    from coe_core.errors import StoreError
    from coe_core.store import Store

    db = tmp_path / "coe.sqlite3"
    db.write_bytes(b"this is not a database, just garbage " * 200)
    with pytest.raises(StoreError, match=r"not a usable database .*move that file away") as info:
        Store(f"sqlite:///{db}")
    assert str(db) in str(info.value)


def test_the_queue_is_one_bound_for_every_door(tiny_sources, tmp_path):
    """Every door's turns wait in coe.scheduler; beyond serve.max_queue waiting turns one more is refused
    (QueueFull, before anything is logged) with a Retry-After estimate."""
    from coe_core.errors import QueueFull

    coe = tiny_engine(tiny_sources, tmp_path)
    sched = coe.scheduler
    tickets = [sched.admit("small") for _ in range(sched.max_running + sched.max_queue)]
    assert sum(t.state == "running" for t in tickets) == sched.max_running
    with pytest.raises(QueueFull, match="serve.max_queue") as full:
        sched.admit("small")
    assert full.value.retry_after_s >= 1
    with pytest.raises(QueueFull):
        list(coe.chat("hello", {"expert": "small"}))
    sched.leave(tickets[0])
    assert sched.admit("small").state == "waiting"  # room again: queued behind the running turns
    coe.close()


def test_feedback_is_rate_limited_per_session(tiny_sources, tmp_path):
    from coe_core.errors import RateLimited

    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    raw["limits"] = {"feedback_per_minute": 3}
    coe = CoE(config_from_dict(raw, env=False), routing=None, gpu=False, progress=False)
    stats = list(coe.chat("hello", temperature=0, max_new_tokens=2, client="app", session_id="alice"))[-1].stats
    for _ in range(3):
        coe.feedback(stats.interaction_id, "like", owner="alice", trusted=False)
    with pytest.raises(RateLimited, match="feedback_per_minute"):
        coe.feedback(stats.interaction_id, "like", owner="alice", trusted=False)
    coe.feedback(stats.interaction_id, "like")  # the CLI (no owner) is not limited
    assert coe.store.latest_feedback(stats.interaction_id)["kind"] == "like"
    coe.close()


def test_a_sha256_mismatch_says_in_one_log_line_which_file_and_what_is_done(tiny_config, caplog):
    import logging

    from coe_core.experts.weights import WEIGHTS_FILE
    from coe_core.tiers.manager import TierManager

    config = tiny_config()
    tiers = TierManager(config, gpu=False, progress=False)
    tiers.prepare(["small"])
    weights = tiers.disk_folder("small") / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, same header, wrong bytes
    weights.write_bytes(bytes(data))
    fresh = TierManager(config, gpu=False, progress=False)  # a new process: verifies once by sha256
    with caplog.at_level(logging.WARNING, logger="coe_core.tiers.manager"), fresh.acquire("small"):
        pass
    lines = [r.getMessage() for r in caplog.records if "re-materialising" in r.getMessage()]
    assert len(lines) == 1 and str(weights) in lines[0] and "sha256" in lines[0] and "dir:" in lines[0]
    tiers.close()
    fresh.close()


def test_a_cancel_during_a_long_prefill_stops_it_between_chunks(tiny_sources, tmp_path, monkeypatch):
    import threading

    from coe_core.experts import generation

    monkeypatch.setattr(generation, "PREFILL_CHUNK", 16)
    coe = tiny_engine(tiny_sources, tmp_path)
    steps = []
    cancel = threading.Event()
    with coe.tiers.acquire("small") as lease:
        real_forward = lease.model.forward

        def forward(*args, **kwargs):  # the client goes away during the second prefill chunk
            steps.append(kwargs.get("input_ids", args[0] if args else None).shape[1])
            if len(steps) == 2:
                cancel.set()
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(lease.model, "forward", forward)
        history = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
        stats = list(coe.chat(history, temperature=0, max_new_tokens=4, cancel=cancel))[-1].stats
    assert stats.status == "cancelled" and stats.new_tokens == 0 and stats.prompt_tokens > 64
    assert len(steps) == 2 and steps[0] == 16  # chunked, and nothing ran after the cancel
    coe.close()
