"""One look for the whole app: colours per category, per tier and per turn phase, the Gradio theme, CSS.

Every plot takes its colours from here, so `math` is the same colour in the probability bar, the
routing map, the confusion matrix's axis and the analytics, and `cpu` is the same colour in the
residency plot, the timeline and the swap-time distributions.
"""

from __future__ import annotations

import gradio as gr

#: colour-blind-friendly palette (Okabe-Ito + Tableau extras), assigned to categories in config order
CATEGORY_PALETTE = [
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # green
    "#CC79A7",  # pink
    "#D55E00",  # vermillion
    "#56B4E9",  # sky
    "#8C6D31",  # brown
    "#7B61FF",  # violet
    "#B8A800",  # olive
    "#17BECF",  # teal
]
FALLBACK_COLOR = "#8A8F98"  # the fallback category `general` is always grey
UNKNOWN_COLOR = "#C4C7CC"

TIER_COLORS = {"gpu": "#76B900", "cpu": "#2F6FDE", "disk": "#B07A2A"}
TIER_ORDER = ("gpu", "cpu", "disk")

PHASE_COLORS = {
    "route": "#7B61FF",
    "queue": "#CC79A7",
    "resident": "#9AA5B1",
    "swap": "#2F6FDE",
    "connect": "#56B4E9",  # a remote expert's connection (no swap)
    "prefill": "#E69F00",
    "generate": "#009E73",
}

#: every figure gets a fixed height (autosized plotly figures can render at zero height in Gradio 6)
HEIGHT_SMALL = 260
HEIGHT = 340
HEIGHT_LARGE = 460

FONT = "Inter, ui-sans-serif, system-ui, -apple-system, Segoe UI, Roboto, sans-serif"


def category_colors(categories: list[str], fallback_category: str = "general") -> dict[str, str]:
    """Category -> colour, stable for a given category list (the config's order)."""
    colors = {c: CATEGORY_PALETTE[i % len(CATEGORY_PALETTE)] for i, c in enumerate(categories)}
    colors[fallback_category] = FALLBACK_COLOR
    return colors


def color_of(category: str, colors: dict[str, str]) -> str:
    return colors.get(category, UNKNOWN_COLOR)


def tier_pair_color(pair: str) -> str:
    """Colour of a swap `src->dst`: the colour of the tier it lands in."""
    dst = pair.split("->")[-1].strip()
    return TIER_COLORS.get(dst, UNKNOWN_COLOR)


def gradio_theme() -> gr.themes.Base:
    return gr.themes.Soft(
        primary_hue="indigo",
        secondary_hue="sky",
        neutral_hue="slate",
        # system fonts only: the app must look right offline (no Google Fonts request)
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    ).set(block_radius="10px", button_large_radius="8px")


CSS = """
.gradio-container { max-width: 1400px !important; width: 100% !important; margin: 0 auto; }
/* keep one width on every tab (flex containers otherwise shrink to the tab's content) */
.gradio-container > .main, .gradio-container main.contain, .gradio-container .wrap:has(> main) {
  width: 100% !important; max-width: 1400px !important; }
#coe-header h1 { margin-bottom: 0; font-size: 1.6rem; }
#coe-header p { margin-top: 0.2rem; opacity: 0.8; }
#coe-status { font-size: 0.9rem; padding: 0.3rem 0.6rem; border-radius: 8px;
              background: var(--background-fill-secondary); }
.coe-plot { min-height: 200px; }
.coe-stats { font-variant-numeric: tabular-nums; }
.coe-stats table { width: 100%; }
#coe-chatbot .message-wrap { font-size: 0.95rem; }
@media (max-width: 768px) {
  .gradio-container { padding: 0 4px !important; }
  #coe-header h1 { font-size: 1.25rem; }
}
"""
