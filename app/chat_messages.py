"""Engine events as chat messages (pure functions): the routing "thought", its swap steps, the stats line.

The Chatbot shows, before each answer, a collapsible routing message whose title says
``category (p) -> expert`` and why; each swap of the turn (or a remote expert's connection) is a child message
under it.
"""

from __future__ import annotations

import re
from typing import Any

from app.plots import gb
from coe_core.events import Notice, Queued, RemoteConnect, RouteDecision, RouteReason, SwapEvent, TurnStats

REASONS: dict[RouteReason, str] = {
    "mapped": "mapped by the optimiser",
    "fallback": "router unsure: fallback",
    "override-category": "category forced by you",
    "override-expert": "expert forced by you",
    "mapping-override": "set in spaces.yaml",
    "default": "default expert (no router)",
    "remote-fallback": "remote expert did not answer: a local one stood in",
}


#: code (fenced blocks, also one still streaming, and inline spans): the Markdown renderer escapes it itself
_CODE = re.compile(r"(```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]*`)", re.S)


def escape_html(text: str) -> str:
    """Chat text as Markdown that cannot be HTML: ``&`` and ``<`` outside code are escaped (no tag, form or
    live image from a prompt or a prompt-injected answer), and Markdown images (``![..](url)``, a tracking
    pixel just the same) are shown as text. Everything else of Markdown keeps working. ``unescape_html``
    reverses it exactly."""
    parts = _CODE.split(text or "")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace("![", "!\\[")
    return "".join(parts)


def unescape_html(text: str) -> str:
    parts = _CODE.split(text or "")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("!\\[", "![").replace("&lt;", "<").replace("&amp;", "&")
    return "".join(parts)


def text_of(content: Any) -> str:
    """Text of a Chatbot message's content (a string, a list of parts, or a part)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return str(content)


def engine_messages(history: list[dict], prompt: str) -> list[dict]:
    """The conversation as the engine wants it: user and answer turns only (no routing thoughts), then the prompt."""
    out = []
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        if (m.get("metadata") or {}).get("title"):
            continue  # a routing/swap thought, not part of the conversation
        text = unescape_html(text_of(m.get("content"))).strip()  # the chat shows it escaped (escape_html)
        if text:
            out.append({"role": m["role"], "content": text})
    out.append({"role": "user", "content": prompt})
    return out


def routing_title(d: RouteDecision) -> str:
    p = d.probabilities.get(d.category)
    share = f" ({p:.2f})" if p is not None else ""
    return f"🧭 {d.category}{share} → {d.expert} · {REASONS.get(d.reason, d.reason)}"


def routing_message(d: RouteDecision, msg_id: str) -> dict:
    lines = [d.explanation or routing_title(d)]
    if d.fallback and d.threshold is not None:
        lines.append(f"Confidence {d.confidence:.2f} is below the fallback threshold {d.threshold:.2f}.")
    details = [
        f"router {d.router_version}" if d.router_version else "no router version",
        f"routing took {d.latency_ms:.0f} ms",
    ]
    lines.append(" · ".join(details))
    return {
        "role": "assistant",
        "content": "\n\n".join(lines),
        "metadata": {"title": routing_title(d), "id": msg_id, "status": "pending"},
    }


def swap_message(s: SwapEvent, parent_id: str) -> dict:
    title = f"⇄ {s.expert}: {s.src} → {s.dst}, {gb(s.bytes)} in {s.seconds:.2f} s ({s.gbps:.2f} GB/s)"
    parts = []
    if s.trigger != "request":
        parts.append(f"trigger: {s.trigger}")
    if s.phases:
        parts.append("phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.phases.items()))
    if s.evicted:
        parts.append("evicted: " + ", ".join(s.evicted))
    return {
        "role": "assistant",
        "content": "; ".join(parts) or "moved",
        "metadata": {"title": title, "parent_id": parent_id},
    }


def connection_message(c: RemoteConnect, parent_id: str) -> dict:
    """A remote expert has no tiers: instead of a swap, how long reaching it took."""
    title = f"🌐 {c.expert}: remote, first byte after {c.first_byte_s:.2f} s"
    parts = ["phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in c.phases.items())]
    if c.attempts > 1:
        parts.append(f"{c.attempts} attempts")
    if c.base_url:
        parts.append(f"at {escape_html(c.base_url)}")
    return {"role": "assistant", "content": "; ".join(parts), "metadata": {"title": title, "parent_id": parent_id}}


def resident_message(expert: str, tier: str, parent_id: str) -> dict:
    return {
        "role": "assistant",
        "content": f"{expert} was already resident in {tier}: no swap needed.",
        "metadata": {"title": f"✓ {expert} already in {tier}", "parent_id": parent_id},
    }


def notice_message(n: Notice, parent_id: str) -> dict:
    return {
        "role": "assistant",
        "content": escape_html(n.message),
        "metadata": {"title": "⚠️ note" if n.kind == "warning" else "ℹ️ note", "parent_id": parent_id},
    }


def queued_message(q: Queued, parent_id: str) -> dict:
    """ "waiting: 2 turns ahead on gemma3-270m, then a swap" (the serving queue; updated in place)."""
    return {
        "role": "assistant",
        "content": escape_html(q.message),
        "metadata": {"title": "⏳ queued", "parent_id": parent_id, "status": "pending"},
    }


def stats_line(stats: TurnStats) -> str:
    """One line of numbers for the turn, with units."""
    parts = [f"**{stats.expert}**"]
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    parts.append(f"{stats.new_tokens} tokens")
    if stats.tokens_per_s:
        parts.append(f"{stats.tokens_per_s:.1f} tokens/s")
    parts.append(f"total {stats.total_s:.2f} s")
    if stats.prompt_tokens:
        parts.append(f"prompt {stats.prompt_tokens} tokens{' (truncated)' if stats.truncated else ''}")
    if stats.status != "ok":
        parts.append(f"status **{stats.status}**")
    if stats.interaction_id is not None:
        parts.append(f"logged as turn #{stats.interaction_id}")
    return " · ".join(parts)
