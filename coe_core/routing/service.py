"""Two-step routing as a service for the engine and the app: category router + category->expert mapping.

Cheap to construct (nothing loads until first use or :meth:`RoutingService.warm_up`). On a fresh data
directory the first use trains a router from the seed set (seconds) and says so through ``progress``.
The in-memory router is swapped atomically, so a running process can switch versions (``activate``,
or another process changing ``active.json``) without a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coe_core.config import CoEConfig, parse_params
from coe_core.events import RouteDecision
from coe_core.routing import artifact as store
from coe_core.routing.calibration import pick_threshold
from coe_core.routing.calibration import threshold_effect as _threshold_effect
from coe_core.routing.classifier import confidence
from coe_core.routing.embedder import Embedder, get_embedder
from coe_core.routing.mapping import (
    MappingProblem,
    MappingResult,
    ScoreTable,
    ScoreTableError,
    frontier,
    load_score_table,
    optimise,
)
from coe_core.routing.router import Classification, Router
from coe_core.routing.training import (
    LabelledPrompt,
    evaluate,
    load_labelled_jsonl,
    print_progress,
    should_promote,
    train_router,
)

#: how long a traffic distribution read from the store is reused (it changes slowly; reading costs a query)
TRAFFIC_TTL_S = 60.0


class RouterUnavailableError(ValueError):
    """No router can be loaded or trained (e.g. no seed data); the message says what to do."""


def routed_text(messages: list[dict[str, Any]], context_turns: int, context_chars: int) -> str:
    """The latest user turn, then up to ``context_turns`` earlier user turns (newest first), capped.

    The latest turn goes first because the embedder truncates at ``router.max_seq_tokens``: what the
    user asks now must never be the part that is cut off.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
    users = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    if not users or not users[-1].strip():
        raise ValueError("empty prompt: the latest user message has no text; type a question or instruction")
    parts = [users[-1].strip()] + [u.strip() for u in reversed(users[:-1]) if u.strip()][:context_turns]
    return "\n".join(parts)[:context_chars]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


