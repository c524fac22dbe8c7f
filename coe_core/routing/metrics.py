"""Router quality numbers: accuracy, macro-F1, per-category precision/recall/F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], order: Sequence[str]) -> dict[str, Any]:
    """Metrics of predicted vs true labels.

    ``order`` fixes the row/column order of the confusion matrix (labels not seen in either list are
    left out). Macro-F1 averages over the labels that occur as true labels, so a category absent from
    an evaluation file neither helps nor hurts.
    """
    y_true, y_pred = list(y_true), list(y_pred)
    n = len(y_true)
    if n == 0:
        return {
            "n": 0,
            "accuracy": 0.0,
            "macro_f1": 0.0,
            "per_category": {},
            "confusion": {"labels": [], "matrix": []},
        }
    seen = set(y_true) | set(y_pred)
    labels = [c for c in order if c in seen] + sorted(seen - set(order))
    true_labels = [c for c in labels if c in set(y_true)]
    prec, rec, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_category = {
        c: {
            "precision": round(float(p), 4),
            "recall": round(float(r), 4),
            "f1": round(float(f), 4),
            "n": int(s),
        }
        for c, p, r, f, s in zip(labels, prec, rec, f1, support, strict=True)
    }
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "n": n,
        "accuracy": round(float(np.mean([t == p for t, p in zip(y_true, y_pred, strict=True)])), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, labels=true_labels, average="macro", zero_division=0)), 4),
        "per_category": per_category,
        # rows: true label, columns: predicted label
        "confusion": {"labels": labels, "matrix": matrix.tolist()},
    }


def format_confusion(confusion: dict[str, Any]) -> str:
    """A readable text table of a confusion matrix (rows true, columns predicted)."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    if not labels:
        return "(empty)"
    short = [c[:6] for c in labels]
    width = max(len(c) for c in labels) + 1
    lines = ["true \\ pred".ljust(width) + " ".join(s.rjust(6) for s in short)]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(label.ljust(width) + " ".join(str(v).rjust(6) for v in row))
    return "\n".join(lines)
