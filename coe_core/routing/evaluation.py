"""How good a router is on labelled prompts: accuracy per slice, calibration (ECE and a reliability
table), and what the uncertainty fallback catches.

Slices come from the rows themselves: ``lang=..`` (the request's language), ``style=casual|clean``,
``length=long`` (latest turn >= 1,000 characters) or ``length=short``, and ``turns=multi``. A
fallback to ``general`` counts as right only when the label is ``general``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from coe_core.routing.classifier import confidence
from coe_core.routing.metrics import classification_metrics

#: a latest turn at least this long is in the ``length=long`` slice
LONG_CHARS = 1000
#: bins of the reliability table (equal width over confidence)
RELIABILITY_BINS = 10


def slices_of(example: Any) -> list[str]:
    out = [
        f"lang={example.lang or 'unknown'}",
        f"style={example.style or 'unknown'}",
        "length=long" if example.chars >= LONG_CHARS else "length=short",
    ]
    if example.turns > 1:
        out.append("turns=multi")
    return out


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error and the table it is computed from: per confidence bin, how many
    predictions, their mean confidence and how often they were right."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        inside = (conf >= lo) & ((conf < hi) if i < bins - 1 else (conf <= hi))
        n = int(inside.sum())
        row = {"bin": f"{lo:.1f}-{hi:.1f}", "n": n, "confidence": None, "accuracy": None}
        if n:
            mean_conf, acc = float(conf[inside].mean()), float(correct[inside].mean())
            row.update(confidence=round(mean_conf, 4), accuracy=round(acc, 4))
            ece += n / len(conf) * abs(mean_conf - acc)
        table.append(row)
    return round(ece, 4), table


def evaluate_proba(
    proba: np.ndarray,
    labels: Sequence[str],
    examples: Sequence[Any],
    *,
    threshold: float,
    fallback: str,
    confidence_kind: str = "max_prob",
) -> dict[str, Any]:
    """Everything ``coe eval-router`` reports, from the router's probabilities on ``examples``."""
    if not len(examples):
        raise ValueError("no labelled examples to evaluate on")
    labels = list(labels)
    conf = confidence(proba, confidence_kind)
    top = [labels[i] for i in np.asarray(proba).argmax(axis=1)]
    fell_back = conf < threshold
    pred = [fallback if f else t for t, f in zip(top, fell_back, strict=True)]
    truth = [ex.category for ex in examples]
    right = np.array([p == t for p, t in zip(pred, truth, strict=True)])
    top_right = np.array([p == t for p, t in zip(top, truth, strict=True)])
    metrics = classification_metrics(truth, pred, [*labels, *([fallback] if fallback not in labels else [])])
    ece, table = reliability(conf, top_right)
    wrong_top = ~top_right
    by_slice: dict[str, list[bool]] = defaultdict(list)
    for ex, ok in zip(examples, right, strict=True):
        for s in slices_of(ex):
            by_slice[s].append(bool(ok))
    metrics.update(
        {
            "fallback_rate": round(float(fell_back.mean()), 4),
            "accuracy_without_fallback": round(float(top_right.mean()), 4),
            # of the prompts the classifier got wrong, the share the uncertainty fallback caught
            "wrong_caught_by_fallback": round(float(fell_back[wrong_top].mean()), 4) if wrong_top.any() else None,
            "ece": ece,
            "reliability": table,
            "slices": {s: {"n": len(v), "accuracy": round(float(np.mean(v)), 4)} for s, v in sorted(by_slice.items())},
            "threshold": round(float(threshold), 4),
        }
    )
    return metrics
