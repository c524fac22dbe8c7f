"""Mapping tab: the expert x category score table, the active-parameter budget, the Pareto frontier with the
current operating point and each single expert for comparison, and the resulting category -> expert mapping.

Moving the budget slider previews the frontier point it would pick; "Apply" changes the live mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from app import plots
from app.context import AppContext
from app.errors import user_message
from app.plots import PARAMS_UNIT, params_m

MAPPING_COLUMNS = ["category", "expert", "why", "share of traffic"]


def single_expert_points(
    scores: Mapping[str, Mapping[str, float]], params: Mapping[str, int], distribution: Mapping[str, float]
) -> list[dict[str, Any]]:
    """Expected score and cost if one expert served every category (the baselines a mapping must beat)."""
    points = []
    total = sum(p for c, p in distribution.items() if p > 0) or 1.0
    for expert, row in scores.items():
        if expert not in params:
            continue
        weighted = [(p, row[c]) for c, p in distribution.items() if p > 0 and c in row]
        if not weighted:
            continue
        covered = sum(p for p, _ in weighted)
        # categories the table does not score for this expert are left out and the rest re-weighted
        score = sum(p * s for p, s in weighted) / covered * total
        points.append({"expert": expert, "avg_active_params": float(params[expert]), "expected_score": score})
    return points


def point_for_budget(frontier: Sequence[Mapping[str, Any]], budget: float | None) -> Mapping[str, Any] | None:
    """The frontier point a budget picks: the best-scoring one that costs no more than the budget."""
    affordable = [p for p in frontier if budget is None or p["avg_active_params"] <= budget + 1e-6]
    return max(affordable, key=lambda p: (p["expected_score"], -p["avg_active_params"]), default=None)


def shown_path(path: str | Path | None, *, project: Path, data_dir: Path) -> str:
    """A file as a visitor may see it: relative to the data dir (``<data dir>/scores/offline.json``) or to the
    project (``assets/scores/offline.json``), never the machine's absolute path (elsewhere: its name only)."""
    if not path:
        return "none"
    path = Path(path)
    for root, label in ((data_dir, "<data dir>/"), (project, "")):
        if path.is_relative_to(root):
            return label + path.relative_to(root).as_posix()
    return f"…/{path.name}"


def mapping_rows(
    assignment: Mapping[str, str], reasons: Mapping[str, str], distribution: Mapping[str, float]
) -> list[list[Any]]:
    return [[c, e, reasons.get(c, ""), f"{distribution.get(c, 0.0):.1%}"] for c, e in assignment.items()]


