"""Two-step routing as a service for the engine and the app: a thin facade over the category router's
versions (versions.py), the mapping state (mapping_state.py), the labelled data (datasets.py), the
decisions (decisions.py) and the threshold (calibration.py).

Cheap to construct (nothing loads until first use or :meth:`RoutingService.warm_up`). On a fresh data
directory the first use trains a router from the seed set (about 20 s on 2 cores) and says so through ``progress``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coe_core.config import CoEConfig
from coe_core.errors import InvalidRequest
from coe_core.events import RouteDecision
from coe_core.labelled import LabelledPrompt
from coe_core.routing import decisions
from coe_core.routing.calibration import pick_threshold, threshold_effect
from coe_core.routing.datasets import Datasets
from coe_core.routing.embedder import get_embedder
from coe_core.routing.features import TOKEN_WINDOW, Resources, feature_resources
from coe_core.routing.mapping import MappingResult
from coe_core.routing.mapping_state import MappingState
from coe_core.routing.router import Router
from coe_core.routing.text import routed_text
from coe_core.routing.training import print_progress
from coe_core.routing.versions import RouterUnavailableError, RouterVersions

__all__ = ["RoutingService", "RouterUnavailableError"]


def default_feature_cache() -> Path:
    """Where built feature resources (the token table) are kept: ``COE_CACHE_DIR`` or
    ``~/.cache/coe-playground``, shared by every data dir of the machine (it depends only on the GGUF
    it was built from, and building it takes about 40 s)."""
    root = os.environ.get("COE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "coe-playground")
    return Path(root) / "router-features"


class RoutingService:
    """What the engine, the app and the CLI call for routing: step 1 (category), step 2 (expert), the
    mapping under its active-parameter budget, router versions, training and the fallback threshold.

    ``store`` (the interaction log, optional) is where router versions record themselves when they
    are trained or activated; ``available_experts``, ``expert_params`` and ``traffic_distribution``
    come from the engine and feed the mapping. Thread-safe for routing; training and activation lock the
    versions themselves. Errors a user can cause are ``ValueError``s with a message that says what to do:
    ``RouterUnavailableError`` (no router can be loaded or trained), ``RouterArtifactError`` (a version that
    does not fit the config), ``ScoreTableError`` (a broken score table).
    """

    def __init__(
        self,
        config: CoEConfig,
        *,
        available_experts: Callable[[], set[str]] | None = None,
        expert_params: Callable[[], dict[str, int]] | None = None,
        progress: Callable[[str], None] | None = None,
        traffic_distribution: Callable[[], dict[str, int]] | None = None,
        store: Any | None = None,
    ) -> None:
        self.config = config
        self._progress = progress or print_progress
        self.datasets = Datasets(config)
        self.versions = RouterVersions(
            config, datasets=self.datasets, resources=self.resources, progress=self._progress, store=store
        )
        self.mapping = MappingState(
            config,
            training_categories=lambda: [ex.category for ex in self.datasets.seed()],
            available_experts=available_experts,
            expert_params=expert_params,
            traffic_distribution=traffic_distribution,
            progress=self._progress,
        )

    # -- loading -----------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """The data directory router versions and the applied mapping live in."""
        return self.config.data_path

    @property
    def feature_cache(self) -> Path:
        """Where built feature resources are cached, shared by every data dir of the machine."""
        return default_feature_cache()

    def resources(self) -> Resources:
        """The process-wide resources the configured feature blocks read (built on first use, about 40 s for
        the token table). Raises ``TokenTableError`` / ``EmbedderError`` when a configured block cannot be built."""
        r = self.config.router
        return feature_resources(
            r.features,
            token_source=r.token_table,
            cache_dir=self.feature_cache,
            progress=self._progress,
            sentence=lambda: get_embedder(r.embedder, r.max_seq_tokens, r.threads),
        )

    def router(self) -> Router:
        """The active router (loaded, or trained from the seed set on first use). Raises
        ``RouterUnavailableError`` when there is none and none can be trained (no seed data, broken features)."""
        return self.versions.router()

    def router_loaded(self) -> bool:
        """Whether a router is in memory already (readiness), without loading one."""
        return self.versions._router is not None

    def warm_up(self) -> None:
        """Load the feature resources and the active router (training one if there is none) and solve the mapping
        once, so the first prompt pays for neither. Raises ``RouterUnavailableError`` like :meth:`router`."""
        self.router().classify(["warm up the features and the classifier"], use_cache=False)
        self.current_mapping()  # the first MILP solve is not part of the first prompt's latency

    # -- labelled data -----------------------------------------------------------------------------
    def seed_labelled(self) -> list[LabelledPrompt]:
        """The training prompts (``router.seed_data``); raises ``ValueError`` naming a missing or bad file."""
        return self.datasets.seed()

    def dev_labelled(self) -> list[LabelledPrompt]:
        """The development set (``router.dev_data``), empty when none is configured."""
        return self.datasets.dev()

    def seed_examples(self) -> list[tuple[str, str]]:
        """(prompt, category) of the training data (the app plots them)."""
        return [(ex.prompt, ex.category) for ex in self.datasets.seed()]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Dense vectors of ``texts`` for maps (the explorer's PCA), one row per text: the multilingual
        token-table block when it is configured, else the sentence embedder. Raises like :meth:`router`."""
        res = self.resources()
        if res.token_table is not None:  # with the active version's IDF weights when it has them
            idf = getattr(self.router().artifact.model.features, "_token_idf", None)
            return res.token_table.pooled(texts, TOKEN_WINDOW, idf)
        r = self.config.router
        return get_embedder(r.embedder, r.max_seq_tokens, r.threads).embed(texts)

    # -- step 1 + step 2 ---------------------------------------------------------------------------
    def decide(self, messages: list[dict], overrides: dict | None = None) -> RouteDecision:
        """Route one conversation: its routed text (latest user turn plus context) -> category -> expert.

        ``overrides``: ``{"category": c}`` or ``{"expert": e}`` forced by the user. Without a router (none can
        be trained) the default expert serves, and the decision says why. Raises ``ValueError`` for an unknown
        override key, category or expert, or messages without a user turn.
        """
        cfg = self.config
        text = routed_text(messages, cfg.router.context_turns, cfg.router.context_chars)
        forced = decisions.check_overrides(cfg, overrides)
        try:
            router = self.router()  # first use loads (or trains) it: not part of the latency
        except RouterUnavailableError as exc:
            return decisions.default_decision(cfg, text, forced, str(exc), time.perf_counter())
        start = time.perf_counter()
        cls = router.classify([text])[0]
        return decisions.decision(cfg, router, cls, text, forced, self.current_mapping(), start)

    def route_many(self, texts: list[str]) -> list[RouteDecision]:
        """Route many single prompts at once (batched features); one decision per text, in order, each with
        the average latency. Raises ``RouterUnavailableError`` like :meth:`router`, ``ValueError`` for an
        empty text."""
        start = time.perf_counter()
        cfg = self.config
        clean = [routed_text([{"role": "user", "content": t}], 0, cfg.router.context_chars) for t in texts]
        if not clean:
            return []
        router = self.router()
        mapping = self.current_mapping()
        out = [
            decisions.decision(cfg, router, cls, text, None, mapping, None)
            for cls, text in zip(router.classify(clean), clean, strict=True)
        ]
        per = (time.perf_counter() - start) * 1000 / len(out)
        for d in out:
            d.latency_ms = round(per, 3)
        return out

    def runner_up(self, decision: RouteDecision) -> str | None:
        """The expert of the second most likely category when it is within ``router.prefetch_margin``
        of the winner and differs from the chosen expert (the engine may prefetch it)."""
        return decisions.runner_up(decision, self.current_mapping().assignment, self.config.router.prefetch_margin)

    # -- mapping -----------------------------------------------------------------------------------
    def measured_scores_path(self) -> Path:
        """Where ``coe eval-experts`` writes this profile's measured score table (in the data dir)."""
        return self.mapping.measured_scores_path()

    def score_table(self) -> dict[str, Any]:
        """The score table in use: ``{"scores": {expert: {category: score}}, "params", "method", "path"}``
        (empty scores and path None when there is none; a broken file is reported in the mapping's notes)."""
        return self.mapping.score_table()

    def current_mapping(self) -> MappingResult:
        """The category -> expert mapping now (cached until availability, sizes, budget or traffic change)."""
        return self.mapping.current()

    def set_active_params_budget(self, budget: int | str | None, *, persist: bool = False) -> MappingResult:
        """Set the mapping's limit on average active parameters per prompt (``300M``, ``1.5B``, a number, or
        None/``auto`` for none) and return the mapping it gives; ``persist`` (the app's "Apply mapping") keeps it
        in the data dir across restarts. Raises ``ValueError`` for a value that is not a parameter count."""
        return self.mapping.set_active_params_budget(budget, persist=persist)

    @property
    def active_params_budget(self) -> int | None:
        """The mapping's limit on average active parameters per prompt (None: no limit)."""
        return self.mapping.active_params_budget

    def frontier(self) -> list[dict[str, Any]]:
        """The Pareto frontier of mappings, cheapest first: ``{avg_active_params, expected_score, assignment}``."""
        return self.mapping.frontier()

    # -- versions ----------------------------------------------------------------------------------
    def active_version(self) -> dict[str, Any]:
        """The active router version's metadata (id, metrics, samples, threshold, ...); loads or trains it
        first, so raises ``RouterUnavailableError`` like :meth:`router`."""
        return self.versions.active_version()

    def list_versions(self) -> list[dict[str, Any]]:
        """Every trained version's metadata with ``active`` set on the active one, oldest first."""
        return self.versions.list_versions()

    def activate(self, version_id: str) -> dict[str, Any]:
        """Make ``version_id`` active here and in the log and return its metadata. Raises
        ``RouterArtifactError`` for an unknown version or one that does not fit the config's categories."""
        return self.versions.activate(version_id)

    def train(self, extra_examples: list[LabelledPrompt] | None = None, activate: bool = True) -> dict[str, Any]:
        """Train a new version on the seed set plus ``extra_examples`` (which win on duplicates), activate it
        unless ``activate`` is False, and return its metadata. Raises ``ValueError`` when the data cannot train a
        router (too few prompts in a category)."""
        return self.versions.train(extra_examples, activate)

    def retrain(self, extra_examples: list[LabelledPrompt] | None = None, *, force: bool = False) -> dict[str, Any]:
        """Train a candidate and promote it only if its held-out macro-F1 is not worse (or ``force``). Returns
        the comparison (``promoted``, both versions' metrics); raises ``ValueError`` like :meth:`train` or when
        the candidate has no held-out prompts."""
        return self.versions.retrain(extra_examples, force=force)

    def retrain_from_log(self, *, force: bool = False) -> dict[str, Any]:
        """``coe retrain`` and the app's Retrain button: the seed set plus the labelled feedback of this
        service's log -> a candidate, promoted only if not worse (or ``force``). Returns :meth:`retrain`'s result
        plus ``feedback_prompts`` (how many came from the log); raises like :meth:`retrain`."""
        store = self.versions.store
        extra: list[LabelledPrompt] = []
        if store is not None:
            from coe_core.store.queries import labelled_prompts

            extra = labelled_prompts(store, self.config.categories, self.config.fallback_category)
        self._progress(f"retrain: {len(extra)} labelled prompts from the log; training a candidate")
        result = self.retrain(extra, force=force)
        result["feedback_prompts"] = len(extra)
        return result

    # -- threshold ---------------------------------------------------------------------------------
    def threshold_effect(self, t: float) -> dict[str, Any]:
        """Routed precision and coverage of the active version at threshold ``t`` on the development set
        (or, without one, the held-out split). Raises ``ValueError`` when the version has neither."""
        conf, correct = self.versions.scores(self.router())
        return threshold_effect(conf, correct, t)

    def set_threshold(self, t: float, *, source: str = "manual", calibration: dict | None = None) -> dict[str, Any]:
        """Persist ``t`` into the active version's metadata (it then wins over spaces.yaml) and return that
        metadata. Raises ``ValueError`` unless ``t`` is a number between 0 and 1."""
        if not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise InvalidRequest(f"threshold must be a number between 0 and 1, not {t!r}")
        changes: dict[str, Any] = {"threshold": float(t), "threshold_set_by": source}
        if calibration is not None:
            changes["calibration"] = calibration
        return self.versions.update_active(**changes)

    def calibrate(self, target_precision: float | None = None) -> dict[str, Any]:
        """Pick the lowest threshold whose routed precision reaches ``target_precision`` (default:
        ``router.target_precision``) and persist it: on the development set (``router.dev_data``) when there is
        one, else on the held-out split. Returns the pick (threshold, precision, coverage) and the version id;
        raises ``ValueError`` when there is nothing to calibrate on."""
        target = self.config.router.target_precision if target_precision is None else target_precision
        router = self.router()
        result = self.versions.calibrate_on_dev(router.artifact, target)
        if result is None:
            conf, correct = self.versions.scores(router)
            result = pick_threshold(conf, correct, target)
            self.set_threshold(
                result["threshold"],
                source="coe calibrate-router (held-out split)",
                calibration={**result, "on": "held-out split"},
            )
        return {**result, "router_version": router.version_id}
