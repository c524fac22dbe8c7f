"""The one transcript collector every front end gathers a turn's events with (``coe_core.events.Transcript``)."""

from __future__ import annotations

import pytest

from coe_core.errors import ExpertUnavailable, InvalidRequest
from coe_core.events import (
    Notice,
    Queued,
    RemoteConnect,
    RouteDecision,
    SwapEvent,
    TextChunk,
    Transcript,
    TurnDone,
    TurnStats,
)

DECISION = RouteDecision(category="coding", expert="edge", reason="mapped", probabilities={"coding": 0.9})


def scripted_turn() -> list:
    """A remote expert that was down, a stand-in that waited in the queue, was swapped in and answered."""
    return [
        DECISION,
        Queued(position=2, ahead_by_expert={"small": 1}, reason="behind", expert="small"),
        Queued(position=1, ahead_by_expert={"small": 1}, reason="swap", expert="small"),
        Notice("edge is down; small serves this turn instead.", kind="warning", expert="small"),
        SwapEvent("small", "disk", "cpu", 10**9, 0.5, started_at=0.2),
        Notice("the prompt was truncated"),
        TextChunk("Hello"),
        TextChunk(", world"),
        TurnDone(TurnStats(expert="small", response="Hello, world", new_tokens=3, interaction_id=7)),
    ]


def test_a_scripted_turn_ends_up_in_the_transcript_fields():
    events = scripted_turn()
    turn = Transcript()
    handed_on = list(turn.follow(iter(events)))
    assert handed_on == events  # every event is passed on, unchanged and in order
    assert turn.decision is DECISION
    assert [q.position for q in turn.queued] == [2, 1]
    assert [(s.expert, s.src, s.dst) for s in turn.swaps] == [("small", "disk", "cpu")]
    assert turn.connection is None
    assert [n.message for n in turn.notices] == [
        "edge is down; small serves this turn instead.",
        "the prompt was truncated",
    ]
    assert turn.text == "Hello, world" and turn.pieces == ["Hello", ", world"]
    assert turn.done and not turn.failed and turn.error is None
    assert turn.stats.interaction_id == 7
    assert turn.served_by == "small"  # not the routed edge


def test_who_serves_is_known_before_the_turn_ends():
    turn = Transcript()
    assert turn.served_by is None
    turn.add(DECISION)
    assert turn.served_by == "edge"  # the routed expert, until a notice names a stand-in
    turn.add(Notice("edge is unavailable; small serves this turn instead.", expert="small"))
    assert turn.served_by == "small" and not turn.done


def test_a_remote_connection_is_kept_apart_from_the_swaps():
    turn = Transcript.collect(
        [
            DECISION,
            RemoteConnect("edge", connect_s=0.01, headers_s=0.05, first_byte_s=0.2, base_url="http://gpu-box/v1"),
            TextChunk("hi"),
            TurnDone(TurnStats(expert="edge", response="hi")),
        ]
    )
    assert turn.swaps == [] and turn.connection.expert == "edge"
    assert turn.connection.phases == pytest.approx({"connect": 0.01, "headers": 0.04, "first_byte": 0.15})
    assert turn.connection.to_dict()["phases"]["first_byte"] == pytest.approx(0.15)


def test_a_failed_turn_keeps_its_exception_for_the_front_end_to_map():
    failure = ExpertUnavailable("small could not be loaded: out of memory")
    turn = Transcript.collect(
        [
            DECISION,
            TurnDone(
                TurnStats(
                    expert="small", response="", status="error", error=str(failure), error_type="ExpertUnavailable"
                ),
                error=failure,
            ),
        ]
    )
    assert turn.failed and turn.error is failure and turn.text == ""


def test_an_error_raised_before_the_turn_starts_propagates_as_it_is():
    def refused():
        raise InvalidRequest("empty prompt: type a question or a task")
        yield  # a generator, like CoE.chat

    turn = Transcript()
    with pytest.raises(InvalidRequest, match="empty prompt"):
        list(turn.follow(refused()))
    assert turn.decision is None and not turn.done
