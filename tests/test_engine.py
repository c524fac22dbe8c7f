"""CoE.chat on tiny experts: event sequence, exactly-once logging (ok, cancelled, error), bad input, truncation."""

from __future__ import annotations

import threading

import pytest

from coe_core.config import config_from_dict
from coe_core.engine import CoE
from coe_core.errors import InvalidRequest
from coe_core.events import Notice, RouteDecision, SwapEvent, TextChunk, TurnDone
from coe_core.experts.generation import _StopStringFilter
from tests.conftest import long_conversation, tiny_config_dict


@pytest.fixture
def coe(tiny_config):
    engine = CoE(tiny_config(), routing=None, store="auto", gpu=False, progress=False)
    yield engine
    engine.close()


def run(engine, prompt, **kwargs):
    return list(engine.chat(prompt, temperature=0, max_new_tokens=kwargs.pop("max_new_tokens", 8), **kwargs))


def test_event_sequence_and_one_logged_turn(coe):
    events = run(coe, "write a python function")
    assert isinstance(events[0], RouteDecision)
    assert isinstance(events[1], SwapEvent) and events[1].dst == "cpu"
    assert isinstance(events[-1], TurnDone)
    stats = events[-1].stats
    chunks = "".join(e.text for e in events if isinstance(e, TextChunk))
    assert stats.status == "ok" and stats.response == chunks and stats.new_tokens == 8
    assert stats.ttft_s is not None and stats.total_s >= stats.ttft_s
    assert [phase for phase, *_ in stats.timeline][:2] == ["route", "swap"]
    row = coe.store.get_interaction(stats.interaction_id)
    assert row["status"] == "ok" and row["expert"] == "small" and row["response"] == chunks
    assert row["swaps"][0]["dst"] == "cpu"
    assert coe.store.stats()["turns"] == 1
    second = run(coe, "and again")
    assert not [e for e in second if isinstance(e, SwapEvent)]  # resident now: no swap
    assert coe.store.stats()["turns"] == 2


def test_closed_stream_is_logged_once_as_cancelled(coe):
    stream = coe.chat("once upon a time", temperature=0, max_new_tokens=64)
    for event in stream:
        if isinstance(event, TextChunk):
            break
    stream.close()  # the client went away mid-answer
    coe.turn_logger.close()  # drain the background writer
    rows = coe.store.recent_interactions(10)
    assert len(rows) == 1 and rows[0]["status"] == "cancelled"
    assert len(rows[0]["response"]) > 0 and rows[0]["new_tokens"] < 64


def test_stop_event_cancels_generation(coe):
    cancel = threading.Event()
    events = []
    for event in coe.chat("once upon a time", temperature=0, max_new_tokens=200, cancel=cancel):
        events.append(event)
        if isinstance(event, TextChunk):
            cancel.set()  # the stop button
    stats = events[-1].stats
    assert stats.status == "cancelled" and stats.new_tokens < 200
    assert coe.store.get_interaction(stats.interaction_id)["status"] == "cancelled"


def test_expert_failure_is_logged_as_error_and_others_keep_serving(coe, monkeypatch):
    from transformers import LlamaForCausalLM

    def broken(*args, **kwargs):
        raise RuntimeError("the expert fell over")

    monkeypatch.setattr(LlamaForCausalLM, "forward", broken)  # the module itself breaks, in its decode thread
    events = run(coe, "hello", overrides={"expert": "medium"})
    stats = events[-1].stats
    assert stats.status == "error" and "fell over" in stats.error
    assert coe.store.get_interaction(stats.interaction_id)["status"] == "error"
    monkeypatch.undo()
    assert run(coe, "hello again")[-1].stats.status == "ok"
    assert coe.store.stats()["turns"] == 2


def test_unavailable_expert_is_replaced_with_a_notice(coe):
    coe.tiers.slots["medium"].unavailable = "weights missing (test)"
    events = run(coe, "hi", overrides={"expert": "medium"})
    notices = [e for e in events if isinstance(e, Notice)]
    assert notices and "medium is unavailable" in notices[0].message
    assert events[-1].stats.expert == "small" and events[-1].stats.status == "ok"


