"""One error root: routing, tiers and the engine raise ``coe_core.errors`` types, and the app maps them in one
place (the API's map is tested in test_api.py)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from app.chat_tab import ChatSession, ChatTab
from app.errors import app_error, user_message
from coe_core.engine import CoE
from coe_core.errors import (
    Busy,
    CoEError,
    ConfigError,
    ExpertUnavailable,
    InvalidRequest,
    QueueFull,
    StoreError,
    TierBusy,
    Unavailable,
)
from coe_core.events import RouteDecision, TextChunk, TurnDone, TurnStats
from coe_core.routing import decisions
from coe_core.routing.service import RouterUnavailableError, RoutingService
from coe_core.routing.text import routed_text
from coe_core.store.errors import InteractionNotFound, InvalidStoreRequest


@pytest.fixture
def coe(tiny_config):
    engine = CoE(tiny_config(), routing=None, store=None, gpu=False, progress=False)
    yield engine
    engine.close()


# -- routing and tiers raise the engine's types ------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"expert": "nope"}, "unknown expert 'nope'"),
        ({"category": "cooking"}, "unknown category 'cooking'"),
        ({"model": "small"}, "unknown override"),
    ],
)
def test_a_bad_override_is_an_invalid_request(tiny_config, overrides, says):
    with pytest.raises(InvalidRequest, match=says):
        decisions.check_overrides(tiny_config(), overrides)


def test_routing_refuses_bad_input_and_settings_as_invalid_requests(tiny_config):
    with pytest.raises(InvalidRequest, match="empty prompt"):
        routed_text([{"role": "user", "content": "   "}], 2, 2000)
    with pytest.raises(InvalidRequest, match="threshold must be a number between 0 and 1"):
        RoutingService(tiny_config(), progress=lambda msg: None).set_threshold(1.5)
    assert issubclass(RouterUnavailableError, ConfigError)  # "no router and none can be trained: ..."


def test_tiers_say_unknown_expert_and_busy_with_the_engine_types(coe):
    with pytest.raises(InvalidRequest, match="unknown expert 'nope'; experts: small"), coe.tiers.acquire("nope"):
        pass
    with coe.tiers.acquire("small"), pytest.raises(TierBusy, match="small is generating") as busy:
        coe.tiers.evict("small")
    assert isinstance(busy.value, Busy) and isinstance(busy.value, Unavailable) and busy.value.retry_after_s >= 1


def test_the_engine_raises_coe_errors_for_requests_and_missing_parts(coe):
    with pytest.raises(InvalidRequest, match="unknown expert 'nope'"):
        coe.route("hello", {"expert": "nope"})
    with pytest.raises(StoreError, match="without a store"):
        coe.feedback(1, "like")
    held = [coe.scheduler.admit("small") for _ in range(coe.config.serve.max_running + coe.config.serve.max_queue)]
    try:
        with pytest.raises(QueueFull, match="serve.max_queue") as full:
            list(coe.chat("hello", max_new_tokens=2))
        assert isinstance(full.value, Busy) and full.value.retry_after_s >= 1
    finally:
        for ticket in held:
            coe.scheduler.leave(ticket)


# -- the app's one map -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc, title, says",
    [
        (
            InvalidRequest("empty prompt: type a question or a task"),
            "Invalid request",
            "empty prompt: type a question or a task",
        ),
        (
            TierBusy("the cpu tier is held by experts that are generating", 4),
            "Busy",
            "the cpu tier is held by experts that are generating; try again in about 4 s",
        ),
        (
            QueueFull("busy: 64 turns are waiting already; try again in about 9 s", 9),
            "Busy",
            "busy: 64 turns are waiting already; try again in about 9 s",
        ),
        (
            ExpertUnavailable("gemma3-270m is unavailable: its weights are missing"),
            "Unavailable",
            "gemma3-270m is unavailable: its weights are missing",
        ),
        (StoreError("database is locked"), "Interaction log", "the interaction log: database is locked"),
        (InteractionNotFound("no turn #9 in this session"), "Invalid request", "no turn #9 in this session"),
        (InvalidStoreRequest("unknown feedback kind 'meh'"), "Invalid request", "unknown feedback kind 'meh'"),
        (
            ConfigError("router.embedder: no such package"),
            "Configuration",
            "the configuration: router.embedder: no such package",
        ),
    ],
)
def test_the_app_says_each_kind_of_error_in_one_sentence(exc, title, says):
    assert isinstance(exc, CoEError)
    assert user_message(exc) == says
    error = app_error(exc)
    assert isinstance(error, gr.Error) and error.title == title and error.message == says


def chat_tab(chat) -> ChatTab:
    """The chat tab over a scripted engine; its output components are named by strings (no Blocks needed)."""
    limits = SimpleNamespace(max_new_tokens=16, max_new_tokens_cap=64)
    engine = SimpleNamespace(config=SimpleNamespace(limits=limits), chat=chat, tiers=SimpleNamespace(exec_tier="cpu"))
    tab = ChatTab(SimpleNamespace(coe=engine, colors={}))
    for name in ("chatbot", "decision_md", "prob_plot", "timeline_plot", "turn_md", "correct_turn", "session"):
        setattr(tab, name, name)
    return tab


def test_the_chat_says_a_refused_turn_and_keeps_the_conversation_as_it_was():
    def full_queue(messages, overrides=None, **kwargs):
        raise QueueFull("busy: 8 turns are waiting already (serve.max_queue 8)", 5)
        yield

    tab = chat_tab(full_queue)
    before = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.warns(UserWarning, match="busy: 8 turns are waiting already"):
        (update,) = tab.respond("and now?", list(before), ChatSession(), "auto", "auto", 8, 0.0)
    assert update["chatbot"] == before  # the refused prompt is not left hanging in the chat
    assert update["turn_md"] == "⚠️ busy: 8 turns are waiting already (serve.max_queue 8); try again in about 5 s"


def test_the_chat_says_why_a_turn_failed_with_the_same_map():
    failure = ExpertUnavailable("small could not be loaded: out of memory")

    def failing(messages, overrides=None, **kwargs):
        yield RouteDecision(category="general", expert="small", reason="default", explanation="general -> small")
        yield TextChunk("Half")
        yield TurnDone(
            TurnStats(expert="small", response="Half", status="error", error="lost", error_type="ExpertUnavailable"),
            error=failure,
        )

    tab = chat_tab(failing)
    with pytest.warns(UserWarning, match="could not be logged"):  # no store in this scripted engine
        *_, last = tab.respond("hello", [], ChatSession(), "auto", "auto", 8, 0.0)
    answer = last["chatbot"][-1]["content"]
    assert answer.startswith("Half") and "small failed: small could not be loaded: out of memory" in answer
    assert "small" in last["turn_md"]
