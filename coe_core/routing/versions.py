"""Router versions: load the active one (or train one on a fresh data dir), train, activate, retrain
and change a version's threshold.

Activating records itself in the interaction log when there is one (``router_versions`` table), so
callers (CLI, app) do not record anything themselves; a log that is down is reported, not fatal, so the
two can disagree until the next activation.
The in-memory router is swapped atomically: another process changing ``active.json`` is noticed on
the next use, without a restart.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coe_core.config import CoEConfig
from coe_core.errors import ConfigError
from coe_core.labelled import LabelledPrompt
from coe_core.routing import artifact as artifacts
from coe_core.routing.calibration import calibrate_on_examples, pick_threshold, top_choice_scores
from coe_core.routing.datasets import Datasets
from coe_core.routing.embedder import EmbedderError
from coe_core.routing.features import Resources
from coe_core.routing.router import Router
from coe_core.routing.token_table import TokenTableError
from coe_core.routing.training import (
    evaluate,
    from_heldout_row,
    should_promote,
    train_router,
)


class RouterUnavailableError(ConfigError):
    """No router can be loaded or trained (e.g. no seed data); the message says what to do."""


class RouterVersions:
    def __init__(
        self,
        config: CoEConfig,
        *,
        datasets: Datasets,
        resources: Callable[[], Resources],
        progress: Callable[[str], None],
        store: Any | None = None,
    ) -> None:
        self.config = config
        self.datasets = datasets
        self._resources = resources
        self._progress = progress
        self.store = store
        self._lock = threading.RLock()
        self._router: Router | None = None
        self._active_mtime: tuple[int, int] | None = None
        self._scores_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def data_dir(self) -> Path:
        return self.config.data_path

    # -- the active router -------------------------------------------------------------------------
    def make_router(self, artifact: artifacts.RouterArtifact) -> Router:
        try:
            resources = self._resources()
        except (TokenTableError, EmbedderError) as exc:  # e.g. the package of the token table is missing
            raise RouterUnavailableError(f"the router's features cannot be loaded: {exc}") from None
        return Router(
            artifact,
            resources,
            config_threshold=self.config.router.threshold,
            confidence_kind=self.config.router.confidence,
            fallback_category=self.config.fallback_category,
        )

    def _active_file_mtime(self) -> tuple[int, int] | None:
        """Signature of active.json: it is replaced atomically (new inode) on every write, so the inode
        tells two writes apart even within one tick of the file system's clock."""
        try:
            st = os.stat(artifacts.router_dir(self.data_dir) / "active.json")
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def router(self) -> Router:
        """The active router: loaded, or the newest compatible version, or trained from the seed set."""
        router, mtime = self._router, self._active_file_mtime()
        if router is not None and mtime == self._active_mtime:
            return router
        with self._lock:
            if self._router is not None and self._active_file_mtime() == self._active_mtime:
                return self._router
            self._router = self._load_or_train()
            self._active_mtime = self._active_file_mtime()
            return self._router

    def _load_or_train(self) -> Router:
        cfg = self.config
        active = artifacts.read_active(self.data_dir)
        if active is not None:
            try:
                return self.make_router(self.load(active))
            except artifacts.RouterArtifactError as exc:
                self._progress(f"router: active version unusable: {exc}")
        for meta in reversed(artifacts.list_versions(self.data_dir)):
            try:
                artifact = self.load(meta["id"])  # checks compatibility and reads the model
            except artifacts.RouterArtifactError:
                continue  # another config's version, or a damaged one: try the next
            self._progress(f"router: activating {meta['id']}, the newest version that fits this config")
            router = self.make_router(artifact)
            artifacts.write_active(self.data_dir, meta["id"])
            self._record(meta, active=True)
            return router
        self._progress(
            "router: no trained router for this config yet; training one from the seed set "
            f"({', '.join(cfg.router.seed_data)}), this takes about 20 s on 2 cores"
        )
        try:
            examples = self.datasets.seed()
        except (FileNotFoundError, ValueError) as exc:
            raise RouterUnavailableError(f"no router and none can be trained: {exc}") from None
        try:
            artifact = train_router(
                cfg,
                examples,
                resources=self._resources(),
                progress=self._progress,
                seed_file=self.datasets.seed_file_info(),
            )
            self.calibrate_on_dev(artifact)
        except ValueError as exc:
            raise RouterUnavailableError(f"no router and none can be trained: {exc}") from None
        artifacts.write_active(self.data_dir, artifact.version_id)
        self._record(artifact.meta, active=True)
        return self.make_router(artifact)

    def load(self, version_id: str) -> artifacts.RouterArtifact:
        return artifacts.load_artifact(
            self.data_dir, version_id, router=self.config.router, categories=self.config.categories
        )

    def active_version(self) -> dict[str, Any]:
        return dict(self.router().artifact.meta)

    def list_versions(self) -> list[dict[str, Any]]:
        active = artifacts.read_active(self.data_dir)
        return [{**m, "active": m["id"] == active} for m in artifacts.list_versions(self.data_dir)]

    def activate(self, version_id: str) -> dict[str, Any]:
        """Make ``version_id`` the active router, in this process at once (raises when it does not fit),
        and in the interaction log."""
        with self._lock:
            router = self.make_router(self.load(version_id))
            artifacts.write_active(self.data_dir, version_id)
            self._router, self._active_mtime = router, self._active_file_mtime()
        self._record(router.artifact.meta, active=True)
        return dict(router.artifact.meta)

    def _record(self, meta: dict[str, Any], *, active: bool) -> None:
        """Record a version in the interaction log (``router_versions``), if there is one. The log is a
        mirror here: a log that is down must not stop routing, so failures are only reported."""
        if self.store is None:
            return
        try:
            if meta["id"] not in {v["id"] for v in self.store.list_router_versions()}:
                self.store.record_router_version(
                    meta["id"],
                    str(artifacts.router_dir(self.data_dir) / meta["id"]),
                    metrics=meta["metrics"],
                    sample_counts=meta["samples"]["by_source"],
                    parent_id=meta.get("parent"),
                    active=active,
                )
            if active:
                self.store.set_active_router_version(meta["id"])
        except Exception as exc:  # noqa: BLE001 - see above
            self._progress(f"router: could not record version {meta['id']} in the log ({exc})")

    # -- training ----------------------------------------------------------------------------------
    def train(self, extra_examples: list[LabelledPrompt] | None = None, activate: bool = True) -> dict[str, Any]:
        """Train a new version on the seed set plus ``extra_examples`` (which win on duplicates)."""
        parent = artifacts.read_active(self.data_dir)
        artifact = train_router(
            self.config,
            self.datasets.seed() + list(extra_examples or []),
            resources=self._resources(),
            parent=parent,
            progress=self._progress,
            seed_file=self.datasets.seed_file_info(),
        )
        if not self.calibrate_on_dev(artifact):
            self._carry_threshold(parent, artifact)
        if activate:
            self.activate(artifact.version_id)
        else:
            self._record(artifact.meta, active=False)
        return dict(artifact.meta)

    def _carry_threshold(self, parent: str | None, artifact: artifacts.RouterArtifact) -> None:
        """Without a development set a new version keeps its parent's fallback policy: a calibrated
        threshold is recalibrated on the new version's held-out set (same precision target), a hand-set
        one is inherited. Without this a retrain would silently fall back to spaces.yaml's threshold."""
        if parent is None:
            return
        try:
            parent_meta = artifacts.read_meta(self.data_dir, parent)
        except artifacts.RouterArtifactError:
            return
        if parent_meta.get("threshold") is None:
            return
        changes = {"threshold": parent_meta["threshold"], "threshold_set_by": f"inherited from {parent}"}
        calibration = parent_meta.get("calibration")
        if calibration:
            target = calibration.get("target_precision", self.config.router.target_precision)
            try:
                conf, correct = self.scores(self.make_router(artifact))
                result = pick_threshold(conf, correct, target)
                changes = {
                    "threshold": result["threshold"],
                    "calibration": result,
                    "threshold_set_by": f"recalibration after retrain (target {target})",
                }
            except ValueError:
                pass  # no held-out prompts to recalibrate on: keep the parent's value
        artifacts.update_meta(self.data_dir, artifact.version_id, **changes)
        artifact.meta.update(changes)

    def retrain(self, extra_examples: list[LabelledPrompt] | None = None, *, force: bool = False) -> dict[str, Any]:
        """Train a candidate; evaluate it and the active version on the candidate's held-out set; promote
        the candidate only if its macro-F1 there is not worse (or ``force``)."""
        try:
            active: Router | None = self.router()
        except RouterUnavailableError:
            active = None
        meta = self.train(extra_examples, activate=False)
        candidate = self.make_router(self.load(meta["id"]))
        heldout = [from_heldout_row(r) for r in candidate.artifact.heldout()[0]]
        if not heldout:
            raise ValueError("the candidate has no held-out prompts to compare on: add more labelled prompts")
        cand_metrics = evaluate(candidate, heldout)
        active_metrics = evaluate(active, heldout) if active is not None else None
        promoted, why = should_promote(cand_metrics, active_metrics, force=force)
        if promoted:
            self.activate(meta["id"])
        artifacts.update_meta(
            self.data_dir,
            meta["id"],
            comparison={
                "against": active.version_id if active else None,
                "candidate": _summary(cand_metrics),
                "active": _summary(active_metrics) if active_metrics else None,
                "promoted": promoted,
                "why": why,
            },
        )
        return {
            "candidate": meta["id"],
            "active_before": active.version_id if active else None,
            "promoted": promoted,
            "why": why,
            "heldout_n": len(heldout),
            "candidate_metrics": cand_metrics,
            "active_metrics": active_metrics,
            "samples": meta["samples"],
            "artifact_path": str(candidate.artifact.path),
            "parent": meta["parent"],
        }

    # -- threshold ---------------------------------------------------------------------------------
    def calibrate_on_dev(self, artifact: artifacts.RouterArtifact, target: float | None = None) -> dict | None:
        """Calibrate ``artifact`` on the development set (temperature and threshold, report kept in its
        metadata); None when no development set is configured."""
        dev = self.datasets.dev()
        if not dev:
            return None
        self._progress(f"router: calibrating on the development set ({len(dev)} prompts)")
        raw = artifact.raw_proba([ex.prompt for ex in dev], self._resources())
        changes = calibrate_on_examples(
            raw,
            artifact.categories,
            dev,
            target_precision=self.config.router.target_precision if target is None else target,
            fallback=self.config.fallback_category,
            confidence_kind=self.config.router.confidence,
        )
        artifacts.update_meta(self.data_dir, artifact.version_id, **changes)
        artifact.meta.update(changes)
        return changes["calibration"]

    def scores(self, router: Router) -> tuple[np.ndarray, np.ndarray]:
        """Confidence and correctness of the top choice on the prompts the threshold is judged on: the
        development set when there is one (what the threshold is calibrated on), else the held-out split."""
        key = f"{router.version_id}@{router.artifact.temperature}"
        cached = self._scores_cache.get(key)
        if cached is None:
            dev = self.datasets.dev()
            if dev:
                proba = router.predict_proba([ex.prompt for ex in dev], use_cache=False)
                truth = [ex.category for ex in dev]
            else:
                examples, proba = router.artifact.heldout()
                truth = [ex["category"] for ex in examples]
            if not truth:
                raise ValueError(f"router {router.version_id} has no held-out prompts: retrain with more data")
            cached = top_choice_scores(proba, router.categories, truth, router.confidence_kind)
            self._scores_cache[key] = cached
        return cached

    def update_active(self, **changes: Any) -> dict[str, Any]:
        """Write ``changes`` into the active version's metadata (in this process at once)."""
        with self._lock:
            router = self.router()
            meta = artifacts.update_meta(self.data_dir, router.version_id, **changes)
            router.artifact.meta.update(changes)
        return meta


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("n", "accuracy", "macro_f1")}
