"""Analytics tab: what the interaction log says: turns over time by category, expert usage, fallback and
feedback rates, time to first token and swap times by tier pair (aggregates: everyone); recent turns (a
visitor sees their own session's, an unlocked admin everyone's); export (admin, a one-time link)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import gradio as gr

from app import plots
from app.context import AppContext
from app.errors import user_message
from coe_core.api.downloads import DOWNLOADS

RECENT_COLUMNS = [
    "#",
    "started (UTC)",
    "client",
    "category",
    "conf.",
    "expert",
    "reason",
    "status",
    "first token (s)",
    "tokens/s",
    "feedback",
    "prompt",
]


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def summary_markdown(stats: dict) -> str:
    fb = stats.get("feedback") or {}
    return "\n".join(
        [
            "| turns | interrupted | fallback rate | 👍 | 👎 | wrong category (corrected) | waiting review | "
            "first token p50 / p95 | routing p50 / p95 |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {stats.get('turns', 0)} | {stats.get('interrupted', 0)} | {stats.get('fallback_rate', 0):.1%} | "
            f"{fb.get('like', 0)} | "
            f"{fb.get('dislike', 0)} | {fb.get('wrong_category', 0)} ({fb.get('corrected', 0)}) | "
            f"{stats.get('feedback_pending_review', 0)} | "
            f"{_fmt(stats.get('ttft_p50_s'), '.2f', ' s')} / {_fmt(stats.get('ttft_p95_s'), '.2f', ' s')} | "
            f"{_fmt(stats.get('route_latency_p50_ms'), '.0f', ' ms')} / "
            f"{_fmt(stats.get('route_latency_p95_ms'), '.0f', ' ms')} |",
        ]
    )


def recent_rows(interactions: list[dict]) -> list[list[Any]]:
    rows = []
    for r in interactions:
        fb = r.get("feedback") or {}
        kind = fb.get("kind") or ""
        if fb.get("corrected_category"):
            kind += f" → {fb['corrected_category']}"
        prompt = " ".join((r.get("prompt") or "").split())
        rows.append(
            [
                r["id"],
                (r.get("started_at") or "")[:19].replace("T", " "),
                r.get("client"),
                r.get("category"),
                None if r.get("confidence") is None else round(r["confidence"], 2),
                r.get("expert"),
                r.get("reason"),
                r.get("status"),
                None if r.get("ttft_s") is None else round(r["ttft_s"], 2),
                None if r.get("tokens_per_s") is None else round(r["tokens_per_s"], 1),
                kind,
                prompt[:120],
            ]
        )
    return rows


class AnalyticsTab:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def build(self) -> None:
        with gr.Row():
            self.refresh_btn = gr.Button("Refresh", size="sm", scale=0, min_width=100)
            self.summary = gr.Markdown("Open this tab to load the analytics.", elem_classes=["coe-stats"])
        with gr.Row(equal_height=False):
            self.over_time = gr.Plot(label="Turns over time", elem_classes=["coe-plot"], show_label=False)
        with gr.Row(equal_height=False):
            self.usage = gr.Plot(label="Expert usage", elem_classes=["coe-plot"], show_label=False)
            self.rates = gr.Plot(label="Fallback and feedback", elem_classes=["coe-plot"], show_label=False)
        with gr.Row(equal_height=False):
            self.ttft = gr.Plot(label="Time to first token", elem_classes=["coe-plot"], show_label=False)
            self.swaps = gr.Plot(label="Swap times", elem_classes=["coe-plot"], show_label=False)
        with gr.Row(equal_height=False):
            self.serving = gr.Plot(
                label="Swaps per 100 turns and queue wait", elem_classes=["coe-plot"], show_label=False
            )
        self.recent = gr.Dataframe(
            headers=RECENT_COLUMNS, label="Recent turns (newest first)", interactive=False, wrap=True
        )
        self.recent_md = gr.Markdown()
        with gr.Accordion("Export the log", open=False):
            with gr.Row(equal_height=True):
                self.fmt = gr.Radio(["jsonl", "csv"], value="jsonl", label="Format", scale=1)
                self.export_btn = gr.Button("Export", scale=1)
            self.export_file = gr.File(label="Download", interactive=False, visible=False)
            self.export_link = gr.Markdown()

    def wire(self, demo: gr.Blocks, tab: gr.Tab) -> None:
        private: dict[str, Any] = {"api_visibility": "private"}
        view = [
            self.summary,
            self.over_time,
            self.usage,
            self.rates,
            self.ttft,
            self.swaps,
            self.serving,
            self.recent,
            self.recent_md,
        ]
        tab.select(self.refresh, self.ctx.admin_state, view, **private)
        self.refresh_btn.click(self.refresh, self.ctx.admin_state, view, **private)
        self.export_btn.click(
            self.export, [self.ctx.admin_state, self.fmt], [self.export_file, self.export_link], **private
        )

    def refresh(self, unlocked: bool = False, request: gr.Request | None = None) -> tuple[Any, ...]:
        """Aggregates for everyone; recent turns of this session only, unless an admin unlocked the app (the
        check is here, in the handler: a private event can still be called by its fn_index)."""
        store = self.ctx.coe.store
        if store is None:
            msg = "This app runs without an interaction store: nothing is logged."
            return (msg,) + (plots.empty_figure("no store"),) * 6 + ([], "")
        everyone = self.ctx.gate.sees_private(unlocked)
        session = getattr(request, "session_hash", None) or "-"  # no session: nobody's turns
        try:
            stats = store.stats()
            recent = store.recent_interactions(50, session_id=None if everyone else session)
        except (ValueError, RuntimeError, OSError) as exc:
            gr.Warning(f"Cannot read the log: {user_message(exc)}")
            return (f"⚠️ {user_message(exc)}",) + (gr.update(),) * 8
        whose = (
            "every session's turns (admin)"
            if everyone
            else "only this browser session's turns: other people's prompts need the admin token"
        )
        colors = self.ctx.colors
        return (
            summary_markdown(stats),
            plots.turns_over_time_figure(stats.get("turns_by_day_category") or [], colors),
            plots.expert_usage_figure(stats.get("by_expert") or {}),
            plots.rates_figure(stats.get("fallback_rate") or 0.0, stats.get("feedback_rates") or {}),
            plots.ttft_figure(stats.get("ttft_values") or []),
            plots.swap_times_figure(stats.get("swap_seconds") or {}, stats.get("remote_first_byte_seconds")),
            plots.serving_figure(stats.get("serving_by_hour") or []),
            recent_rows(recent),
            f"Recent turns: {whose}.",
        )

    def export(self, unlocked: bool, fmt: str) -> tuple[Any, str]:
        """The whole log, written under the data dir and offered once to this (admin) session by an
        unguessable link; the file is deleted when it has been downloaded (or after 10 minutes)."""
        self.ctx.gate.require_private(unlocked, "Exporting the log")
        store = self.ctx.coe.store
        if store is None:
            raise gr.Error("This app runs without an interaction store: there is nothing to export.")
        if fmt not in ("jsonl", "csv"):
            raise gr.Error("Pick jsonl or csv.")
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        folder = self.ctx.coe.config.data_path / "exports"
        path = folder / f"coe-log-{stamp}-{secrets.token_hex(4)}.{fmt}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8", newline="") as out:
                count = store.export(fmt, out)
        except (ValueError, RuntimeError, OSError) as exc:
            raise gr.Error(f"Export failed: {user_message(exc)}") from None
        gr.Info(f"Exported {count} turns.")
        if not DOWNLOADS.served:  # launched without the API server (--share): Gradio serves the file itself
            return gr.update(value=str(path), visible=True), ""
        link = DOWNLOADS.offer(path)
        return gr.update(value=None, visible=False), (
            f"[Download {path.name}]({link}) ({count} turns; the link works once, for 10 minutes)"
        )
