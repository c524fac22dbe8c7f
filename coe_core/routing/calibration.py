"""Confidence threshold of the uncertainty fallback: its effect, and picking it from held-out data.

A prompt is *routed* when its confidence is >= the threshold, otherwise it falls back to the
generalist category. Routed precision = accuracy among routed prompts; coverage = routed share.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def threshold_effect(conf: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """Routed precision and coverage of held-out predictions at one threshold."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=bool)
    routed = conf >= threshold
    n_routed = int(routed.sum())
    return {
        "threshold": round(float(threshold), 4),
        "n": int(len(conf)),
        "routed": n_routed,
        "coverage": round(n_routed / len(conf), 4) if len(conf) else 0.0,
        "fallback_rate": round(1 - n_routed / len(conf), 4) if len(conf) else 0.0,
        # no routed prompt makes no routed mistake
        "precision": round(float(correct[routed].mean()), 4) if n_routed else 1.0,
    }


def pick_threshold(conf: np.ndarray, correct: np.ndarray, target_precision: float) -> dict[str, Any]:
    """The lowest threshold whose routed precision on the held-out data is >= ``target_precision``.

    Candidate thresholds are 0 and the observed confidences (between two observed values every
    threshold routes the same prompts, so the lowest one of each run is the one to take).
    ``achieved`` is False when no threshold reaches the target; then the threshold with the highest
    precision (and, among those, the highest coverage) is returned.
    """
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=bool)
    if len(conf) == 0:
        raise ValueError(
            "no held-out predictions to calibrate on: train the router with more labelled prompts"
        )
    candidates = np.unique(np.concatenate([[0.0], conf]))
    effects = [threshold_effect(conf, correct, t) for t in candidates]
    for effect in effects:
        if effect["routed"] and effect["precision"] >= target_precision:
            return {**effect, "target_precision": target_precision, "achieved": True}
    best = max((e for e in effects if e["routed"]), key=lambda e: (e["precision"], e["coverage"]))
    return {**best, "target_precision": target_precision, "achieved": False}
