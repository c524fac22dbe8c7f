"""Plotly figure builders: pure functions from plain data (dicts, lists, arrays) to ``go.Figure``.

No engine, no Gradio: each builder can be unit-tested with literal data. Every figure has a fixed
height, carries units on its axes, and takes its colours from ``app.theme``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.theme import (
    FONT,
    HEIGHT,
    HEIGHT_LARGE,
    HEIGHT_SMALL,
    PHASE_COLORS,
    TIER_COLORS,
    TIER_ORDER,
    UNKNOWN_COLOR,
    color_of,
    tier_pair_color,
)
from coe_core.tiers.snapshot import TierSnapshot

GB = 1e9


def gb(n: float) -> str:
    """Bytes as a short human string with its unit."""
    if n >= GB:
        return f"{n / GB:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{int(n)} B"


#: The one unit the UI shows active parameters in: millions, written "M params" (1.7B is "1,700M params"), on
#: the Mapping tab's slider, the frontier's x axis and in every sentence. Bytes are shown with ``gb``.
PARAMS_UNIT = 1e6


def params_m(n: float) -> str:
    """Active parameters in the UI's unit: ``135M params``."""
    return f"{n / PARAMS_UNIT:,.0f}M params"


def _layout(fig: go.Figure, height: int, **kwargs: Any) -> go.Figure:
    kwargs.setdefault("margin", {"l": 10, "r": 20, "t": 40, "b": 10})
    # a vertical mode bar stays clear of the titles (a horizontal one covers their right end)
    fig.update_layout(
        height=height,
        autosize=True,
        template="plotly_white",
        modebar={"orientation": "v"},
        font={"family": FONT, "size": 12},
        **kwargs,
    )
    return fig


def empty_figure(message: str, height: int = HEIGHT_SMALL) -> go.Figure:
    """A figure that says why there is nothing to show (instead of empty axes)."""
    fig = go.Figure()
    fig.add_annotation(
        text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 14, "color": "#6B7280"}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height)