class RoutingService:
    def __init__(
        self,
        config: CoEConfig,
        *,
        available_experts: Callable[[], set[str]] | None = None,
        expert_params: Callable[[], dict[str, int]] | None = None,
        progress: Callable[[str], None] | None = None,
        traffic_distribution: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.config = config
        self._available_experts = available_experts
        self._expert_params = expert_params
        self._progress = progress or print_progress
        self._traffic_distribution = traffic_distribution
        self._budget: int | None = None if config.mapping.budget == "auto" else int(config.mapping.budget)
        if not os.environ.get("COE_MAPPING_BUDGET") and self._applied_budget_path().exists():
            # a budget applied in the app outlives a restart; COE_MAPPING_BUDGET (the operator's) still wins
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                saved = json.loads(self._applied_budget_path().read_text())["budget"]
                self._budget = None if saved is None else int(saved)
        self._lock = threading.RLock()
        self._router: Router | None = None
        self._active_mtime: tuple[int, int] | None = None
        self._seed: list[LabelledPrompt] | None = None
        self._traffic: tuple[float, dict[str, int]] | None = None
        self._mapping_cache: tuple[Any, MappingResult] | None = None
        self._heldout_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._score_table_error: str | None = None
        self._seed_distribution: tuple[dict[str, float], str] | None = None

    # -- loading ---------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.config.data_path

    @property
    def embedder(self) -> Embedder:
        return get_embedder(
            self.config.router.embedder, self.config.router.max_seq_tokens, self.config.router.threads
        )

    def warm_up(self) -> None:
        """Load the embedder and the active router (training one from the seed set if there is none)."""
        router = self._ensure_router()
        router.classify(["warm up the embedder and the classifier"], use_cache=False)
        self.current_mapping()  # the first MILP solve is not part of the first prompt's latency

    def _make_router(self, artifact: store.RouterArtifact) -> Router:
        return Router(
            artifact,
            self.embedder,
            config_threshold=self.config.router.threshold,
            confidence_kind=self.config.router.confidence,
            fallback_category=self.config.fallback_category,
        )

    def _active_file_mtime(self) -> tuple[int, int] | None:
        """Signature of active.json: it is replaced atomically (new inode) on every write, so the inode
        tells two writes apart even within one tick of the file system's clock."""
        try:
            st = os.stat(store.router_dir(self.data_dir) / "active.json")
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _ensure_router(self) -> Router:
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
        active = store.read_active(self.data_dir)
        if active is not None:
            try:
                return self._make_router(self._load(active))
            except store.RouterArtifactError as exc:
                self._progress(f"router: active version unusable: {exc}")
        for meta in reversed(store.list_versions(self.data_dir)):
            try:
                store.check_compatible(meta, cfg.router.embedder, cfg.categories)
            except store.RouterArtifactError:
                continue
            self._progress(f"router: activating {meta['id']}, the newest version that fits this config")
            store.write_active(self.data_dir, meta["id"])
            return self._make_router(self._load(meta["id"]))
        self._progress(
            "router: no trained router for this config yet; training one from the seed set "
            f"({cfg.router.seed_data}), this takes a few seconds"
        )
        try:
            examples = self.seed_labelled()
        except (FileNotFoundError, ValueError) as exc:
            raise RouterUnavailableError(f"no router and none can be trained: {exc}") from None
        try:
            artifact = train_router(cfg, examples, progress=self._progress, seed_file=self._seed_file_info())
        except ValueError as exc:
            raise RouterUnavailableError(f"no router and none can be trained: {exc}") from None
        store.write_active(self.data_dir, artifact.version_id)
        return self._make_router(artifact)

    def _load(self, version_id: str) -> store.RouterArtifact:
        return store.load_artifact(
            self.data_dir, version_id, embedder=self.config.router.embedder, categories=self.config.categories
        )

    # -- seed data -------------------------------------------------------------------------------
    def _seed_path(self) -> Path:
        return self.config.resolve_path(self.config.router.seed_data)

    def _seed_file_info(self) -> dict[str, Any]:
        path = self._seed_path()
        data = load_labelled_jsonl(path, self.config.categories)
        # labels of the file that are not categories of spaces.yaml (a taxonomy typo shows up here)
        return {"path": str(path), "sha256": data.sha256, "outside_taxonomy": data.outside_taxonomy}

    def seed_labelled(self) -> list[LabelledPrompt]:
        if self._seed is None:
            self._seed = load_labelled_jsonl(self._seed_path(), self.config.categories).examples
        return list(self._seed)

    def seed_examples(self) -> list[tuple[str, str]]:
        """(prompt, category) of the seed set (the app plots them)."""
        return [(ex.prompt, ex.category) for ex in self.seed_labelled()]

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts)

    # -- step 1 + step 2 -------------------------------------------------------------------------
    def _check_overrides(self, overrides: dict | None) -> dict[str, str] | None:
        if not overrides:
            return None
        unknown_keys = set(overrides) - {"category", "expert"}
        if unknown_keys:
            raise ValueError(
                f"unknown override {sorted(unknown_keys)}: use {{'category': c}} or {{'expert': e}}"
            )
        cat, expert = overrides.get("category"), overrides.get("expert")
        if cat is not None and cat not in self.config.all_categories:
            raise ValueError(
                f"unknown category {cat!r}; valid categories: {', '.join(self.config.all_categories)}"
            )
        if expert is not None and expert not in self.config.experts:
            raise ValueError(f"unknown expert {expert!r}; valid experts: {', '.join(self.config.experts)}")
        return {k: v for k, v in overrides.items() if v is not None}

    def decide(self, messages: list[dict], overrides: dict | None = None) -> RouteDecision:
        cfg = self.config
        text = routed_text(messages, cfg.router.context_turns, cfg.router.context_chars)
        forced = self._check_overrides(overrides)
        try:
            router = self._ensure_router()  # first use loads (or trains) it: not part of the latency
        except RouterUnavailableError as exc:
            return self._default_decision(text, forced, str(exc), time.perf_counter())
        start = time.perf_counter()
        cls = router.classify([text])[0]
        return self._decision(router, cls, text, forced, self.current_mapping(), start)

    def route_many(self, texts: list[str]) -> list[RouteDecision]:
        """Route many single prompts at once (batched embedding)."""
        start = time.perf_counter()
        cfg = self.config
        clean = [routed_text([{"role": "user", "content": t}], 0, cfg.router.context_chars) for t in texts]
        if not clean:
            return []
        router = self._ensure_router()
        results = router.classify(clean)
        mapping = self.current_mapping()
        decisions = [
            self._decision(router, cls, text, None, mapping, None)
            for cls, text in zip(results, clean, strict=True)
        ]
        per = (time.perf_counter() - start) * 1000 / len(decisions)
        for d in decisions:
            d.latency_ms = round(per, 3)
        return decisions

    def _decision(
        self,
        router: Router,
        cls: Classification,
        text: str,
        forced: dict[str, str] | None,
        mapping: MappingResult,
        start: float | None,
    ) -> RouteDecision:
        cfg = self.config
        category = (forced or {}).get("category", cls.category)
        expert = mapping.assignment.get(category, cfg.active_profile.default_expert)
        top = f"{cls.top_category} ({cls.probabilities[cls.top_category]:.2f})"
        if forced and "expert" in forced:
            expert, reason = forced["expert"], "override-expert"
            why = f"{top}; expert {expert} chosen by the user"
        elif forced and "category" in forced:
            reason = "override-category"
            why = f"category {category} chosen by the user (router said {top}) -> {expert}"
        elif cls.fallback:
            reason = "fallback"
            why = (
                f"unsure: {top}, confidence {cls.confidence:.2f} < threshold {router.threshold:.2f} "
                f"({router.threshold_source}) -> {category} -> {expert} "
                f"({mapping.reasons.get(category, 'default expert')})"
            )
        elif mapping.reasons.get(category) == "mapping-override":
            reason = "mapping-override"
            why = f"{top} -> {expert}: set by mapping.overrides in spaces.yaml"
        else:
            reason = "mapped"
            why = f"{top} -> {expert}: {mapping.reasons.get(category, 'default expert')}"
        return RouteDecision(
            category=category,
            expert=expert,
            reason=reason,
            probabilities=cls.probabilities,
            confidence=cls.confidence,
            fallback=cls.fallback and not forced,
            latency_ms=round((time.perf_counter() - start) * 1000, 3) if start is not None else 0.0,
            threshold=router.threshold,
            override=forced,
            router_version=router.version_id,
            routed_text=text,
            explanation=why,
        )

    def _default_decision(
        self, text: str, forced: dict[str, str] | None, why: str, start: float
    ) -> RouteDecision:
        cfg = self.config
        expert = (forced or {}).get("expert", cfg.active_profile.default_expert)
        return RouteDecision(
            category=(forced or {}).get("category", cfg.fallback_category),
            expert=expert,
            reason="default",
            override=forced,
            routed_text=text,
            latency_ms=round((time.perf_counter() - start) * 1000, 3),
            explanation=f"no router yet ({why}); served by the default expert {expert}",
        )

    def runner_up(self, decision: RouteDecision) -> str | None:
        """The expert of the second most likely category when it is within ``router.prefetch_margin``
        of the winner and differs from the chosen expert (the engine may prefetch it)."""
        ranked = sorted(decision.probabilities.items(), key=lambda kv: -kv[1])
        if len(ranked) < 2 or decision.reason == "override-expert":
            return None
        (c1, p1), (c2, p2) = ranked[:2]
        if p1 - p2 > self.config.router.prefetch_margin:
            return None
        assignment = self.current_mapping().assignment
        for cat in (c2, c1) if decision.category == c1 else (c1, c2):
            expert = assignment.get(cat)
            if expert and expert != decision.expert:
                return expert
        return None

    # -- mapping ---------------------------------------------------------------------------------
    def measured_scores_path(self) -> Path:
        return self.data_dir / "scores" / f"{self.config.profile}.json"

    def _score_table(self) -> ScoreTable | None:
        """The measured table of this data dir (``coe eval-experts``) if it covers every expert and category
        of the profile (a run in progress does not), else the profile's ``scores`` file, else None."""
        measured = self.measured_scores_path()
        if measured.exists():
            try:
                table = load_score_table(measured)
                wanted = set(self.config.all_categories)
                if all(wanted <= set(table.scores.get(e, {})) for e in self.config.experts):
                    return table
            except ScoreTableError as exc:
                self._progress(f"router: ignoring measured scores: {exc}")
        if self.config.active_profile.scores:
            try:
                return load_score_table(self.config.resolve_path(self.config.active_profile.scores))
            except ScoreTableError as exc:
                # routing must keep serving: every category then goes to the default expert, and says so
                self._score_table_error = str(exc)
        return None

    def score_table(self) -> dict[str, Any]:
        table = self._score_table()
        if table is None:
            return {"scores": {}, "params": {}, "method": {}, "path": None}
        return {**table.to_dict(), "path": table.path}

    def _costs(self, table: ScoreTable | None) -> dict[str, int]:
        supplied = (self._expert_params() if self._expert_params else None) or {}
        costs = {}
        for expert in self.config.experts:
            n = supplied.get(expert) or (table.params.get(expert) if table else None)
            if n:
                costs[expert] = int(n)
        return costs

    def _distribution(self) -> tuple[dict[str, float], str]:
        if self._traffic_distribution is not None:
            now = time.monotonic()
            if self._traffic is None or now - self._traffic[0] > TRAFFIC_TTL_S:
                try:
                    self._traffic = (now, dict(self._traffic_distribution() or {}))
                except Exception as exc:  # the log is down: routing keeps serving on the last known counts
                    self._progress(f"router: traffic counts unavailable ({exc}); using the last known ones")
                    self._traffic = (now, self._traffic[1] if self._traffic else {})
            counts = self._traffic[1]
            total = sum(counts.values())
            if total >= self.config.mapping.min_traffic and total > 0:
                return {
                    c: counts.get(c, 0) / total for c in self.config.all_categories
                }, f"logged traffic ({total} turns)"
        if self._seed_distribution is None:
            try:
                seed = Counter(ex.category for ex in self.seed_labelled())
                total = sum(seed.values())
                dist = {c: seed.get(c, 0) / total for c in self.config.all_categories}
                self._seed_distribution = (dist, "seed set")
            except (FileNotFoundError, ValueError):
                self._seed_distribution = ({c: 1.0 for c in self.config.categories}, "uniform (no seed set)")
        return self._seed_distribution

    def _problem(self) -> tuple[MappingProblem, str, ScoreTable | None]:
        cfg = self.config
        table = self._score_table()
        costs = self._costs(table)
        available = self._available_experts() if self._available_experts else set(cfg.experts)
        unavailable = set(cfg.experts) - set(available)
        dist, source = self._distribution()
        notes = []
        scores = {e: row for e, row in (table.scores if table else {}).items() if e in cfg.experts}
        if table is None:
            notes.append(
                "no score table: every category goes to the default expert (run `coe eval-experts`)"
                + (f"; {self._score_table_error}" if self._score_table_error else "")
            )
        for e in cfg.experts:
            if table is not None and e not in table.scores:
                notes.append(f"expert {e} has no scores in {table.path}: not mapped (run `coe eval-experts`)")
            if e not in costs:
                notes.append(f"expert {e} has no parameter count: not mapped")
        problem = MappingProblem(
            cfg.categories,
            cfg.fallback_category,
            scores,
            costs,
            dist,
            overrides=dict(cfg.mapping.overrides),
            generalists={e for e, x in cfg.experts.items() if x.generalist},
            unavailable=unavailable,
            default_expert=cfg.active_profile.default_expert,
            notes=notes,
        )
        return problem, source, table

    def current_mapping(self) -> MappingResult:
        available = frozenset(self._available_experts()) if self._available_experts else None
        params = tuple(sorted((self._expert_params() or {}).items())) if self._expert_params else None
        dist, _ = self._distribution()
        key = (available, params, self._budget, tuple(sorted(dist.items())))
        cached = self._mapping_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        problem, source, table = self._problem()
        result = optimise(problem, self._budget)
        result.distribution_source = source
        result.score_table = table.path if table else None
        self._mapping_cache = (key, result)
        return result

    def set_budget(self, budget: int | str | None, *, persist: bool = False) -> MappingResult:
        """Average active-parameter budget (``300M``, ``1.5B``, a number, or None/``auto`` for no limit).

        ``persist`` (the app's "Apply mapping") keeps it in the data dir across restarts.
        """
        if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
            self._budget = None
        else:
            self._budget = parse_params(budget, "mapping budget")
        if persist:
            path = self._applied_budget_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"budget": self._budget, "applied_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return self.current_mapping()

    def _applied_budget_path(self) -> Path:
        return self.data_dir / "mapping.json"

    @property
    def budget(self) -> int | None:
        return self._budget

    def frontier(self) -> list[dict[str, Any]]:
        return frontier(self._problem()[0])

    # -- versions --------------------------------------------------------------------------------
    def active_version(self) -> dict[str, Any]:
        return dict(self._ensure_router().artifact.meta)

    def list_versions(self) -> list[dict[str, Any]]:
        active = store.read_active(self.data_dir)
        return [{**m, "active": m["id"] == active} for m in store.list_versions(self.data_dir)]

    def activate(self, version_id: str) -> dict[str, Any]:
        """Make ``version_id`` the active router, in this process at once (raises when it does not fit)."""
        with self._lock:
            router = self._make_router(self._load(version_id))
            store.write_active(self.data_dir, version_id)
            self._router, self._active_mtime = router, self._active_file_mtime()
        return dict(router.artifact.meta)

    def train(
        self, extra_examples: list[LabelledPrompt] | None = None, activate: bool = True
    ) -> dict[str, Any]:
        """Train a new version on the seed set plus ``extra_examples`` (which win on duplicates)."""
        parent = store.read_active(self.data_dir)
        artifact = train_router(
            self.config,
            self.seed_labelled() + list(extra_examples or []),
            parent=parent,
            progress=self._progress,
            seed_file=self._seed_file_info(),
        )
        self._carry_threshold(parent, artifact)
        if activate:
            self.activate(artifact.version_id)
        return dict(artifact.meta)

    def _carry_threshold(self, parent: str | None, artifact: store.RouterArtifact) -> None:
        """A new version keeps its parent's fallback policy: a calibrated threshold is recalibrated on
        the new version's held-out set (same precision target), a hand-set one is inherited. Without
        this a retrain would silently fall back to spaces.yaml's threshold."""
        if parent is None:
            return
        try:
            parent_meta = store.read_meta(self.data_dir, parent)
        except store.RouterArtifactError:
            return
        if parent_meta.get("threshold") is None:
            return
        changes = {"threshold": parent_meta["threshold"], "threshold_set_by": f"inherited from {parent}"}
        calibration = parent_meta.get("calibration")
        if calibration:
            target = calibration.get("target_precision", self.config.router.target_precision)
            try:
                conf, correct = self._heldout_scores(self._make_router(artifact))
                result = pick_threshold(conf, correct, target)
                changes = {
                    "threshold": result["threshold"],
                    "calibration": result,
                    "threshold_set_by": f"recalibration after retrain (target {target})",
                }
            except ValueError:
                pass  # no held-out prompts to recalibrate on: keep the parent's value
        store.update_meta(self.data_dir, artifact.version_id, **changes)
        artifact.meta.update(changes)

    def retrain(
        self, extra_examples: list[LabelledPrompt] | None = None, *, force: bool = False
    ) -> dict[str, Any]:
        """Train a candidate; evaluate it and the active version on the candidate's held-out set; promote
        the candidate only if its macro-F1 there is not worse (or ``force``)."""
        try:
            active: Router | None = self._ensure_router()
        except RouterUnavailableError:
            active = None
        meta = self.train(extra_examples, activate=False)
        candidate = self._make_router(self._load(meta["id"]))
        heldout = [
            LabelledPrompt(r["prompt"], r["category"], r.get("source", ""), r.get("group", ""))
            for r in candidate.artifact.heldout()[0]
        ]
        if not heldout:
            raise ValueError("the candidate has no held-out prompts to compare on: add more labelled prompts")
        cand_metrics = evaluate(candidate, heldout)
        active_metrics = evaluate(active, heldout) if active is not None else None
        promoted, why = should_promote(cand_metrics, active_metrics, force=force)
        if promoted:
            self.activate(meta["id"])
        store.update_meta(
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

    def retrain_from_log(self, store: Any | None = None, *, force: bool = False) -> dict[str, Any]:
        """``coe retrain`` and the app's Retrain button: the seed set plus the log's labelled feedback ->
        a candidate, promoted only if not worse (or ``force``); the version is recorded in ``store``."""
        extra: list[LabelledPrompt] = []
        if store is not None:
            from coe_core.store.queries import labelled_prompts

            extra = labelled_prompts(store, self.config.categories)
        self._progress(f"retrain: {len(extra)} labelled prompts from the log; training a candidate")
        result = self.retrain(extra, force=force)
        result["feedback_prompts"] = len(extra)
        meta = next(m for m in self.list_versions() if m["id"] == result["candidate"])
        record_version(store, meta, result["artifact_path"], active=result["promoted"])
        return result

    # -- threshold -------------------------------------------------------------------------------
    def _heldout_scores(self, router: Router) -> tuple[np.ndarray, np.ndarray]:
        cached = self._heldout_cache.get(router.version_id)
        if cached is None:
            examples, proba = router.artifact.heldout()
            if not examples:
                raise ValueError(
                    f"router {router.version_id} has no held-out prompts: retrain with more data"
                )
            pred = [router.categories[i] for i in proba.argmax(axis=1)]
            correct = np.array([p == ex["category"] for p, ex in zip(pred, examples, strict=True)])
            cached = (confidence(proba, router.confidence_kind), correct)
            self._heldout_cache[router.version_id] = cached
        return cached

    def threshold_effect(self, t: float) -> dict[str, Any]:
        """Held-out routed precision and coverage of the active version at threshold ``t``."""
        conf, correct = self._heldout_scores(self._ensure_router())
        return _threshold_effect(conf, correct, t)

    def set_threshold(
        self, t: float, *, source: str = "manual", calibration: dict | None = None
    ) -> dict[str, Any]:
        """Persist ``t`` into the active version's metadata (it then wins over spaces.yaml)."""
        if not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f"threshold must be a number between 0 and 1, not {t!r}")
        with self._lock:
            router = self._ensure_router()
            changes: dict[str, Any] = {"threshold": float(t), "threshold_set_by": source}
            if calibration is not None:
                changes["calibration"] = calibration
            meta = store.update_meta(self.data_dir, router.version_id, **changes)
            router.artifact.meta.update(changes)
        return meta

    def calibrate(self, target_precision: float | None = None) -> dict[str, Any]:
        """Pick the lowest threshold whose held-out routed precision reaches the target; persist it."""
        target = self.config.router.target_precision if target_precision is None else target_precision
        router = self._ensure_router()
        conf, correct = self._heldout_scores(router)
        result = pick_threshold(conf, correct, target)
        self.set_threshold(result["threshold"], source="coe calibrate-router", calibration=result)
        return {**result, "router_version": router.version_id}


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("n", "accuracy", "macro_f1")}


def record_version(store: Any | None, meta: dict[str, Any], artifact_path: str, active: bool) -> None:
    """Record a router version in the interaction log (its ``router_versions`` table), if there is one."""
    if store is None:
        return
    store.record_router_version(meta["id"], artifact_path, metrics=meta["metrics"],
                                sample_counts=meta["samples"]["by_source"], parent_id=meta.get("parent"),
                                active=active)
    if active:
        store.set_active_router_version(meta["id"])
