"""The category -> expert optimiser: exact, budget-respecting, overrides win, monotone frontier."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from coe_core.routing.mapping import MappingProblem, ScoreTableError, frontier, load_score_table, optimise

CATS = ["coding", "math", "writing"]


def _problem(seed: int, **kw) -> MappingProblem:
    rng = np.random.default_rng(seed)
    experts = ["small", "mid", "big"]
    scores = {e: {c: float(rng.uniform(0, 1)) for c in [*CATS, "general"]} for e in experts}
    costs = {"small": 100_000_000, "mid": 400_000_000, "big": 1_500_000_000}
    p = dict(zip(CATS, rng.dirichlet(np.ones(len(CATS))), strict=True))
    return MappingProblem(CATS, "general", scores, costs, p, generalists={"small", "big"}, **kw)


def _brute_force(problem: MappingProblem, budget: float | None) -> list[tuple[float, float]]:
    """(score, cost) of every mapping of the weighted categories that fits the budget."""
    cats = [c for c in CATS if c not in problem.fixed]
    out = []
    for combo in itertools.product(*(problem.candidates[c] for c in cats)):
        assignment = {**problem.fixed, **dict(zip(cats, combo, strict=True))}
        score, cost = problem.totals(assignment)
        if budget is None or cost <= budget:
            out.append((score, cost))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_optimum_matches_brute_force_and_respects_budget(seed):
    problem = _problem(seed)
    costs = sorted(c for _, c in _brute_force(problem, None))
    for budget in [None, costs[0], costs[len(costs) // 3], costs[len(costs) // 2], 700_000_000]:
        result = optimise(problem, budget)
        best = max(s for s, _ in _brute_force(problem, budget))
        assert result.feasible
        assert result.expected_score == pytest.approx(best, abs=1e-6)
        if budget is not None:
            assert result.avg_active_params <= budget + 1
        assert set(result.assignment) == {*CATS, "general"}


def test_budget_below_cheapest_mapping_is_reported_not_crashed():
    problem = _problem(0)
    result = optimise(problem, 10)
    assert not result.feasible
    assert all(e == "small" for c, e in result.assignment.items() if c in CATS)
    assert "below the cheapest possible mapping" in " ".join(result.notes)


def test_overrides_win_and_are_shown_as_such():
    problem = _problem(1, overrides={"coding": "big", "general": "mid"})
    result = optimise(problem, 200_000_000)
    assert result.assignment["coding"] == "big"
    assert result.reasons["coding"] == "mapping-override"
    assert result.assignment["general"] == "mid"
    assert result.reasons["general"] == "mapping-override"
    # the override's cost counts: no budget left, so the rest goes to the cheapest expert
    assert result.assignment["math"] == "small" and result.assignment["writing"] == "small"


def test_unavailable_experts_are_excluded_and_override_to_them_ignored():
    problem = _problem(2, unavailable={"big"}, overrides={"math": "big"})
    result = optimise(problem, None)
    assert "big" not in result.assignment.values()
    assert any("override math -> big ignored" in n for n in result.notes)


def test_general_goes_to_best_generalist_within_budget():
    problem = _problem(3)
    problem.scores["big"]["general"], problem.scores["small"]["general"] = 0.9, 0.2
    problem.scores["mid"]["general"] = 1.0  # not a generalist: never serves general
    assert optimise(problem, None).assignment["general"] == "big"
    # a fallback prompt costs the generalist's whole size: big does not fit 300M
    assert optimise(problem, 300_000_000).assignment["general"] == "small"


def test_frontier_is_monotone_and_equals_brute_force_pareto_set():
    problem = _problem(4)
    points = frontier(problem)
    costs = [p["avg_active_params"] for p in points]
    scores = [p["expected_score"] for p in points]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    assert scores == sorted(scores, reverse=True)
    everything = _brute_force(problem, None)
    pareto = {
        (round(s, 5), round(c))
        for s, c in everything
        if not any((s2 >= s and c2 < c) or (s2 > s and c2 <= c) for s2, c2 in everything)
    }
    assert {(round(p["expected_score"], 5), round(p["avg_active_params"])) for p in points} == pareto


def test_score_table_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ScoreTableError, match="coe eval-experts"):
        load_score_table(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scores": {"a": {"coding": "high"}}}))
    with pytest.raises(ScoreTableError, match="not a number"):
        load_score_table(bad)


def test_budget_suffix_b_means_billion_parameters_not_bytes():
    from coe_core.config import load_config, parse_params

    assert parse_params("1.5B") == 1_500_000_000 and parse_params("300M") == 300_000_000
    assert load_config(env=False, mapping__budget="1B").mapping.budget == 1_000_000_000
    with pytest.raises(ValueError, match="is not a size"):
        parse_params("lots")
