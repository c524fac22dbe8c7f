"""What the router reads of a conversation: the routed text.

A request is usually at the start or at the end of what people type (``fix this:`` + pasted code, or a
pasted report + ``summarise it for the board``), so a long turn keeps both ends and drops its middle
instead of being cut after its first characters. In a multi-turn chat the latest turn comes last, after
the tail of the earlier user turns, so the end of the routed text is always the end of what the user
asks now.
"""

from __future__ import annotations

from typing import Any

from coe_core.errors import InvalidRequest

#: marks where the middle of a long turn was left out
ELLIPSIS = " … "
#: share of ``context_chars`` that earlier turns may take in a multi-turn chat
CONTEXT_SHARE = 0.2
#: share of a long turn's characters kept from its start (the rest comes from its end)
HEAD_SHARE = 0.4


def text_of(content: Any) -> str:
    """The text of a message's content (a string, or OpenAI-style content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else str(content)


def head_tail(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and its end joined by an ellipsis."""
    if len(text) <= limit:
        return text
    if limit <= len(ELLIPSIS) + 2:
        return text[:limit]
    head = int(limit * HEAD_SHARE)
    tail = limit - head - len(ELLIPSIS)
    return text[:head] + ELLIPSIS + text[len(text) - tail :]


def routed_text(messages: list[dict[str, Any]], context_turns: int, context_chars: int) -> str:
    """Up to ``context_turns`` earlier user turns (their end, oldest first), then the latest user turn.

    At most ``context_chars`` characters: earlier turns get at most a fifth of them; a latest turn
    that does not fit in the rest keeps its start and its end.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest('messages must be a list of {"role": ..., "content": ...} dicts')
    users = [text_of(m.get("content")).strip() for m in messages if m.get("role") == "user"]
    if not users or not users[-1]:
        raise InvalidRequest("empty prompt: the latest user message has no text; type a question or instruction")
    earlier = [u for u in users[:-1] if u][-context_turns:] if context_turns > 0 else []
    context = "\n".join(earlier)
    if context:
        context_room = max(0, int(context_chars * CONTEXT_SHARE))
        context = context[len(context) - context_room :] if len(context) > context_room else context
    latest_room = context_chars - (len(context) + 1 if context else 0)
    latest = head_tail(users[-1], latest_room)
    return f"{context}\n{latest}" if context else latest