class MappingTab:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.routing = ctx.routing

    def _params(self) -> dict[str, int]:
        table = self.routing.score_table()
        params = dict(table.get("params") or {})
        params.update(self.ctx.coe.expert_params() or {})
        return {e: int(n) for e, n in params.items() if e in self.ctx.coe.config.experts}

    def build(self) -> None:
        params = self._params() or {"": 1e9}
        # from 0: a budget below the cheapest mapping is allowed (the optimiser then says so and uses the cheapest)
        hi = int(max(params.values()) / PARAMS_UNIT) + 10
        current = self.routing.active_params_budget
        gr.Markdown(
            "Each prompt runs **one** expert, so a mapping's cost is the **average active parameters per "
            "prompt**. The optimiser maximises the traffic-weighted expected score under that budget."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                self.no_limit = gr.Checkbox(current is None, label="No budget limit")
                self.budget = gr.Slider(
                    0,
                    hi,
                    step=1,
                    value=(current / PARAMS_UNIT) if current else hi,
                    label="Budget: average active parameters per prompt (M params)",
                    elem_id="coe-budget",
                )
                self.preview_md = gr.Markdown()
                self.apply = gr.Button("Apply mapping", variant="primary")
                self.result_md = gr.Markdown()
            with gr.Column(scale=3, min_width=320):
                self.frontier_plot = gr.Plot(
                    label="Pareto frontier", elem_id="coe-frontier-plot", elem_classes=["coe-plot"], show_label=False
                )
        with gr.Row(equal_height=False):
            with gr.Column(min_width=300):
                self.mapping_table = gr.Dataframe(
                    headers=MAPPING_COLUMNS, label="Category → expert (live)", interactive=False, wrap=True
                )
            with gr.Column(min_width=300):
                self.scores = gr.Dataframe(label="Expert × category score table", interactive=False, wrap=True)
                self.scores_md = gr.Markdown()

    def wire(self, demo: gr.Blocks, tab: gr.Tab) -> None:
        private: dict[str, Any] = {"api_visibility": "private"}
        view = [self.frontier_plot, self.preview_md, self.mapping_table, self.scores, self.scores_md]
        tab.select(self.refresh, [self.budget, self.no_limit], view, **private)
        # moving the slider means "this budget": it unticks "No budget limit"
        self.budget.change(
            self.preview_budget,
            self.budget,
            [*view, self.no_limit],
            show_progress="hidden",
            trigger_mode="always_last",
            **private,
        )
        self.no_limit.input(
            self.refresh,
            [self.budget, self.no_limit],
            view,
            show_progress="hidden",
            trigger_mode="always_last",
            **private,
        )
        self.apply.click(
            self.apply_budget, [self.ctx.admin_state, self.budget, self.no_limit], self.result_md, **private
        ).then(self.refresh, [self.budget, self.no_limit], view, **private)

    def refresh(self, budget_m: float, no_limit: bool) -> tuple[Any, ...]:
        try:
            mapping = self.routing.current_mapping()
            frontier = self.routing.frontier()
            table = self.routing.score_table()
        except (ValueError, OSError, RuntimeError) as exc:
            gr.Warning(f"No mapping: {user_message(exc)}")
            return (plots.empty_figure(user_message(exc)),) + (f"⚠️ {user_message(exc)}",) + (gr.update(),) * 3
        budget = None if no_limit else float(budget_m) * PARAMS_UNIT
        params = self._params()
        singles = single_expert_points(table.get("scores") or {}, params, mapping.distribution)
        current = {"avg_active_params": mapping.avg_active_params, "expected_score": mapping.expected_score}
        preview = point_for_budget(frontier, budget)
        fig = plots.frontier_figure(frontier, current=current, preview=preview, singles=singles, budget=budget)
        live_budget = self.routing.active_params_budget
        lines = [
            f"**Now:** budget {'no limit' if live_budget is None else params_m(live_budget)}, "
            f"expected score **{mapping.expected_score:.3f}** at "
            f"**{params_m(mapping.avg_active_params)}** on average "
            f"(traffic: {mapping.distribution_source})."
        ]
        if preview is None:
            lines.append(f"⚠️ No mapping fits {params_m(budget)}: the cheapest experts would serve.")
        else:
            changed = {c: e for c, e in preview["assignment"].items() if mapping.assignment.get(c) != e}
            change = ", ".join(f"{c} → {e}" for c, e in changed.items()) or "no change"
            lines.append(
                f"**With this budget:** score **{preview['expected_score']:.3f}** at "
                f"**{params_m(preview['avg_active_params'])}** ({change})."
            )
        lines += [f"- {note}" for note in mapping.notes]
        if not mapping.feasible:
            lines.append("- ⚠️ the live budget is below the cheapest mapping")
        cats = self.ctx.all_categories
        score_rows = [
            [e, params.get(e) and params_m(params[e])] + [row.get(c) for c in cats]
            for e, row in (table.get("scores") or {}).items()
        ]
        method = table.get("method") or {}
        config = self.ctx.coe.config
        source = shown_path(table.get("path"), project=config.base_dir, data_dir=config.data_path)
        scores_md = f"Source: `{source}`" + (f" — {method.get('kind')}" if method.get("kind") else "")
        return (
            fig,
            "\n\n".join(lines),
            mapping_rows(mapping.assignment, mapping.reasons, mapping.distribution),
            gr.update(value=score_rows, headers=["expert", "params"] + cats),
            scores_md,
        )

    def preview_budget(self, budget_m: float) -> tuple[Any, ...]:
        return (*self.refresh(budget_m, False), False)

    def apply_budget(self, unlocked: bool, budget_m: float, no_limit: bool) -> str:
        self.ctx.gate.require(unlocked, "Changing the mapping")
        try:
            result = self.routing.set_active_params_budget(
                None if no_limit else int(float(budget_m) * PARAMS_UNIT), persist=True
            )
        except (ValueError, RuntimeError) as exc:
            raise gr.Error(f"Cannot apply that budget: {user_message(exc)}") from None
        budget = "no limit" if no_limit else params_m(float(budget_m) * PARAMS_UNIT)
        gr.Info(f"Mapping applied: budget {budget}.")
        return (
            f"✓ Applied budget **{budget}**: expected score {result.expected_score:.3f} at "
            f"{params_m(result.avg_active_params)} on average. The next prompt uses it."
        )
