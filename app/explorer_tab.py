"""Routing explorer tab: route prompts without generating, and see where they land among the seed prompts."""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr
import numpy as np
from sklearn.decomposition import PCA

from app import plots
from app.context import AppContext
from app.errors import user_message

MAX_PROMPTS = 200
COLUMNS = ["#", "prompt", "category", "confidence", "fallback", "expert", "why"]


class SeedMap:
    """PCA of the seed prompts' embeddings, fitted once (lazily) and reused for every new prompt."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._fitted: tuple[PCA, np.ndarray, list[str], list[str]] | None = None

    def get(self) -> tuple[PCA, np.ndarray, list[str], list[str]]:
        with self._lock:
            if self._fitted is None:
                seeds = self.ctx.routing.seed_examples()
                texts = [p for p, _ in seeds]
                vectors = np.asarray(self.ctx.routing.embed(texts), dtype=np.float32)
                pca = PCA(n_components=2, random_state=0).fit(vectors)
                self._fitted = (pca, pca.transform(vectors), [c for _, c in seeds], texts)
            return self._fitted


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


class ExplorerTab:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.seed_map = SeedMap(ctx)

    def build(self) -> None:
        gr.Markdown(
            "Route prompts **without generating**: one prompt, or a pasted list (one per line). "
            "Each lands on the map of the router's seed prompts."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                self.prompts = gr.Textbox(
                    lines=8,
                    max_lines=20,
                    label="Prompts (one per line)",
                    placeholder="Write a haiku about autumn\nSolve 3x + 5 = 20\nExtract the dates from this email: ...",
                    elem_id="coe-explorer-prompts",
                )
                self.route_btn = gr.Button("Route", variant="primary")
                self.summary = gr.Markdown()
            with gr.Column(scale=3, min_width=320):
                self.map_plot = gr.Plot(
                    plots.empty_figure("the map appears when you route prompts", plots.HEIGHT_LARGE),
                    label="Routing map",
                    elem_classes=["coe-plot"],
                    show_label=False,
                )
        self.table = gr.Dataframe(headers=COLUMNS, label="Routing decisions", wrap=True, interactive=False)

    def wire(self, demo: gr.Blocks) -> None:
        self.route_btn.click(
            self.route_prompts,
            self.prompts,
            [self.table, self.map_plot, self.summary],
            api_visibility="private",
            concurrency_limit=2,
            concurrency_id="explorer",
        )

    def route_prompts(self, text: str, progress: gr.Progress = gr.Progress()) -> tuple[Any, Any, str]:  # noqa: B008 (gradio injects it)
        prompts = parse_prompts(text)
        if not prompts:
            gr.Warning("Type at least one prompt (one per line).")
            return gr.update(), gr.update(), ""
        note = ""
        if len(prompts) > MAX_PROMPTS:
            note = f" (only the first {MAX_PROMPTS} of {len(prompts)} lines were routed)"
            prompts = prompts[:MAX_PROMPTS]
        progress(0.1, desc="routing")
        try:
            decisions = self.ctx.routing.route_many(prompts)
        except (ValueError, KeyError, RuntimeError) as exc:
            gr.Warning(f"Routing failed: {user_message(exc)}")
            return gr.update(), gr.update(), f"⚠️ {user_message(exc)}"
        rows = [
            [i + 1, p, d.category, round(d.confidence, 3), "yes" if d.fallback else "", d.expert, d.explanation]
            for i, (p, d) in enumerate(zip(prompts, decisions, strict=True))
        ]
        progress(0.5, desc="placing prompts on the map (the first time embeds the seed set)")
        try:
            pca, seed_xy, seed_cats, seed_texts = self.seed_map.get()
            new_xy = pca.transform(np.asarray(self.ctx.routing.embed(prompts), dtype=np.float32))
            fig = plots.routing_map_figure(
                seed_xy,
                seed_cats,
                self.ctx.colors,
                new_xy=new_xy,
                new_categories=[d.category for d in decisions],
                new_labels=prompts,
                seed_labels=seed_texts,
            )
        except (ValueError, OSError, RuntimeError) as exc:
            fig = plots.empty_figure(f"no map: {user_message(exc)}", plots.HEIGHT_LARGE)
        fallbacks = sum(d.fallback for d in decisions)
        ms = decisions[0].latency_ms if decisions else 0.0
        summary = (
            f"Routed **{len(decisions)}** prompt(s){note}: {fallbacks} to the fallback category, "
            f"{ms:.1f} ms per prompt."
        )
        return gr.update(value=rows, headers=COLUMNS), fig, summary
