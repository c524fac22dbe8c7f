"""What every tab shares: the engine, its routing service, the admin gate, the category colours, the session's
admin state."""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from app.admin import AdminGate
from app.theme import category_colors
from coe_core.engine import CoE
from coe_core.routing.service import RoutingService


@dataclass
class AppContext:
    coe: CoE
    gate: AdminGate
    #: per browser session: has this session entered the admin token (gr.State(bool))
    admin_state: gr.State | None = None
    colors: dict[str, str] = field(default_factory=dict)
    #: the engine's routing service: the Router, Mapping and explorer tabs manage and show it (the engine itself
    #: needs only its ``Routing`` side)
    routing: RoutingService = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.coe.routing, RoutingService):
            raise ValueError(
                "the playground shows and manages the router: build the engine with routing='auto' "
                f"(a RoutingService), not {type(self.coe.routing).__name__}"
            )
        self.routing = self.coe.routing
        cfg = self.coe.config
        if not self.colors:
            self.colors = category_colors(cfg.categories, cfg.fallback_category)

    @property
    def categories(self) -> list[str]:
        return list(self.coe.config.categories)

    @property
    def all_categories(self) -> list[str]:
        return list(self.coe.config.all_categories)

    @property
    def experts(self) -> list[str]:
        return list(self.coe.config.experts)