# -- chat tab --------------------------------------------------------------------------------------------
def probabilities_figure(
    probabilities: Mapping[str, float],
    colors: Mapping[str, str],
    *,
    threshold: float | None = None,
    chosen: str | None = None,
    fallback: bool = False,
) -> go.Figure:
    """Router probability per category (bars, config order), the fallback threshold as a line."""
    if not probabilities:
        return empty_figure("no router probabilities yet: send a prompt", HEIGHT_SMALL)
    cats = list(probabilities)
    values = [float(probabilities[c]) for c in cats]
    fig = go.Figure(
        go.Bar(
            x=values,
            y=cats,
            orientation="h",
            marker={
                "color": [color_of(c, colors) for c in cats],
                "line": {"color": ["#111827" if c == chosen else "rgba(0,0,0,0)" for c in cats], "width": 2},
            },
            text=[f"{v:.2f}" for v in values],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    if threshold is not None:
        fig.add_vline(
            x=threshold,
            line={"color": "#DC2626", "dash": "dash", "width": 2},
            annotation_text=f"fallback threshold {threshold:.2f}",
            annotation_position="top right",
            annotation_font={"color": "#DC2626", "size": 11},
        )
    title = "Category probabilities"
    if fallback:
        title += " — below threshold: fallback"
    fig.update_xaxes(range=[0, 1.08], title_text="probability (0–1)", tickformat=".1f")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, HEIGHT_SMALL + 20, title={"text": title, "font": {"size": 13}}, showlegend=False)


def residency_figure(snapshot: TierSnapshot) -> go.Figure:
    """Bytes of every expert in each tier (gpu, cpu, disk): one stacked bar per tier, the tier budget as a line.

    A tier that does not exist on this machine gets a thin row marked absent. Each row is scaled to what it
    holds, so small experts stay readable; a budget far beyond that is written at the row's end instead.
    """
    tiers, experts, exec_tier = snapshot.tiers, snapshot.experts, snapshot.exec_tier
    names = [t for t in TIER_ORDER if t in tiers]
    if not names:
        return empty_figure("no tier information")
    titles, heights = [], []
    for t in names:
        info = tiers[t]
        role = "executes" if t == exec_tier else ("staging" if t == "cpu" else "capacity")
        if not info.exists:
            why = (info.budget_source or "not detected").removeprefix("absent: ")
            titles.append(f"<b>{t}</b> — absent on this machine ({why})")
            heights.append(0.12)
        else:
            titles.append(f"<b>{t}</b> ({role}): {gb(info.used_bytes)} used of {gb(info.budget_bytes)}")
            heights.append(1.0)
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=titles, vertical_spacing=0.2, row_heights=heights)
    for row, t in enumerate(names, start=1):
        info = tiers[t]
        if not info.exists:
            fig.update_xaxes(visible=False, row=row, col=1)
            fig.update_yaxes(visible=False, row=row, col=1)
            continue
        total = 0.0
        for eid, e in experts.items():
            nbytes = float(e.bytes_by_tier.get(t, 0))
            if nbytes <= 0:
                continue
            total += nbytes
            busy = e.pinned > 0 and t == exec_tier
            loading = e.state == "loading"
            fig.add_trace(
                go.Bar(
                    x=[nbytes / GB],
                    y=[t],
                    orientation="h",
                    name=eid,
                    marker={
                        "color": TIER_COLORS.get(t, UNKNOWN_COLOR),
                        "line": {"color": "#111827" if busy else "white", "width": 3 if busy else 2},
                        "pattern": {"shape": "/" if loading else ""},
                    },
                    text=[f"{eid}{' ▶' if busy else ''} {gb(nbytes)}"],
                    textposition="inside",
                    insidetextanchor="middle",
                    textfont={"color": "white"},
                    hovertemplate=f"{eid} in {t}: {gb(nbytes)} (state {e.state})<extra></extra>",
                ),
                row=row,
                col=1,
            )
        budget = float(info.budget_bytes)
        span = max(total * 1.3, 0.25 * GB)
        if 0 < budget <= span * 1.5:
            span = max(span, budget * 1.05)
            fig.add_vline(x=budget / GB, line={"color": "#DC2626", "dash": "dash", "width": 2}, row=row, col=1)
        if total == 0:
            yref = "y domain" if row == 1 else f"y{row} domain"
            xref = "x domain" if row == 1 else f"x{row} domain"
            fig.add_annotation(
                text="empty",
                x=0.02,
                y=0.5,
                xref=xref,
                yref=yref,
                xanchor="left",
                showarrow=False,
                font={"color": "#6B7280"},
            )
        fig.update_xaxes(range=[0, span / GB], ticksuffix=" GB", row=row, col=1)
        fig.update_yaxes(showticklabels=False, row=row, col=1)
    fig.update_annotations(font_size=12)
    return _layout(
        fig,
        HEIGHT,
        barmode="stack",
        showlegend=False,
        bargap=0.15,
        title={"text": "Tier residency (▶ = generating)", "font": {"size": 13}},
        margin={"l": 10, "r": 20, "t": 64, "b": 10},
    )


def timeline_figure(
    timeline: Sequence[Sequence[Any]],
    swaps: Sequence[Mapping[str, Any]] = (),
    *,
    connection: Mapping[str, Any] | None = None,
    tokens_per_s: float | None = None,
    new_tokens: int | None = None,
) -> go.Figure:
    """This turn as a Gantt chart: route, swap (and each swap phase) or a remote expert's connection (and its
    phases), prefill, generate; seconds on x. ``swaps``: SwapEvent.to_dict(); ``connection``:
    RemoteConnect.to_dict()."""
    if not timeline:
        return empty_figure("the timeline of a turn appears here when it has run")
    rows: list[tuple[str, float, float, str]] = []  # (label, start, end, colour)
    for phase, start, end in timeline:
        rows.append((str(phase), float(start), float(end), PHASE_COLORS.get(str(phase), UNKNOWN_COLOR)))
        if phase == "connect" and connection:
            t = float(connection.get("started_at") or start)
            for name, secs in (connection.get("phases") or {}).items():
                rows.append((f"  {connection.get('expert')}: {name}", t, t + float(secs), PHASE_COLORS["connect"]))
                t += float(secs)
        if phase != "swap":
            continue
        for swap in swaps:
            t = float(swap.get("started_at") or start)
            color = tier_pair_color(f"{swap.get('src')}->{swap.get('dst')}")
            for name, secs in (swap.get("phases") or {}).items():
                secs = float(secs)
                label = f"  {swap.get('expert')} {swap.get('src')}→{swap.get('dst')}: {name}"
                rows.append((label, t, t + secs, color))
                t += secs
    labels = [r[0] for r in rows]
    durations = [max(r[2] - r[1], 0.0) for r in rows]
    fig = go.Figure(
        go.Bar(
            y=labels,
            x=durations,
            base=[r[1] for r in rows],
            orientation="h",
            marker={"color": [r[3] for r in rows]},
            text=[f"{d:.2f} s" for d in durations],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{y}: %{base:.2f} s → +%{x:.3f} s<extra></extra>",
        )
    )
    end = max(r[2] for r in rows)
    title = f"This turn: {end:.2f} s"
    if new_tokens:
        title += f", {new_tokens} tokens"
    if tokens_per_s:
        title += f" at {tokens_per_s:.1f} tokens/s"
    fig.update_xaxes(title_text="seconds since the prompt (s)", range=[0, end * 1.18 + 0.05])
    fig.update_yaxes(autorange="reversed", automargin=True)
    height = max(HEIGHT_SMALL - 40, 60 + 26 * len(rows))
    return _layout(fig, height, title={"text": title, "font": {"size": 13}}, showlegend=False)


