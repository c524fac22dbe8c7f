"""What every tab shares: the engine, the admin gate, the category colours, the session's admin state."""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from app.admin import AdminGate
from app.theme import category_colors
from coe_core.engine import CoE


@dataclass
class AppContext:
    coe: CoE
    gate: AdminGate
    #: per browser session: has this session entered the admin token (gr.State(bool))
    admin_state: gr.State | None = None
    colors: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
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

