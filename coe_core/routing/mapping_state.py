"""Step 2 of routing as state: the score table in use, the category distribution (logged traffic or the
training data), the active-parameter budget (kept across restarts when applied in the app) and the
category -> expert mapping they give, cached until one of them changes."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coe_core.config import CoEConfig, parse_params
from coe_core.routing.artifact import write_json_atomic
from coe_core.routing.mapping import (
    MappingProblem,
    MappingResult,
    ScoreTable,
    ScoreTableError,
    frontier,
    load_score_table,
    optimise,
)

#: how long a traffic distribution read from the store is reused (it changes slowly; reading costs a query)
TRAFFIC_TTL_S = 60.0


class MappingState:
    def __init__(
        self,
        config: CoEConfig,
        *,
        training_categories: Callable[[], list[str]],
        available_experts: Callable[[], set[str]] | None = None,
        expert_params: Callable[[], dict[str, int]] | None = None,
        traffic_distribution: Callable[[], dict[str, int]] | None = None,
        progress: Callable[[str], None],
    ) -> None:
        self.config = config
        self._training_categories = training_categories
        self._available_experts = available_experts
        self._expert_params = expert_params
        self._traffic_distribution = traffic_distribution
        self._progress = progress
        #: average active parameters per prompt the mapping may cost (None: no limit); spaces.yaml's mapping.budget
        self._active_params_budget: int | None = None if config.mapping.budget == "auto" else int(config.mapping.budget)
        if "mapping.budget" not in config.from_env and self._applied_budget_path().exists():
            # a budget applied in the app outlives a restart; COE_MAPPING_BUDGET (the operator's) still wins
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                saved = json.loads(self._applied_budget_path().read_text())["budget"]
                self._active_params_budget = None if saved is None else int(saved)
        self._traffic: tuple[float, dict[str, int]] | None = None
        self._cache: tuple[Any, MappingResult] | None = None
        self._score_table_error: str | None = None
        self._training_distribution: tuple[dict[str, float], str] | None = None

    # -- score table -------------------------------------------------------------------------------
    def measured_scores_path(self) -> Path:
        return self.config.data_path / "scores" / f"{self.config.profile}.json"

    def table(self) -> ScoreTable | None:
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
        table = self.table()
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

    # -- category distribution ---------------------------------------------------------------------
    def distribution(self) -> tuple[dict[str, float], str]:
        """p_k of the optimiser: logged traffic once there is enough of it, else the training data's."""
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
        if self._training_distribution is None:
            try:
                seen = Counter(self._training_categories())
                total = sum(seen.values())
                dist = {c: seen.get(c, 0) / total for c in self.config.all_categories}
                self._training_distribution = (dist, "training data")
            except (FileNotFoundError, ValueError, ZeroDivisionError):
                self._training_distribution = ({c: 1.0 for c in self.config.categories}, "uniform (no training data)")
        return self._training_distribution

    # -- the mapping -------------------------------------------------------------------------------
    def problem(self) -> tuple[MappingProblem, str, ScoreTable | None]:
        cfg = self.config
        table = self.table()
        costs = self._costs(table)
        available = self._available_experts() if self._available_experts else set(cfg.experts)
        unavailable = set(cfg.experts) - set(available)
        dist, source = self.distribution()
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

    def current(self) -> MappingResult:
        available = frozenset(self._available_experts()) if self._available_experts else None
        params = tuple(sorted((self._expert_params() or {}).items())) if self._expert_params else None
        dist, _ = self.distribution()
        key = (available, params, self._active_params_budget, tuple(sorted(dist.items())))
        cached = self._cache
        if cached is not None and cached[0] == key:
            return cached[1]
        problem, source, table = self.problem()
        result = optimise(problem, self._active_params_budget)
        result.distribution_source = source
        result.score_table = table.path if table else None
        self._cache = (key, result)
        return result

    def set_active_params_budget(self, budget: int | str | None, *, persist: bool = False) -> MappingResult:
        """Average active-parameter budget (``300M``, ``1.5B``, a number, or None/``auto`` for no limit).

        ``persist`` (the app's "Apply mapping") keeps it in the data dir across restarts.
        """
        if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
            self._active_params_budget = None
        else:
            self._active_params_budget = parse_params(budget, "mapping budget")
        if persist:
            write_json_atomic(
                self._applied_budget_path(),
                {"budget": self._active_params_budget, "applied_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
            )
        return self.current()

    def _applied_budget_path(self) -> Path:
        return self.config.data_path / "mapping.json"

    @property
    def active_params_budget(self) -> int | None:
        return self._active_params_budget

    def frontier(self) -> list[dict[str, Any]]:
        return frontier(self.problem()[0])