# -- routing explorer ------------------------------------------------------------------------------------
def routing_map_figure(
    seed_xy: np.ndarray,
    seed_categories: Sequence[str],
    colors: Mapping[str, str],
    *,
    new_xy: np.ndarray | None = None,
    new_categories: Sequence[str] = (),
    new_labels: Sequence[str] = (),
    seed_labels: Sequence[str] = (),
) -> go.Figure:
    """The seed prompts in 2-D (PCA of their embeddings) by category, the new prompts as stars on top."""
    if len(seed_xy) == 0:
        return empty_figure("no seed prompts to map", HEIGHT_LARGE)
    fig = go.Figure()
    seed_categories = list(seed_categories)
    cats = [c for c in colors if c in set(seed_categories)] + sorted(set(seed_categories) - set(colors))
    for cat in cats:
        idx = [i for i, c in enumerate(seed_categories) if c == cat]
        fig.add_trace(
            go.Scattergl(
                x=seed_xy[idx, 0],
                y=seed_xy[idx, 1],
                mode="markers",
                name=cat,
                legendgroup=cat,
                marker={"size": 6, "color": color_of(cat, colors), "opacity": 0.45},
                text=[_short(seed_labels[i]) for i in idx] if len(seed_labels) else None,
                hovertemplate=f"<b>{cat}</b> (seed)<br>%{{text}}<extra></extra>"
                if len(seed_labels)
                else f"{cat} (seed)<extra></extra>",
            )
        )
    if new_xy is not None and len(new_xy):
        fig.add_trace(
            go.Scatter(
                x=new_xy[:, 0],
                y=new_xy[:, 1],
                mode="markers+text",
                name="your prompts",
                marker={
                    "size": 16,
                    "symbol": "star",
                    "color": [color_of(c, colors) for c in new_categories],
                    "line": {"color": "#111827", "width": 1.5},
                },
                text=[str(i + 1) for i in range(len(new_xy))],
                textposition="top center",
                customdata=[[_short(t), c] for t, c in zip(new_labels, new_categories, strict=False)],
                hovertemplate="<b>#%{text}: %{customdata[1]}</b><br>%{customdata[0]}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="PC 1 (unitless)", zeroline=False)
    fig.update_yaxes(title_text="PC 2 (unitless)", zeroline=False)
    return _layout(
        fig,
        HEIGHT_LARGE,
        title={"text": "Seed prompts by category (PCA of embeddings)", "font": {"size": 13}},
        legend={"orientation": "h", "y": -0.18},
    )


def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- router tab ------------------------------------------------------------------------------------------
def confusion_figure(confusion: Mapping[str, Any]) -> go.Figure:
    """Confusion matrix (rows: true category, columns: predicted); colour is the share of the row."""
    labels, matrix = list(confusion.get("labels") or []), confusion.get("matrix") or []
    if not labels:
        return empty_figure("no held-out evaluation for this version", HEIGHT_LARGE)
    counts = np.asarray(matrix, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = go.Figure(
        go.Heatmap(
            z=share,
            x=labels,
            y=labels,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            text=counts.astype(int),
            texttemplate="%{text}",
            colorbar={"title": {"text": "share of row"}, "tickformat": ".0%"},
            hovertemplate="true %{y} → predicted %{x}: %{text} prompts (%{z:.0%} of row)<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="predicted category", side="bottom", tickangle=-30)
    fig.update_yaxes(title_text="true category", autorange="reversed")
    return _layout(
        fig, HEIGHT_LARGE, title={"text": "Confusion matrix on held-out prompts (counts)", "font": {"size": 13}}
    )


def threshold_figure(
    curve: Sequence[Mapping[str, float]], *, current: float | None, candidate: float | None
) -> go.Figure:
    """Held-out routed precision and coverage as the fallback threshold moves; current and candidate marked."""
    if not curve:
        return empty_figure("no held-out data for the threshold")
    ts = [p["threshold"] for p in curve]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=ts,
            y=[p["precision"] for p in curve],
            name="routed precision",
            mode="lines",
            line={"color": "#0072B2", "width": 2.5},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=ts,
            y=[p["coverage"] for p in curve],
            name="coverage (not fallback)",
            mode="lines",
            line={"color": "#E69F00", "width": 2.5},
        )
    )
    if current is not None:
        fig.add_vline(
            x=current,
            line={"color": "#6B7280", "width": 2},
            annotation_text=f"current {current:.2f}",
            annotation_position="bottom left",
        )
    if candidate is not None and (current is None or abs(candidate - current) > 1e-9):
        fig.add_vline(
            x=candidate,
            line={"color": "#DC2626", "dash": "dash", "width": 2},
            annotation_text=f"new {candidate:.2f}",
            annotation_position="top right",
        )
    fig.update_xaxes(title_text="fallback threshold (confidence, 0–1)", range=[0, 1])
    fig.update_yaxes(title_text="share of held-out prompts", tickformat=".0%", range=[0, 1.02])
    return _layout(
        fig,
        HEIGHT,
        title={"text": "Held-out precision and coverage vs threshold", "font": {"size": 13}},
        legend={"orientation": "h", "y": -0.25},
    )


def reliability_figure(table: Sequence[Mapping[str, Any]], ece: float | None) -> go.Figure:
    """Reliability diagram: per confidence bin, how often the router's top choice was right, against the
    diagonal of perfect calibration; bar labels are the bins' prompt counts."""
    rows = [r for r in table if r.get("n")]
    if not rows:
        return empty_figure("no development-set evaluation for this version (router.dev_data)")
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=[r["confidence"] for r in rows],
            y=[r["accuracy"] for r in rows],
            width=0.08,
            text=[r["n"] for r in rows],
            textposition="outside",
            name="accuracy in bin",
            marker={"color": "#0072B2"},
            hovertemplate="confidence %{x:.2f}: right %{y:.0%} of %{text} prompts<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated", line={"color": "#6B7280", "dash": "dash"}
        )
    )
    fig.update_xaxes(title_text="confidence (mean of the bin)", range=[0, 1.02])
    fig.update_yaxes(title_text="accuracy of the top choice", tickformat=".0%", range=[0, 1.1])
    title = "Reliability on the development set" + (f" (ECE {ece:.3f})" if ece is not None else "")
    return _layout(fig, HEIGHT, title={"text": title, "font": {"size": 13}}, legend={"orientation": "h", "y": -0.25})


# -- mapping tab -----------------------------------------------------------------------------------------
def frontier_figure(
    frontier: Sequence[Mapping[str, Any]],
    *,
    current: Mapping[str, float] | None = None,
    preview: Mapping[str, float] | None = None,
    singles: Sequence[Mapping[str, Any]] = (),
    budget: float | None = None,
) -> go.Figure:
    """Pareto frontier of mappings: expected score vs average active parameters (in ``PARAMS_UNIT``)."""
    if not frontier and not singles:
        return empty_figure("no score table: run `coe eval-experts` to measure the experts", HEIGHT)
    fig = go.Figure()
    if frontier:
        pts = sorted(frontier, key=lambda p: p["avg_active_params"])
        fig.add_trace(
            go.Scatter(
                x=[p["avg_active_params"] / PARAMS_UNIT for p in pts],
                y=[p["expected_score"] for p in pts],
                mode="lines+markers",
                name="Pareto frontier",
                line={"color": "#2F6FDE", "shape": "hv", "width": 2},
                marker={"size": 8},
                hovertemplate="%{x:.0f}M params → score %{y:.3f}<extra>frontier</extra>",
            )
        )
    for s in singles:
        fig.add_trace(
            go.Scatter(
                x=[s["avg_active_params"] / PARAMS_UNIT],
                y=[s["expected_score"]],
                mode="markers+text",
                name=f"only {s['expert']}",
                text=[s["expert"]],
                textposition="top center",
                cliponaxis=False,
                marker={"size": 11, "symbol": "diamond", "color": "#9CA3AF", "line": {"color": "#374151", "width": 1}},
                hovertemplate=f"every category → {s['expert']}: " + "%{x:.0f}M params, score %{y:.3f}<extra></extra>",
            )
        )
    same = (
        current is not None
        and preview is not None
        and abs(preview["avg_active_params"] - current["avg_active_params"]) < 1
        and abs(preview["expected_score"] - current["expected_score"]) < 1e-9
    )
    if preview is not None and not same:
        fig.add_trace(
            go.Scatter(
                x=[preview["avg_active_params"] / PARAMS_UNIT],
                y=[preview["expected_score"]],
                mode="markers",
                name="with the new budget",
                marker={"size": 16, "symbol": "star-open", "color": "#DC2626", "line": {"width": 2}},
                hovertemplate="new budget: %{x:.0f}M params, score %{y:.3f}<extra></extra>",
            )
        )
    if current is not None:
        fig.add_trace(
            go.Scatter(
                x=[current["avg_active_params"] / PARAMS_UNIT],
                y=[current["expected_score"]],
                mode="markers",
                name="current mapping",
                marker={"size": 18, "symbol": "star", "color": "#F59E0B", "line": {"color": "#111827", "width": 1.5}},
                hovertemplate="current: %{x:.0f}M params, score %{y:.3f}<extra></extra>",
            )
        )
    if budget is not None:
        fig.add_vline(
            x=budget / PARAMS_UNIT,
            line={"color": "#DC2626", "dash": "dot", "width": 1.5},
            annotation_text=f"budget {params_m(budget)}",
            annotation_position="top left",
        )
    fig.update_xaxes(title_text="average active parameters per prompt (M params)")
    fig.update_yaxes(title_text="expected score (traffic-weighted)")
    return _layout(
        fig,
        HEIGHT_LARGE - 40,
        legend={"orientation": "h", "y": -0.22},
        title={"text": "Expected score vs cost: the Pareto frontier of mappings", "font": {"size": 13}},
    )


# -- analytics tab ---------------------------------------------------------------------------------------
def turns_over_time_figure(rows: Sequence[Mapping[str, Any]], colors: Mapping[str, str]) -> go.Figure:
    """Turns per day, stacked by category (rows: {"day", "category", "turns"})."""
    if not rows:
        return empty_figure("no turns logged yet")
    days = sorted({r["day"] for r in rows})
    cats = [c for c in colors if any(r["category"] == c for r in rows)]
    cats += sorted({r["category"] for r in rows} - set(cats))
    fig = go.Figure()
    for cat in cats:
        per_day = {r["day"]: r["turns"] for r in rows if r["category"] == cat}
        fig.add_trace(
            go.Bar(
                x=days,
                y=[per_day.get(d, 0) for d in days],
                name=cat,
                marker={"color": color_of(cat, colors)},
                hovertemplate=f"{cat}: " + "%{y} turns on %{x}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="day (UTC)", type="category")
    fig.update_yaxes(title_text="turns")
    return _layout(
        fig,
        HEIGHT,
        barmode="stack",
        bargap=0.7 if len(days) < 4 else 0.2,
        title={"text": "Turns over time by category", "font": {"size": 13}},
        legend={"orientation": "h", "y": -0.25},
    )


def expert_usage_figure(by_expert: Mapping[str, int]) -> go.Figure:
    if not by_expert:
        return empty_figure("no turns logged yet")
    experts = list(by_expert)
    fig = go.Figure(
        go.Bar(
            x=experts,
            y=[by_expert[e] for e in experts],
            marker={"color": "#2F6FDE"},
            text=[str(by_expert[e]) for e in experts],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{x}: %{y} turns<extra></extra>",
        )
    )
    fig.update_yaxes(title_text="turns")
    return _layout(fig, HEIGHT_SMALL + 40, title={"text": "Expert usage", "font": {"size": 13}}, showlegend=False)


def rates_figure(fallback_rate: float, feedback_rates: Mapping[str, float]) -> go.Figure:
    """Fallback rate and feedback rates, as % of logged turns."""
    names = ["fallback"] + [k.replace("_", " ") for k in feedback_rates]
    values = [fallback_rate] + [float(v) for v in feedback_rates.values()]
    palette = {"fallback": "#8A8F98", "like": "#009E73", "dislike": "#D55E00", "wrong category": "#CC79A7"}
    fig = go.Figure(
        go.Bar(
            x=names,
            y=values,
            marker={"color": [palette.get(n, "#2F6FDE") for n in names]},
            text=[f"{v:.1%}" for v in values],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{x}: %{y:.1%} of turns<extra></extra>",
        )
    )
    fig.update_yaxes(title_text="% of turns", tickformat=".0%", range=[0, max(max(values) * 1.25, 0.1)])
    return _layout(
        fig, HEIGHT_SMALL + 40, title={"text": "Fallback and feedback rates", "font": {"size": 13}}, showlegend=False
    )


def ttft_figure(values: Sequence[float]) -> go.Figure:
    """Distribution of time to first token (seconds)."""
    if not values:
        return empty_figure("no answered turns logged yet")
    fig = go.Figure(
        go.Histogram(
            x=list(values),
            nbinsx=min(40, max(5, len(values) // 2)),
            marker={"color": "#E69F00"},
            hovertemplate="%{x} s: %{y} turns<extra></extra>",
        )
    )
    p50 = float(np.percentile(values, 50))
    fig.add_vline(x=p50, line={"color": "#111827", "dash": "dash"}, annotation_text=f"p50 {p50:.2f} s")
    fig.update_xaxes(title_text="time to first token (s)")
    fig.update_yaxes(title_text="turns")
    return _layout(fig, HEIGHT, title={"text": "Time to first token", "font": {"size": 13}}, showlegend=False)


def serving_figure(by_hour: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Swaps per 100 turns (bars) and queue wait p50/p95 (lines, right axis) per hour: how well the serving
    queue keeps experts resident, and what it costs the people waiting."""
    rows = [r for r in by_hour if r.get("turns")]
    if not rows:
        return empty_figure("no turns logged yet")
    hours = [r["hour"] for r in rows]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            x=hours,
            y=[r["swaps_per_100_turns"] for r in rows],
            name="swaps per 100 turns",
            marker={"color": PHASE_COLORS["swap"]},
            customdata=[r["turns"] for r in rows],
            hovertemplate="%{x}: %{y:.0f} swaps per 100 turns (%{customdata} turns)<extra></extra>",
        )
    )
    for key, name, dash in (
        ("queue_wait_p50_s", "queue wait p50", "dot"),
        ("queue_wait_p95_s", "queue wait p95", "solid"),
    ):
        fig.add_trace(
            go.Scatter(
                x=hours,
                y=[r.get(key) for r in rows],
                name=name,
                yaxis="y2",
                mode="lines+markers",
                line={"color": PHASE_COLORS["queue"], "dash": dash},
                hovertemplate="%{x}: %{y:.2f} s<extra>" + name + "</extra>",
            )
        )
    fig.update_yaxes(title_text="swaps per 100 turns", rangemode="tozero")
    fig.update_xaxes(title_text="hour (UTC)")
    return _layout(
        fig,
        HEIGHT,
        title={"text": "Serving: swaps per 100 turns and queue wait", "font": {"size": 13}},
        yaxis2={"title": {"text": "queue wait (s)"}, "overlaying": "y", "side": "right", "rangemode": "tozero"},
    )


def swap_times_figure(
    swap_seconds: Mapping[str, Sequence[float]], first_byte_seconds: Mapping[str, Sequence[float]] | None = None
) -> go.Figure:
    """Swap time distributions (seconds) by tier pair (src->dst), coloured by the tier swapped into; beside
    them, a remote expert's seconds to its first byte (what it costs instead of a swap)."""
    boxes = [(pair.replace("->", " → "), secs, tier_pair_color(pair)) for pair, secs in swap_seconds.items() if secs]
    boxes += [
        (f"{expert}: first byte", secs, UNKNOWN_COLOR) for expert, secs in (first_byte_seconds or {}).items() if secs
    ]
    if not boxes:
        return empty_figure("no swaps logged yet")
    fig = go.Figure()
    for label, secs, color in boxes:
        fig.add_trace(
            go.Box(
                y=list(secs),
                name=label,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker={"color": color, "size": 5},
                line={"color": color},
                hovertemplate=f"{label}: " + "%{y:.2f} s<extra></extra>",
            )
        )
    fig.update_yaxes(title_text="swap time (s)", rangemode="tozero")
    fig.update_xaxes(title_text="tier pair (from → to), remote expert")
    return _layout(fig, HEIGHT, title={"text": "Swap time by tier pair", "font": {"size": 13}}, showlegend=False)
