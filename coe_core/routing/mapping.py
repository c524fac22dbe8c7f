"""Step 2 of routing: which expert serves each category, under a budget on average active parameters.

Choose m: category -> expert maximising  sum_k p_k * S[m(k)][k]
                          subject to     sum_k p_k * cost[m(k)] <= B
with p the category distribution, S the expert score table and cost the expert's active parameters.
It is a small 0/1 program (one binary per category x expert, one choice per category), solved exactly
with scipy's MILP solver (HiGHS); the Pareto frontier is traced by re-solving with the budget just
below the cost of the previous optimum, which visits every non-dominated (cost, score) point.

Manual ``mapping.overrides`` are fixed before optimising. The fallback category is served by a
generalist (experts with ``generalist: true``): by the optimiser when the distribution gives it
weight, else the best-scoring generalist whose size fits the budget.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from coe_core.errors import ConfigError


class ScoreTableError(ConfigError):
    """A score table file is missing or malformed; the message says what to fix."""


@dataclass
class ScoreTable:
    """S[expert][category] plus each expert's active parameters and how the table was made."""

    scores: dict[str, dict[str, float]]
    params: dict[str, int] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "params": self.params, "method": self.method}


def load_score_table(path: str | Path) -> ScoreTable:
    path = Path(path)
    if not path.exists():
        raise ScoreTableError(
            f"score table {path} does not exist: run `coe eval-experts` or set "
            'profiles.<profile>.scores to a JSON file {"scores": {expert: {category: x}}, ...}'
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ScoreTableError(f"score table {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("scores"), dict):
        raise ScoreTableError(f'score table {path} needs a "scores" object: {{expert: {{category: number}}}}')
    scores: dict[str, dict[str, float]] = {}
    for expert, row in raw["scores"].items():
        if not isinstance(row, dict):
            raise ScoreTableError(f"score table {path}: scores.{expert} must map category -> number")
        try:
            scores[expert] = {str(c): float(v) for c, v in row.items()}
        except (TypeError, ValueError):
            raise ScoreTableError(f"score table {path}: scores.{expert} holds a value that is not a number") from None
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in params.values()):
        raise ScoreTableError(f'score table {path}: "params" must map expert -> positive parameter count')
    return ScoreTable(scores, {k: int(v) for k, v in params.items()}, raw.get("method") or {}, str(path))


@dataclass
class MappingResult:
    assignment: dict[str, str]
    #: category -> why it got its expert ("mapping-override", "optimiser", "generalist", ...)
    reasons: dict[str, str]
    expected_score: float
    avg_active_params: float
    #: the limit on average active parameters it was solved under (None: no limit)
    active_params_budget: int | None
    feasible: bool = True
    distribution: dict[str, float] = field(default_factory=dict)
    distribution_source: str = ""
    overrides: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    score_table: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MappingProblem:
    """Everything the optimiser needs (scores, costs, distribution, overrides, availability)."""

    categories: list[str]
    fallback_category: str
    scores: dict[str, dict[str, float]]
    costs: dict[str, int]
    distribution: dict[str, float]
    overrides: dict[str, str] = field(default_factory=dict)
    generalists: set[str] = field(default_factory=set)
    unavailable: set[str] = field(default_factory=set)
    default_expert: str | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        total = sum(max(0.0, v) for v in self.distribution.values())
        cats = self.all_categories
        self.p = {c: (max(0.0, self.distribution.get(c, 0.0)) / total if total else 1 / len(cats)) for c in cats}
        self.fixed: dict[str, str] = {}
        for cat, expert in self.overrides.items():
            if expert in self.unavailable:
                self.notes.append(f"override {cat} -> {expert} ignored: {expert} is unavailable")
            else:
                self.fixed[cat] = expert
        self.candidates: dict[str, list[str]] = {c: self._eligible(c) for c in cats if c not in self.fixed}

    @property
    def all_categories(self) -> list[str]:
        return [*self.categories, self.fallback_category]

    def score(self, expert: str, category: str) -> float:
        row = self.scores.get(expert, {})
        if category in row:
            return row[category]
        if category == self.fallback_category and row:
            # no column for the fallback category: a generalist is as good as its average category
            return float(np.mean([row[c] for c in self.categories if c in row] or [0.0]))
        return float("nan")

    def _eligible(self, category: str) -> list[str]:
        pool = [
            e
            for e in self.costs
            if e not in self.unavailable and e in self.scores and not np.isnan(self.score(e, category))
        ]
        if category == self.fallback_category:
            generalists = [e for e in pool if e in self.generalists]
            if generalists:
                return generalists
            fallback = [e for e in pool if e == self.default_expert] or pool
            if fallback:
                self.notes.append(f"no available generalist for {category}: using {', '.join(fallback)}")
            return fallback
        return pool

    def totals(self, assignment: dict[str, str]) -> tuple[float, float]:
        score = sum(self.p[c] * self.score(e, c) for c, e in assignment.items())
        cost = sum(self.p[c] * self.costs.get(e, 0) for c, e in assignment.items())
        return float(score), float(cost)


def _solve(problem: MappingProblem, budget: float | None) -> dict[str, str] | None:
    """Exact optimum at ``budget`` (highest expected score, then lowest cost), or None if infeasible.

    Categories with zero weight do not enter the program; they are filled by :func:`_fill_unweighted`.
    """
    cats = [c for c, cands in problem.candidates.items() if problem.p[c] > 0 and cands]
    pairs = [(c, e) for c in cats for e in problem.candidates[c]]
    fixed_cost = sum(problem.p[c] * problem.costs.get(e, 0) for c, e in problem.fixed.items())
    if not pairs:
        return {} if budget is None or fixed_cost <= budget else None
    scale = float(max(problem.costs.values()))  # costs in [0, 1] keep the solver's tolerances meaningful
    score = np.array([problem.p[c] * problem.score(e, c) for c, e in pairs])
    cost = np.array([problem.p[c] * problem.costs[e] / scale for c, e in pairs])
    one_each = np.array([[1.0 if pc == c else 0.0 for pc, _ in pairs] for c in cats])
    constraints = [LinearConstraint(one_each, 1, 1)]
    if budget is not None:
        constraints.append(LinearConstraint(cost[None, :], -np.inf, (budget - fixed_cost) / scale + 1e-9))
    options = {"mip_rel_gap": 0.0, "presolve": True}
    integrality, bounds = np.ones(len(pairs)), Bounds(0, 1)
    best = milp(-score, constraints=constraints, integrality=integrality, bounds=bounds, options=options)
    if best.success and budget is not None and cost @ np.round(best.x) > (budget - fixed_cost) / scale + 1e-9:
        # HiGHS accepts a MIP solution up to its feasibility tolerance (1e-6) over the budget: solve again
        # with the budget tightened by that much, so the mapping really fits
        constraints[-1] = LinearConstraint(cost[None, :], -np.inf, (budget - fixed_cost) / scale - 2e-6)
        best = milp(-score, constraints=constraints, integrality=integrality, bounds=bounds, options=options)
    if not best.success:
        return None
    # second pass: the cheapest mapping among those with the best score (ties are common with few experts)
    top = float(score @ np.round(best.x))
    constraints.append(LinearConstraint(score[None, :], top - 1e-9 * max(1.0, abs(top)), np.inf))
    cheap = milp(cost, constraints=constraints, integrality=integrality, bounds=bounds, options=options)
    x = np.round(cheap.x if cheap.success else best.x)
    return {c: e for (c, e), v in zip(pairs, x, strict=True) if v > 0.5}


def _fill_unweighted(problem: MappingProblem, assignment: dict[str, str], budget: float | None) -> dict[str, str]:
    """Categories without traffic weight (often the fallback category) get the best-scoring eligible
    expert whose size fits the budget (per prompt), else the smallest one."""
    out = dict(assignment)
    for c, cands in problem.candidates.items():
        if c in out or not cands:
            continue
        fits = [e for e in cands if budget is None or problem.costs[e] <= budget]
        if fits:
            out[c] = max(fits, key=lambda e: (problem.score(e, c), -problem.costs[e]))
        else:
            out[c] = min(cands, key=lambda e: (problem.costs[e], -problem.score(e, c)))
    return out


def optimise(problem: MappingProblem, budget: int | None) -> MappingResult:
    """The best mapping within ``budget`` (None: no limit)."""
    notes = list(problem.notes)
    solved = _solve(problem, budget)
    feasible = solved is not None
    if solved is None:
        # the budget is below the cheapest possible mapping: serve with the cheapest experts and say so
        solved = {
            c: min(cands, key=lambda e: (problem.costs[e], -problem.score(e, c)))
            for c, cands in problem.candidates.items()
            if cands and problem.p[c] > 0
        }
        _, floor = problem.totals({**problem.fixed, **solved})
        notes.append(
            f"budget {budget:,} is below the cheapest possible mapping ({floor:,.0f} average active "
            "params): using the cheapest experts"
        )
    assignment = {**problem.fixed, **_fill_unweighted(problem, solved, budget)}
    missing = [c for c in problem.all_categories if c not in assignment]
    if missing:
        fallback = problem.default_expert
        notes.append(f"no scored, available expert for {missing}: served by the default expert {fallback}")
        for c in missing:
            if fallback:
                assignment[c] = fallback
    reasons = {}
    for c in problem.all_categories:
        if c in problem.fixed:
            reasons[c] = "mapping-override"
        elif c not in assignment or c in missing:
            reasons[c] = "default expert (no scores)"
        else:
            reasons[c] = _reason(problem, c, assignment[c])
    score, cost = problem.totals({c: e for c, e in assignment.items() if c not in missing})
    return MappingResult(
        assignment={c: assignment[c] for c in problem.all_categories if c in assignment},
        reasons=reasons,
        expected_score=round(score, 6),
        avg_active_params=round(cost, 1),
        active_params_budget=budget,
        feasible=feasible,
        distribution={c: round(v, 6) for c, v in problem.p.items()},
        overrides=dict(problem.fixed),
        notes=notes,
    )


def _reason(problem: MappingProblem, category: str, expert: str) -> str:
    best = max(problem.candidates[category], key=lambda e: (problem.score(e, category), -problem.costs[e]))
    who = "generalist" if category == problem.fallback_category else "optimiser"
    if problem.score(best, category) <= problem.score(expert, category):
        return f"{who}: best score {problem.score(expert, category):.3f}"
    return (
        f"{who}: {problem.score(expert, category):.3f} within budget "
        f"(best, {best}, scores {problem.score(best, category):.3f} but costs more)"
    )


def frontier(problem: MappingProblem) -> list[dict[str, Any]]:
    """Every Pareto-optimal (average active params, expected score) point, most expensive first."""
    points: list[dict[str, Any]] = []
    budget: float | None = None
    # mapping costs closer than this are one point (it is well above the solver's feasibility tolerance)
    step = 1e-4 * float(max(problem.costs.values(), default=1))
    for _ in range(10_000):  # bounded by the number of distinct mapping costs; guard against a loop
        solved = _solve(problem, budget)
        if solved is None:
            break
        score, cost = problem.totals({**problem.fixed, **solved})
        if points and cost > points[-1]["avg_active_params"] - step / 2:
            break  # the solver returned the previous point within its tolerance: nothing cheaper exists
        points.append(
            {
                "avg_active_params": round(cost, 1),
                "expected_score": round(score, 6),
                "assignment": {**problem.fixed, **solved},
            }
        )
        if not solved:
            break  # nothing left to choose: one point
        budget = cost - step
    return points
