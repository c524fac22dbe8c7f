"""The labelled prompt: one training example of the category router.

A ground-floor record: routing trains on it and the store turns logged feedback into it, so it lives below
both (routing imports the store, so the store cannot import routing).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelledPrompt:
    """One training example of the router.

    ``prompt`` is the routed text (for a multi-turn row: earlier user turns and the latest one, as
    :func:`coe_core.routing.text.routed_text` builds it). ``source`` says where the label came from
    (``seed``, ``feedback``, ``correction``, ...); ``group`` keeps examples that must not be split
    across train and held-out sets together (a conversation id; every seed prompt is its own group).
    ``lang``, ``style``, ``turns`` and ``chars`` (length of the latest turn) name its slices.
    """

    prompt: str
    category: str
    source: str = "seed"
    group: str = ""
    lang: str = ""
    style: str = ""
    turns: int = 1
    chars: int = 0
