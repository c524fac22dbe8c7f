"""Router training data, group split, calibration, promotion rule and expert scoring (no embedder needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from coe_core.errors import InvalidRequest
from coe_core.labelled import LabelledPrompt
from coe_core.routing.calibration import pick_threshold, threshold_effect
from coe_core.routing.classifier import confidence
from coe_core.routing.expert_eval import eval_experts, load_eval_sets, normalise
from coe_core.routing.metrics import classification_metrics
from coe_core.routing.text import routed_text
from coe_core.routing.training import (
    dedupe,
    group_of,
    is_heldout,
    load_labelled_jsonl,
    should_promote,
    split,
)
from tests.conftest import write_jsonl


def test_labelled_file_counts_labels_outside_taxonomy_and_names_bad_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": "sort a list", "category": "coding"},
            {"prompt": "tell me a joke", "category": "humour"},
            {"prompt": "another joke", "category": "humour"},
        ],
    )
    data = load_labelled_jsonl(path, ["coding", "math"])
    assert [ex.category for ex in data.examples] == ["coding"]
    assert data.outside_taxonomy == {"humour": 2}
    path.write_text('{"prompt": "ok", "category": "coding"}\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2 is not valid JSON"):
        load_labelled_jsonl(path, ["coding"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labelled_jsonl(tmp_path / "missing.jsonl", ["coding"])


def test_dedupe_keeps_the_latest_label():
    out = dedupe(
        [
            LabelledPrompt("What is  Python?", "coding"),
            LabelledPrompt("other", "math"),
            LabelledPrompt("what is python?", "humanities", "feedback-corrected", "conv-1"),
        ]
    )
    assert len(out) == 2
    assert out[-1].category == "humanities" and out[-1].source == "feedback-corrected"


def test_split_never_puts_a_group_on_both_sides_and_is_stable():
    examples = [LabelledPrompt(f"prompt {i}", ["a", "b"][i % 2], "feedback", f"conv-{i // 3}") for i in range(300)]
    examples += [LabelledPrompt(f"seed {i}", ["a", "b"][i % 2]) for i in range(200)]
    train, test = split(examples)
    assert {group_of(e) for e in train}.isdisjoint({group_of(e) for e in test})
    assert 0.1 < len(test) / len(examples) < 0.3
    # the same group lands on the same side whatever else is in the data (fair version comparison)
    train2, test2 = split(list(reversed(examples[:250])))
    assert {group_of(e) for e in test2} <= {group_of(e) for e in test}


def test_split_keeps_a_category_in_training_even_if_all_its_groups_hash_to_heldout():
    held = next(f"g{i}" for i in range(1000) if is_heldout(f"g{i}"))
    examples = [LabelledPrompt(f"p{i}", "rare", "s", held) for i in range(3)]
    examples += [LabelledPrompt(f"q{i}", "common") for i in range(20)]
    train, test = split(examples)
    assert any(ex.category == "rare" for ex in train) and not any(ex.category == "rare" for ex in test)


def test_routed_text_ends_with_the_latest_turn_and_keeps_both_ends_of_a_long_one():
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
        {"role": "user", "content": "latest"},
    ]
    assert routed_text(messages, 1, 2000) == "second\nlatest"
    assert routed_text(messages, 5, 2000) == "first\nsecond\nlatest"
    assert routed_text(messages, 0, 2000) == "latest"
    # a pasted document with the request at the end: the request survives the cap, and so does the start
    long = "Summarise this for the board:\n" + "lorem ipsum " * 400 + "\nThree bullets, plain words please."
    text = routed_text([{"role": "user", "content": long}], 1, 500)
    assert len(text) == 500 and text.startswith("Summarise this for the board")
    assert text.endswith("Three bullets, plain words please.") and " … " in text
    # earlier turns never take more than a fifth of the budget
    chat = [{"role": "user", "content": "y" * 5000}, {"role": "user", "content": "and in rust?"}]
    assert routed_text(chat, 1, 500) == "y" * 100 + "\nand in rust?"
    with pytest.raises(InvalidRequest, match="empty prompt"):
        routed_text([{"role": "user", "content": "hi"}, {"role": "user", "content": "   "}], 1, 2000)
    with pytest.raises(InvalidRequest, match="empty prompt"):
        routed_text([{"role": "assistant", "content": "hi"}], 1, 2000)


def test_confidence_kinds():
    p = np.array([[0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    assert confidence(p, "max_prob").tolist() == pytest.approx([0.9, 1 / 3])
    ent = confidence(p, "entropy")
    assert ent[1] == pytest.approx(0.0, abs=1e-9) and 0.5 < ent[0] < 1
    with pytest.raises(ValueError, match="max_prob or entropy"):
        confidence(p, "margin")


def test_pick_threshold_is_the_lowest_that_reaches_the_target_precision():
    conf = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    result = pick_threshold(conf, correct, 0.95)
    assert result["achieved"] and result["threshold"] == pytest.approx(0.7)
    assert result["precision"] == 1.0 and result["coverage"] == pytest.approx(5 / 8)
    assert pick_threshold(conf, correct, 0.75)["threshold"] == 0.0  # 6/8 correct routes everything
    # unreachable target: the most precise threshold is returned and flagged
    bad = pick_threshold(np.array([0.9, 0.8]), np.array([False, False]), 0.9)
    assert not bad["achieved"]
    effect = threshold_effect(conf, correct, 0.65)
    assert effect["routed"] == 5 and effect["fallback_rate"] == pytest.approx(3 / 8)


def test_worse_candidate_is_not_promoted_unless_forced():
    assert should_promote({"macro_f1": 0.8}, {"macro_f1": 0.9}) == (
        False,
        "held-out macro-F1 0.8000 < active 0.9000: kept the active version (use --force to promote)",
    )
    assert should_promote({"macro_f1": 0.9}, {"macro_f1": 0.9})[0]
    assert should_promote({"macro_f1": 0.8}, {"macro_f1": 0.9}, force=True)[0]
    assert should_promote({"macro_f1": 0.1}, None)[0]


def test_metrics_count_fallback_as_its_own_label():
    m = classification_metrics(
        ["coding", "math", "math", "general"],
        ["coding", "general", "math", "general"],
        ["coding", "math", "general"],
    )
    assert m["accuracy"] == 0.75
    assert m["per_category"]["math"]["recall"] == 0.5
    assert m["confusion"]["labels"] == ["coding", "math", "general"]
    assert m["confusion"]["matrix"][1] == [0, 1, 1]


def _eval_dir(tmp_path, categories):
    for cat in categories:
        rows = [{"prompt": f"{cat} question {i}", "reference": f"{cat} answer {i}"} for i in range(3)]
        write_jsonl(tmp_path / f"{cat}.jsonl", rows)
    return tmp_path


def test_eval_experts_scores_normalises_and_caches(tmp_path):
    cats = ["coding", "math"]
    (tmp_path / "eval").mkdir()
    sets = load_eval_sets(_eval_dir(tmp_path / "eval", cats), cats)
    calls = []

    def fake(expert, messages, reference):
        calls.append((expert, messages[0]["content"]))
        per_token = {("a", "coding"): -1.0, ("b", "coding"): -2.0, ("a", "math"): -3.0, ("b", "math"): -1.5}
        cat = reference.split()[0]
        return per_token[(expert, cat)] * 4, 4

    cache = tmp_path / "scores" / "offline.json"
    table = eval_experts(
        fake,
        ["a", "b"],
        sets,
        fallback="general",
        params={"a": 100, "b": 200},
        cache_path=cache,
        show_progress=False,
    )
    assert table["scores"]["a"]["coding"] == 1.0
    assert table["scores"]["b"]["coding"] == pytest.approx(math.exp(-1.0), abs=1e-6)
    assert table["scores"]["b"]["math"] == 1.0 and table["scores"]["a"]["math"] == pytest.approx(math.exp(-1.5))
    assert table["scores"]["a"]["general"] == pytest.approx((1 + math.exp(-1.5)) / 2, abs=1e-6)
    assert table["method"]["eval_sets"]["coding"]["sha256"] == sets["coding"].sha256
    assert len(calls) == 12 and json.loads(cache.read_text())["params"] == {"a": 100, "b": 200}
    # a rerun reuses the cache; a changed eval set is measured again, only that one
    calls.clear()
    eval_experts(fake, ["a", "b"], sets, fallback="general", params={}, cache_path=cache, show_progress=False)
    assert calls == []
    (tmp_path / "eval" / "math.jsonl").write_text(json.dumps({"prompt": "new", "reference": "math new"}))
    sets = load_eval_sets(tmp_path / "eval", cats)
    eval_experts(fake, ["a", "b"], sets, fallback="general", params={}, cache_path=cache, show_progress=False)
    assert sorted(calls) == [("a", "new"), ("b", "new")]


def test_eval_sets_missing_or_malformed_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval sets missing .*math.jsonl"):
        load_eval_sets(_eval_dir(tmp_path, ["coding"]), ["coding", "math"])
    (tmp_path / "math.jsonl").write_text('{"prompt": "q"}\n')
    with pytest.raises(ValueError, match=r"math.jsonl:1 needs non-empty string fields"):
        load_eval_sets(tmp_path, ["coding", "math"])


def test_normalise_keeps_gap_size_with_two_experts():
    out = normalise({"a": {"c": -1.0}, "b": {"c": -1.1}}, ["c"], "general")
    assert out["a"]["c"] == 1.0 and out["b"]["c"] == pytest.approx(math.exp(-0.1), abs=1e-6)


def test_auto_threads_uses_one_thread_on_a_busy_machine(monkeypatch):
    from coe_core.routing import embedder

    monkeypatch.setattr(embedder.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(embedder.os, "getloadavg", lambda: (6.0, 5.0, 5.0))
    assert embedder.auto_threads() == 1
    monkeypatch.setattr(embedder.os, "getloadavg", lambda: (0.3, 0.5, 0.5))
    assert embedder.auto_threads() == 2
    monkeypatch.setattr(embedder.os, "cpu_count", lambda: 16)
    assert embedder.auto_threads() == 4
