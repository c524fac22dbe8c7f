"""Training data from the log: which logged turns are labelled prompts for retraining the router."""

from __future__ import annotations

from coe_core.labelled import LabelledPrompt
from coe_core.store.selects import turns_with_feedback
from coe_core.store.store import Store

SOURCE_CORRECTED = "feedback-corrected"
SOURCE_LIKE = "feedback-like"


def labelled_prompts(store: Store, categories: list[str], fallback: str | None = None) -> list[LabelledPrompt]:
    """Labelled prompts from the latest, not retracted, feedback of each turn.

    - wrong_category with a corrected category: the correction is a gold label (the ``fallback`` category
      too: "this was chit-chat" trains the router's ``general`` class);
    - like: confirms the routed category (when it is one of ``categories``: a like of a fallback turn says
      the answer was good, not that the prompt was unplaceable);
    - dislike, or wrong_category without a correction: no positive label, skipped;
    - feedback waiting for review (an anonymous visitor's, not accepted by an admin yet) is skipped;
    - turns stored without text (``store.log_prompts: false``) are skipped.
    The text is what the router saw (the routing context), else the prompt; the group is the conversation,
    so turns of one conversation never straddle a train/held-out split.
    """
    allowed = set(categories)
    corrections = allowed | ({fallback} if fallback else set())
    out: list[LabelledPrompt] = []
    with store.read_session() as s:
        for row, _conv, fb in s.execute(turns_with_feedback().execution_options(yield_per=500)):
            if fb is None or (fb.review or "accepted") != "accepted":  # pending: an admin has not accepted it
                continue
            text = row.routing_context or row.prompt
            if not text:
                continue
            if fb.kind == "wrong_category" and fb.corrected_category in corrections:
                label, source = fb.corrected_category, SOURCE_CORRECTED
            elif fb.kind == "like" and row.category in allowed:
                label, source = row.category, SOURCE_LIKE
            else:
                continue
            out.append(LabelledPrompt(prompt=text, category=label, source=source, group=f"conv-{row.conversation_id}"))
    return out
