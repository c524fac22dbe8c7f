"""Versioned router artifacts on disk.

``<data_dir>/router/<version_id>/`` holds ``model.joblib`` (the fitted RouterModel: feature state and
classifier), ``meta.json`` (id, categories, labels, features, classifier kind and why, temperature,
threshold, held-out and development-set metrics,
sample counts, data hash, parent, ...) and ``heldout.jsonl`` + ``heldout_proba.npy`` (the held-out
examples and the classifier's probabilities on them, so calibration and the threshold preview need
no recomputation). ``<data_dir>/router/active.json`` names the active version.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from coe_core.errors import ConfigError


def columns(proba: np.ndarray, classes: list[str], labels: list[str]) -> np.ndarray:
    """``proba`` (columns in ``classes`` order) with its columns in ``labels`` order (absent classes: 0)."""
    out = np.zeros((len(proba), len(labels)))
    for j, c in enumerate(classes):
        out[:, labels.index(c)] = proba[:, j]
    return out


class RouterArtifactError(ConfigError):
    """A router version is missing or does not fit the current config; the message says what to do."""


def router_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "router"


def write_json_atomic(path: Path, data: Any) -> None:
    # write-then-rename: a reader (another process, the app) never sees a half-written file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
    os.replace(tmp, path)


@dataclass
class RouterArtifact:
    """A loaded router version: the fitted model (features + classifier) and its metadata (temperature,
    threshold, ...)."""

    meta: dict[str, Any]
    model: Any  # coe_core.routing.model.RouterModel
    path: Path

    @property
    def version_id(self) -> str:
        return self.meta["id"]

    @property
    def categories(self) -> list[str]:
        """The labels the classifier chooses between (the routed categories, and ``general`` when the
        training data had examples of it), in probability-column order."""
        return list(self.meta["labels"])

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature") or 1.0)

    def raw_proba(self, texts: list[str], resources: Any) -> np.ndarray:
        """Uncalibrated probabilities with columns in ``self.categories`` order."""
        raw = self.model.raw_proba(texts, resources)
        return raw if self.model.classes == self.categories else columns(raw, self.model.classes, self.categories)

    def predict_proba(self, texts: list[str], resources: Any) -> np.ndarray:
        """Calibrated probabilities (the version's temperature) with columns in ``self.categories`` order."""
        from coe_core.routing.model import scale_temperature

        return scale_temperature(self.raw_proba(texts, resources), self.temperature)

    def heldout(self) -> tuple[list[dict[str, str]], np.ndarray]:
        """The held-out examples and the classifier's probabilities on them."""
        lines = (self.path / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
        examples = [json.loads(line) for line in lines if line.strip()]
        proba_path = self.path / "heldout_proba.npy"
        proba = np.load(proba_path) if proba_path.exists() else np.zeros((0, len(self.categories)))
        return examples, proba


def new_version_id(data_hash: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    return f"r{stamp}-{data_hash[:6]}"


def save_artifact(
    data_dir: Path,
    meta: dict[str, Any],
    model: Any,
    heldout: list[dict[str, str]],
    heldout_proba: np.ndarray,
) -> RouterArtifact:
    path = router_dir(data_dir) / meta["id"]
    path.mkdir(parents=True, exist_ok=False)
    joblib.dump(model, path / "model.joblib")
    with open(path / "heldout.jsonl", "w", encoding="utf-8") as fh:
        for ex in heldout:
            fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
    np.save(path / "heldout_proba.npy", np.asarray(heldout_proba, dtype=float))
    write_json_atomic(path / "meta.json", meta)  # last: a folder with meta.json is complete
    return RouterArtifact(meta, model, path)


def read_meta(data_dir: Path, version_id: str) -> dict[str, Any]:
    path = router_dir(data_dir) / version_id / "meta.json"
    if not path.exists():
        known = ", ".join(v["id"] for v in list_versions(data_dir)) or "none yet"
        raise RouterArtifactError(
            f"router version {version_id!r} does not exist in {router_dir(data_dir)} (versions: {known}); "
            "run `coe train-router` to make one"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RouterArtifactError(f"{path} is damaged ({exc}); delete that folder and run `coe train-router`") from None


def router_signature(router: Any, categories: list[str]) -> dict[str, Any]:
    """What a router version must have been trained with to serve this config (``router`` is the
    config's RouterConfig): its features, the resources they read, and the routed categories."""
    sig: dict[str, Any] = {"features": list(router.features), "categories": list(categories)}
    if "tokens" in router.features:
        sig["token_table"] = router.token_table
    if "sentence" in router.features:
        sig["embedder"] = router.embedder
    return sig


def check_compatible(meta: dict[str, Any], router: Any, categories: list[str]) -> None:
    """Raise RouterArtifactError saying exactly what differs between a version and the config."""
    want = router_signature(router, categories)
    problems = []
    if "labels" not in meta or "features" not in meta:
        problems.append("it was trained by an older version of CoE Playground (no feature blocks)")
    for key in ("features", "token_table", "embedder"):
        if key in want and meta.get(key) != want[key]:
            problems.append(f"it was trained with {key} {meta.get(key)!r} but router.{key} is {want[key]!r}")
    trained = list(meta.get("categories", []))
    if trained != list(categories):
        missing = [c for c in categories if c not in trained]
        extra = [c for c in trained if c not in categories]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"not in spaces.yaml {extra}")
        if not missing and not extra:
            detail.append("same categories in another order")
        problems.append(
            f"its categories {trained} differ from spaces.yaml categories {list(categories)} ({'; '.join(detail)})"
        )
    if problems:
        raise RouterArtifactError(
            f"router version {meta.get('id')!r} does not fit this config: {' and '.join(problems)}. "
            "Run `coe train-router` to train a version for the current config, or activate a compatible one."
        )


def load_artifact(data_dir: Path, version_id: str, *, router: Any, categories: list[str]) -> RouterArtifact:
    meta = read_meta(data_dir, version_id)
    check_compatible(meta, router, categories)
    path = router_dir(data_dir) / version_id
    try:
        model = joblib.load(path / "model.joblib")
    except FileNotFoundError:
        raise RouterArtifactError(
            f"router version {version_id!r} has no model.joblib in {path}; delete that folder and "
            "run `coe train-router`"
        ) from None
    except Exception as exc:  # a truncated or foreign pickle
        raise RouterArtifactError(
            f"router version {version_id!r}: {path / 'model.joblib'} cannot be read ({exc}); delete that "
            "folder and run `coe train-router`"
        ) from None
    return RouterArtifact(meta, model, path)


def list_versions(data_dir: Path) -> list[dict[str, Any]]:
    """Metadata of every stored version, oldest first."""
    root = router_dir(data_dir)
    if not root.is_dir():
        return []
    metas = []
    for meta_path in root.glob("*/meta.json"):
        try:
            metas.append(json.loads(meta_path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue  # a damaged version is skipped here; read_meta names it when asked for
    return sorted(metas, key=lambda m: m.get("trained_at", ""))


def read_active(data_dir: Path) -> str | None:
    path = router_dir(data_dir) / "active.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("version")
    except json.JSONDecodeError:
        return None


def write_active(data_dir: Path, version_id: str) -> None:
    read_meta(data_dir, version_id)  # raises when it does not exist
    write_json_atomic(
        router_dir(data_dir) / "active.json",
        {"version": version_id, "activated_at": datetime.now(UTC).isoformat()},
    )


def update_meta(data_dir: Path, version_id: str, **changes: Any) -> dict[str, Any]:
    meta = read_meta(data_dir, version_id)
    meta.update(changes)
    write_json_atomic(router_dir(data_dir) / version_id / "meta.json", meta)
    return meta
