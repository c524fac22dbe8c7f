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
        raise ValueError("no held-out predictions to calibrate on: train the router with more labelled prompts")
    candidates = np.unique(np.concatenate([[0.0], conf]))
    effects = [threshold_effect(conf, correct, t) for t in candidates]
    for effect in effects:
        if effect["routed"] and effect["precision"] >= target_precision:
            return {**effect, "target_precision": target_precision, "achieved": True}
    best = max((e for e in effects if e["routed"]), key=lambda e: (e["precision"], e["coverage"]))
    return {**best, "target_precision": target_precision, "achieved": False}


def top_choice_scores(
    proba: np.ndarray, labels: list[str], truth: list[str], confidence_kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, whether the top choice is right) of each row: what thresholds are judged on."""
    from coe_core.routing.classifier import confidence

    pred = [labels[i] for i in np.asarray(proba).argmax(axis=1)]
    return confidence(proba, confidence_kind), np.array([p == t for p, t in zip(pred, truth, strict=True)])


def calibrate_on_examples(
    raw: np.ndarray, labels: list[str], examples: list, *, target_precision: float, fallback: str, confidence_kind: str
) -> dict[str, Any]:
    """Calibrate a router version on labelled ``examples`` (the development set) from its uncalibrated
    probabilities ``raw``: the temperature (negative log-likelihood) and the fallback threshold
    (routed precision >= target). Returns the metadata changes, with the examples' report.

    The report's ECE and reliability table are cross-fitted (the temperature of each half of the set
    fitted on the other half), so they are not measured on the prompts the temperature was fitted on."""
    from coe_core.routing.evaluation import evaluate_proba
    from coe_core.routing.model import fit_temperature, scale_temperature

    truth = [ex.category for ex in examples]
    index = np.array([labels.index(t) if t in labels else -1 for t in truth])
    known = index >= 0
    temperature = fit_temperature(raw[known], index[known])
    halves = [np.arange(len(examples)) % 2 == k for k in (0, 1)]
    crossfit = np.zeros_like(raw)
    for fit_on, apply_to in ((halves[0], halves[1]), (halves[1], halves[0])):
        t = fit_temperature(raw[fit_on & known], index[fit_on & known])
        crossfit[apply_to] = scale_temperature(raw[apply_to], t)
    proba = scale_temperature(raw, temperature)
    conf, correct = top_choice_scores(proba, labels, truth, confidence_kind)
    result = {**pick_threshold(conf, correct, target_precision), "on": "development set"}
    report = evaluate_proba(
        proba, labels, examples, threshold=result["threshold"], fallback=fallback, confidence_kind=confidence_kind
    )
    cross = evaluate_proba(
        crossfit, labels, examples, threshold=result["threshold"], fallback=fallback, confidence_kind=confidence_kind
    )
    report.update(
        ece_in_sample=report["ece"],
        ece=cross["ece"],
        reliability=cross["reliability"],
        temperature=round(temperature, 4),
    )
    return {
        "threshold": result["threshold"],
        "calibration": result,
        "temperature": round(temperature, 4),
        "temperature_fitted_on": "development set",
        "threshold_set_by": "calibration on the development set (router.dev_data)",
        "dev_metrics": report,
    }
