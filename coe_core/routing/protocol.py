"""``Routing``: what the engine needs from routing, as a typed seam. ``RoutingService`` is the one the engine
builds (``CoE(routing="auto")``); a test double or another router may stand in by having these methods.

The app and the CLI use more of ``RoutingService`` (versions, threshold, mapping, the explorer); the engine
needs no more than this, so this is all it may call.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from coe_core.events import RouteDecision


@runtime_checkable
class Routing(Protocol):
    def decide(self, messages: list[dict], overrides: dict | None = None) -> RouteDecision:
        """Step 1 and step 2 for a conversation: its category and expert, with the why. ``overrides`` may
        force ``category`` or ``expert``; an unknown name raises ``ValueError`` (a bad request)."""
        ...

    def warm_up(self) -> None:
        """Load (or train) the active router and whatever it reads, so the first prompt does not wait."""
        ...

    def runner_up(self, decision: RouteDecision) -> str | None:
        """An expert worth prefetching for this decision (the second choice, when it is close), or None."""
        ...

    def score_table(self) -> dict[str, Any]:
        """The expert score table in use: ``{"scores": {expert: {category: score}}, "params": {...}, ...}``."""
        ...

    def router_loaded(self) -> bool:
        """Whether a router is in memory already, without loading one (readiness probes ask this)."""
        ...