@pytest.mark.parametrize(
    "messages, match",
    [
        ("", "empty prompt"),
        ("   \n ", "empty prompt"),
        ([], "non-empty list"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ("x" * 40_000, "more than the limit"),
    ],
)
def test_bad_requests_get_a_clear_message_and_are_not_logged(coe, messages, match):
    with pytest.raises(InvalidRequest, match=match):
        run(coe, messages)
    assert coe.store.stats()["turns"] == 0


def test_unknown_expert_and_bad_parameters(coe):
    with pytest.raises(InvalidRequest, match="unknown expert 'nope'"):
        run(coe, "hi", overrides={"expert": "nope"})
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        run(coe, "hi", max_new_tokens=0)
    with pytest.raises(InvalidRequest, match="temperature"):
        list(coe.chat("hi", temperature=5))


def test_long_conversation_is_truncated_from_the_oldest_turns(tiny_sources, tmp_path):
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    raw["profiles"]["offline"]["experts"]["small"]["context_length"] = 96
    engine = CoE(config_from_dict(raw, env=False), routing=None, store=None, gpu=False, progress=False)
    events = list(engine.chat(long_conversation(12), temperature=0, max_new_tokens=8))
    notices = [e.message for e in events if isinstance(e, Notice)]
    stats = events[-1].stats
    assert stats.truncated and any("oldest turn" in n for n in notices)
    assert stats.prompt_tokens <= 96 - 8
    long_prompt = "fox " * 400  # the latest turn alone is too long: its end is kept
    events = list(engine.chat(long_prompt, temperature=0, max_new_tokens=8))
    assert events[-1].stats.truncated and events[-1].stats.status == "ok"


def test_plain_format_expert_and_stop_strings(coe):
    events = run(coe, "what is the capital of france", overrides={"expert": "plain"}, max_new_tokens=12)
    assert events[-1].stats.status == "ok" and events[-1].stats.expert == "plain"
    f = _StopStringFilter(("\nQuestion:",))
    out = f.feed("Paris is") + f.feed(" the capital.\nQues") + f.feed("tion: next") + f.flush()
    assert out == "Paris is the capital." and f.stopped


def test_concurrent_turns_are_all_logged(coe):
    results = []

    def worker(i):
        events = run(coe, f"question {i}", overrides={"expert": ["small", "medium"][i % 2]})
        results.append(events[-1].stats)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and all(s.status == "ok" for s in results)
    assert len({s.interaction_id for s in results}) == 6
    assert coe.store.stats()["turns"] == 6


def test_feedback_through_the_engine(coe):
    stats = run(coe, "write a story")[-1].stats
    coe.feedback(stats.interaction_id, "wrong_category", corrected_category="writing")
    assert coe.store.latest_feedback(stats.interaction_id)["corrected_category"] == "writing"
    with pytest.raises(Exception, match="no interaction"):
        coe.feedback(999_999, "like")


def test_reference_logprob_is_a_proper_log_likelihood(coe):
    total, n = coe.reference_logprob("small", [{"role": "user", "content": "hi"}], "the quick brown fox")
    assert n > 0 and total < 0


def test_incremental_decoding_reassembles_multibyte_text_and_newlines():
    from coe_core.experts.generation import _IncrementalDecoder
    from tests.conftest import make_tokenizer

    tokenizer = make_tokenizer()  # byte-level BPE: é, ü and emoji split across several tokens
    text = "Café crème 🙂\nZürich ☕ line two\n\nend"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = _IncrementalDecoder(tokenizer)
    pieces = [decoder.feed([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # half a character is never shown


def test_client_gone_right_after_the_route_is_still_logged_as_cancelled(coe):
    stream = coe.chat("hello there", temperature=0, max_new_tokens=8)
    assert isinstance(next(stream), RouteDecision)
    stream.close()
    coe.turn_logger.close()
    rows = coe.store.recent_interactions(5)
    assert len(rows) == 1 and rows[0]["status"] == "cancelled"


def test_a_stand_in_expert_uses_its_own_stop_strings(coe):
    coe.tiers.slots["small"].unavailable = "weights missing (test)"
    params = coe._params(8, 0, None, ["END"], "small")
    assert coe._restop(params, "small", "plain").stop == ("\nQuestion:", "END")


def test_unknown_category_override_without_a_router(coe):
    with pytest.raises(InvalidRequest, match="unknown category 'nonsense'"):
        run(coe, "hi", overrides={"category": "nonsense"})
