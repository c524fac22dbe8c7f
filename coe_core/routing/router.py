"""The in-memory category router: feature resources + one artifact + the threshold of the uncertainty fallback."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coe_core.routing.artifact import RouterArtifact
from coe_core.routing.classifier import confidence
from coe_core.routing.features import Resources

#: single texts whose probabilities are remembered (a user who resends, the app's previews)
CACHE_SIZE = 1024


@dataclass
class Classification:
    """Step 1 of routing for one text."""

    category: str  # after the fallback
    top_category: str  # the classifier's winner (may be the fallback category itself), also when it fell back
    probabilities: dict[str, float]
    confidence: float
    fallback: bool


class Router:
    """Classifies texts into the artifact's categories; below the threshold they fall back.

    The artifact's calibrated threshold (``coe calibrate-router``) wins over ``router.threshold``
    of spaces.yaml once it is set; ``threshold_source`` says which one is in force.
    """

    def __init__(
        self,
        artifact: RouterArtifact,
        resources: Resources,
        *,
        config_threshold: float,
        confidence_kind: str,
        fallback_category: str,
    ) -> None:
        self.artifact = artifact
        self.resources = resources
        self._cache: OrderedDict[tuple[str, float], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.config_threshold = config_threshold
        self.confidence_kind = confidence_kind
        self.fallback_category = fallback_category

    @property
    def version_id(self) -> str:
        return self.artifact.version_id

    @property
    def categories(self) -> list[str]:
        return self.artifact.categories

    @property
    def threshold(self) -> float:
        t = self.artifact.meta.get("threshold")
        return float(t) if t is not None else self.config_threshold

    @property
    def threshold_source(self) -> str:
        if self.artifact.meta.get("threshold") is not None:
            by = self.artifact.meta.get("threshold_set_by") or "calibration"
            return f"set by {by} in router {self.version_id}, wins over spaces.yaml"
        return "router.threshold in spaces.yaml"

    def predict_proba(self, texts: Sequence[str], *, use_cache: bool = True) -> np.ndarray:
        texts = list(texts)
        if len(texts) != 1 or not use_cache:
            return self.artifact.predict_proba(texts, self.resources)
        key = (texts[0], self.artifact.temperature)  # a recalibrated temperature makes old rows stale
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[None, :]
        row = self.artifact.predict_proba(texts, self.resources)[0]
        with self._cache_lock:
            self._cache[key] = row
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return row[None, :]

    def cache_clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def classify_proba(self, proba: np.ndarray, threshold: float | None = None) -> list[Classification]:
        threshold = self.threshold if threshold is None else threshold
        conf = confidence(proba, self.confidence_kind)
        cats = self.categories
        out = []
        for row, c in zip(np.atleast_2d(proba), conf, strict=True):
            top = cats[int(np.argmax(row))]
            fallback = bool(c < threshold)
            out.append(
                Classification(
                    category=self.fallback_category if fallback else top,
                    top_category=top,
                    probabilities={cat: round(float(p), 4) for cat, p in zip(cats, row, strict=True)},
                    confidence=round(float(c), 4),
                    fallback=fallback,
                )
            )
        return out

    def classify(self, texts: Sequence[str], *, use_cache: bool = True) -> list[Classification]:
        return self.classify_proba(self.predict_proba(texts, use_cache=use_cache))
