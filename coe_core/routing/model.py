"""The fitted router model: feature blocks -> linear classifier -> temperature-scaled probabilities.

The temperature is fitted on held-out prompts: the held-out split at training, then the development
set (written apart from the training data: casual, long, multilingual, multi-turn and ``general``
prompts), so that a probability of 0.8 means "right about 80 % of the time" on traffic like that,
not on the prompts the classifier was fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from coe_core.routing.features import FeatureSet, Resources


def scale_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities re-softened (T > 1) or sharpened (T < 1) in log space; rows sum to 1."""
    logits = np.log(np.clip(proba, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (column indices)."""
    if len(labels) < 20:
        return 1.0  # too few held-out prompts to fit anything meaningful

    def nll(log_t: float) -> float:
        p = scale_temperature(proba, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


@dataclass
class RouterModel:
    """What a router version pickles: the fitted features and classifier. Its temperature lives in the
    version's metadata, because calibrating on the development set changes it after training."""

    features: FeatureSet
    classifier: object

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.classifier.classes_]

    def raw_proba(self, texts: Sequence[str], resources: Resources) -> np.ndarray:
        """(len(texts), len(classes)) uncalibrated probabilities, columns in ``classes`` order."""
        return self.classifier.predict_proba(self.features.transform(texts, resources))
