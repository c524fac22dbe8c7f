"""Turning a classification into a RouteDecision: overrides, the fallback, the mapped expert and the
sentence that says why; and the runner-up expert worth prefetching."""

from __future__ import annotations

import time
from typing import Any

from coe_core.config import CoEConfig
from coe_core.errors import InvalidRequest
from coe_core.events import RouteDecision, RouteReason
from coe_core.routing.mapping import MappingResult
from coe_core.routing.router import Classification, Router


def check_overrides(config: CoEConfig, overrides: dict | None) -> dict[str, str] | None:
    """The user's forced category or expert, validated (an unknown one is a clear InvalidRequest)."""
    if not overrides:
        return None
    unknown_keys = set(overrides) - {"category", "expert"}
    if unknown_keys:
        raise InvalidRequest(f"unknown override {sorted(unknown_keys)}: use {{'category': c}} or {{'expert': e}}")
    cat, expert = overrides.get("category"), overrides.get("expert")
    if cat is not None and cat not in config.all_categories:
        raise InvalidRequest(f"unknown category {cat!r}; valid categories: {', '.join(config.all_categories)}")
    if expert is not None and expert not in config.experts:
        raise InvalidRequest(f"unknown expert {expert!r}; valid experts: {', '.join(config.experts)}")
    return {k: v for k, v in overrides.items() if v is not None}


def decision(
    config: CoEConfig,
    router: Router,
    cls: Classification,
    text: str,
    forced: dict[str, str] | None,
    mapping: MappingResult,
    start: float | None,
) -> RouteDecision:
    category = (forced or {}).get("category", cls.category)
    expert = mapping.assignment.get(category, config.active_profile.default_expert)
    top = f"{cls.top_category} ({cls.probabilities[cls.top_category]:.2f})"
    reason: RouteReason
    if forced and "expert" in forced:
        expert, reason = forced["expert"], "override-expert"
        why = f"{top}; expert {expert} chosen by the user"
    elif forced and "category" in forced:
        reason = "override-category"
        why = f"category {category} chosen by the user (router said {top}) -> {expert}"
    elif cls.fallback:
        reason = "fallback"
        why = (
            f"unsure: {top}, confidence {cls.confidence:.2f} < threshold {router.threshold:.2f} "
            f"({router.threshold_source}) -> {category} -> {expert} "
            f"({mapping.reasons.get(category, 'default expert')})"
        )
    elif mapping.reasons.get(category) == "mapping-override":
        reason = "mapping-override"
        why = f"{top} -> {expert}: set by mapping.overrides in spaces.yaml"
    else:
        reason = "mapped"
        why = f"{top} -> {expert}: {mapping.reasons.get(category, 'default expert')}"
    return RouteDecision(
        category=category,
        expert=expert,
        reason=reason,
        probabilities=cls.probabilities,
        confidence=cls.confidence,
        fallback=cls.fallback and not forced,
        latency_ms=round((time.perf_counter() - start) * 1000, 3) if start is not None else 0.0,
        threshold=router.threshold,
        override=forced,
        router_version=router.version_id,
        routed_text=text,
        explanation=why,
    )


def default_decision(
    config: CoEConfig, text: str, forced: dict[str, str] | None, why: str, start: float
) -> RouteDecision:
    """Without a router: the forced expert, else the profile's default expert, and why."""
    expert = (forced or {}).get("expert", config.active_profile.default_expert)
    return RouteDecision(
        category=(forced or {}).get("category", config.fallback_category),
        expert=expert,
        reason="default",
        override=forced,
        routed_text=text,
        latency_ms=round((time.perf_counter() - start) * 1000, 3),
        explanation=f"no router yet ({why}); served by the default expert {expert}",
    )


def runner_up(decision: RouteDecision, assignment: dict[str, Any], margin: float) -> str | None:
    """The expert of the second most likely category when it is within ``margin`` of the winner and
    differs from the chosen expert (the engine may prefetch it)."""
    ranked = sorted(decision.probabilities.items(), key=lambda kv: -kv[1])
    if len(ranked) < 2 or decision.reason == "override-expert":
        return None
    (c1, p1), (c2, p2) = ranked[:2]
    if p1 - p2 > margin:
        return None
    for cat in (c2, c1) if decision.category == c1 else (c1, c2):
        expert = assignment.get(cat)
        if expert and expert != decision.expert:
            return expert
    return None
