"""The closed loop of issue 4: logged turns + feedback -> coe stats/export -> retrain -> the route changes."""

from __future__ import annotations

import io
import json

from coe_core.events import RouteDecision, TurnStats
from coe_core.routing.service import RoutingService
from coe_core.routing.training import is_heldout
from coe_core.store.records import TurnRecord
from coe_core.store.store import Store
from coe_core.store.writer import TurnLogger
from tests.test_routing_service import _config

CITIES = ["Hanoi", "Mexico City", "Istanbul", "Penang", "Marrakesh", "Lima", "Osaka", "Tbilisi", "Naples"]


def log_turn(logger: TurnLogger, service: RoutingService, prompt: str) -> int:
    """One turn as the engine logs it: the routing decision, the answer and its stats."""
    decision: RouteDecision = service.decide([{"role": "user", "content": prompt}])
    stats = TurnStats(expert=decision.expert, response="(answer)", ttft_s=0.1, total_s=0.5, new_tokens=5)
    record = TurnRecord.from_turn(
        decision, [], stats, prompt=prompt, started_at=TurnRecord(expert="x").started_at, client="cli"
    )
    return logger.submit(record).result(timeout=30)


def test_corrected_feedback_retrains_the_router_and_is_recorded(tmp_path):
    config = _config(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'log.sqlite3'}")
    service = RoutingService(config, progress=lambda msg: None, store=store)  # versions record themselves there
    service.warm_up()
    logger = TurnLogger(store, tmp_path / "spool.jsonl")
    probe = "Find me the best street food stalls in Bangkok"
    probs = service.decide([{"role": "user", "content": probe}]).probabilities
    before = max(probs, key=probs.get)
    target = "cooking" if before != "cooking" else "travel"

    ids = [log_turn(logger, service, f"Find me the best street food stalls in {city}") for city in CITIES]
    corrected = 0
    for interaction_id in ids:  # each turn is its own conversation: keep those that land on the training side
        conversation = store.get_interaction(interaction_id)["conversation_id"]
        if not is_heldout(f"conv-{conversation}") and corrected < 5:
            store.add_feedback(interaction_id, "wrong_category", target, categories=config.all_categories)
            corrected += 1
    store.add_feedback(ids[0], "like", categories=config.all_categories)  # latest wins: a like of the routed one
    store.add_feedback(ids[0], "retracted", categories=config.all_categories)  # ...retracted: no label at all
    assert corrected == 5

    stats = store.stats()
    assert stats["turns"] == len(CITIES) and stats["feedback"]["wrong_category"] >= corrected - 1
    out = io.StringIO()
    assert store.export("jsonl", out) == len(CITIES)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {r["feedback_category"] for r in rows if r["feedback_kind"] == "wrong_category"} == {target}

    result = service.retrain_from_log()
    assert result["promoted"], result["why"]
    assert result["samples"]["by_source"].get("feedback-corrected", 0) >= corrected - 1
    probs = service.decide([{"role": "user", "content": probe}]).probabilities
    assert max(probs, key=probs.get) == target  # the router now routes this pattern as corrected
    versions = store.list_router_versions()
    assert versions[0]["id"] == result["candidate"] and versions[0]["active"]
    assert versions[0]["parent_id"] == result["parent"]
    logger.close()
    store.close()
