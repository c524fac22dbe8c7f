"""What the engine needs from routing (the ``Routing`` protocol, nothing more) and what it tells a readiness
probe (``CoE.readiness``), on tiny experts."""

from __future__ import annotations

import pytest

from coe_core.engine import CoE
from coe_core.events import RouteDecision, TurnDone


class FixedRouting:
    """A router of our own that sends everything to one expert: the engine must work with any ``Routing``."""

    def __init__(self, expert: str):
        self.expert, self.loaded, self.decided = expert, False, 0

    def decide(self, messages: list[dict], overrides: dict | None = None) -> RouteDecision:
        self.decided += 1
        return RouteDecision(
            category="coding",
            expert=self.expert,
            reason="mapped",
            routed_text=messages[-1]["content"],
            explanation=f"coding -> {self.expert}: fixed",
        )

    def warm_up(self) -> None:
        self.loaded = True

    def runner_up(self, decision: RouteDecision) -> str | None:
        return None

    def score_table(self) -> dict:
        return {"scores": {}}

    def router_loaded(self) -> bool:
        return self.loaded


def test_any_routing_with_the_protocols_methods_routes_the_turns_and_says_when_it_is_ready(tiny_config):
    routing = FixedRouting("medium")
    coe = CoE(tiny_config(), routing=routing, store=None, gpu=False, progress=False)
    try:
        before = coe.readiness()
        assert before.router_state == "not loaded" and not before.ready  # a probe loads nothing
        assert coe.prepare() == {"small": None, "medium": None, "large": None, "plain": None}
        after = coe.readiness()
        assert after.ready and after.router_state == "loaded"
        assert after.available_experts == ["large", "medium", "plain", "small"] and after.unavailable == {}
        events = list(coe.chat("sort a list", temperature=0, max_new_tokens=4))
        assert routing.decided == 1 and events[0].expert == "medium"
        assert isinstance(events[-1], TurnDone) and events[-1].stats.expert == "medium"
        assert events[-1].stats.status == "ok"
    finally:
        coe.close()


@pytest.mark.parametrize("routing", ["none", object()])
def test_a_routing_that_is_not_one_is_refused_with_what_it_lacks(tiny_config, routing):
    with pytest.raises(TypeError, match="decide, warm_up, runner_up, score_table, router_loaded"):
        CoE(tiny_config(), routing=routing, store=None, gpu=False, progress=False)


def test_readiness_without_a_router_names_the_experts_that_cannot_serve(tiny_config):
    coe = CoE(tiny_config(), routing=None, store=None, gpu=False, progress=False)
    try:
        coe.tiers.slots["medium"].unavailable = "weights missing (test)"
        r = coe.readiness()
        assert r.ready and r.router_state == "none"  # no router: the default expert serves
        assert "medium" not in r.available_experts and r.unavailable == {"medium": "weights missing (test)"}
        for slot in coe.tiers.slots.values():
            slot.unavailable = "gone (test)"
        assert not coe.readiness().ready
    finally:
        coe.close()
