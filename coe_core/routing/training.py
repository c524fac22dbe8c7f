"""Training data of the category router and how a router is trained from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelledPrompt:
    """One training example of the router.

    ``source`` says where the label came from (``seed``, ``feedback``, ``correction``, ...);
    ``group`` keeps examples that must not be split across train and held-out sets together
    (a conversation id; every seed prompt is its own group).
    """

    prompt: str
    category: str
    source: str = "seed"
    group: str = ""
