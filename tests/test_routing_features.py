"""The router's feature blocks, the multilingual token table, calibration and the evaluation report."""

from __future__ import annotations

import numpy as np
import pytest

from coe_core.labelled import LabelledPrompt
from coe_core.routing.evaluation import evaluate_proba, reliability, slices_of
from coe_core.routing.features import FeatureSet, Resources, shape_features
from coe_core.routing.model import fit_temperature, scale_temperature
from coe_core.routing.training import load_labelled_jsonl
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def token_table():
    """The Gemma 3 token table, built once per machine into the shared cache (about a minute the first time)."""
    from coe_core.config import load_config
    from coe_core.routing.service import RoutingService
    from tests.conftest import REPO

    service = RoutingService(load_config(REPO / "spaces.yaml", env=False), progress=lambda _m: None)
    from coe_core.routing.token_table import get_token_table

    return get_token_table(service.config.router.token_table, service.feature_cache)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_token_table_places_translations_near_each_other(token_table):
    words = [" código", " 代码", " 코드", " pastel", " cake"]  # one token each
    vecs = token_table.pooled(words, 48)
    assert vecs.shape == (5, 3 * token_table.dim) and vecs.dtype == np.float32
    whole = vecs[:, : token_table.dim]
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-3)
    # "code" in Spanish, Chinese and Korean are closer to each other than to "cake" in Spanish or English
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert _cos(whole[a], whole[b]) > max(_cos(whole[a], whole[3]), _cos(whole[a], whole[4])) + 0.1
    # IDF weights (from training prompts) let the rare, meaningful tokens decide the mean
    texts = ["the my a code", "the my a cake"]
    idf = np.ones(token_table.table.shape[0], dtype=np.float32)
    for t in ("the", "my", "a"):
        idf[token_table.token_ids([f" {t}"])[0]] = 0.01
    plain, weighted = token_table.pooled(texts, 48), token_table.pooled(texts, 48, idf)
    d = token_table.dim
    assert _cos(weighted[0, :d], weighted[1, :d]) < _cos(plain[0, :d], plain[1, :d]) - 0.1


def test_token_table_head_and_tail_windows_see_the_request_of_a_long_paste(token_table):
    paste = "id,amount,date\n" + "\n".join(f"{i},{i * 3.5},2024-01-{i % 28 + 1:02d}" for i in range(300))
    a = token_table.pooled([paste + "\nwrite a poem about these numbers"], 48)[0]
    b = token_table.pooled([paste + "\nfix the bug in this sql query"], 48)[0]
    d = token_table.dim
    # the head windows are the same paste, the whole-text means nearly so; the tail windows, which hold
    # the request, differ more than the whole-text means do
    assert _cos(a[d : 2 * d], b[d : 2 * d]) > 0.9999 and _cos(a[:d], b[:d]) > 0.999
    assert _cos(a[2 * d :], b[2 * d :]) < _cos(a[:d], b[:d]) - 0.002
    # empty or unknown-only input gives zeros, not NaN
    assert not np.isnan(token_table.pooled(["", "\x00"], 48)).any()


def test_feature_set_fits_char_idf_and_stacks_blocks(token_table):
    texts = ["sort a list in python", "écris un poème sur la mer", "证明根号2是无理数", "hello!!"]
    fs = FeatureSet(("tokens", "chars", "shape")).fit(texts, Resources(token_table=token_table))
    x = fs.transform(texts, Resources(token_table=token_table))
    assert x.shape[0] == 4 and x.shape[1] == 3 * token_table.dim + 2**18 + shape_features(["x"]).shape[1]
    with pytest.raises(ValueError, match="needs the token table"):
        fs.transform(texts, Resources())
    with pytest.raises(ValueError, match="unknown or no blocks"):
        FeatureSet(("words",))


def test_temperature_scaling_fixes_overconfident_probabilities():  # noqa: D103
    rng = np.random.default_rng(0)
    n, k = 2000, 4
    labels = rng.integers(0, k, n)
    # a classifier that is right 60 % of the time but always says 0.97
    top = np.where(rng.random(n) < 0.6, labels, (labels + 1) % k)
    proba = np.full((n, k), 0.01)
    proba[np.arange(n), top] = 0.97
    t = fit_temperature(proba, labels)
    assert t > 1.5
    calibrated = scale_temperature(proba, t)
    ece_before, _ = reliability(proba.max(axis=1), top == labels)
    ece_after, _ = reliability(calibrated.max(axis=1), top == labels)
    assert ece_before > 0.3 and ece_after < 0.05
    assert np.allclose(calibrated.sum(axis=1), 1.0)
    assert fit_temperature(proba[:5], labels[:5]) == 1.0  # too little data: left alone


def test_evaluation_reports_slices_reliability_and_what_the_fallback_caught():
    cats = ["coding", "math", "general"]
    examples = [
        LabelledPrompt("a", "coding", lang="en", style="clean", chars=10),
        LabelledPrompt("b", "math", lang="zh", style="casual", chars=1500),
        LabelledPrompt("c", "coding", lang="zh", style="casual", turns=2, chars=20),
        LabelledPrompt("d", "general", lang="en", style="casual", chars=5),
    ]
    proba = np.array(
        [
            [0.9, 0.05, 0.05],  # right, confident
            [0.8, 0.1, 0.1],  # wrong, confident: not caught
            [0.3, 0.4, 0.3],  # wrong, unsure: falls back (wrong: not labelled general)
            [0.4, 0.35, 0.25],
        ]
    )  # unsure: falls back to general, which is right
    report = evaluate_proba(proba, cats, examples, threshold=0.5, fallback="general")
    assert report["accuracy"] == 0.5 and report["accuracy_without_fallback"] == 0.25
    assert report["fallback_rate"] == 0.5
    assert report["wrong_caught_by_fallback"] == pytest.approx(2 / 3, abs=1e-3)
    assert report["slices"]["lang=zh"] == {"n": 2, "accuracy": 0.0}
    assert report["slices"]["length=long"] == {"n": 1, "accuracy": 0.0}
    assert report["slices"]["turns=multi"]["n"] == 1 and report["slices"]["style=casual"]["n"] == 3
    assert sum(r["n"] for r in report["reliability"]) == 4 and 0 <= report["ece"] <= 1
    assert slices_of(examples[2]) == ["lang=zh", "style=casual", "length=short", "turns=multi"]


def test_labelled_files_take_conversations_and_slice_fields(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"prompt": "hola que tal", "category": "general", "lang": "es", "style": "casual"},
        {
            "messages": [
                {"role": "user", "content": "write a sort in python"},
                {"role": "assistant", "content": "def s(x): return sorted(x)"},
                {"role": "user", "content": "now in rust pls"},
            ],
            "category": "coding",
            "lang": "en",
            "style": "casual",
        },
        {"messages": [{"role": "assistant", "content": "hi"}], "category": "coding"},
    ]
    write_jsonl(path, rows[:2])
    data = load_labelled_jsonl(path, ["coding"], keep_labels=["general"])
    chat = data.examples[1]
    assert chat.prompt == "write a sort in python\nnow in rust pls" and chat.turns == 2
    assert (chat.lang, chat.style, chat.chars) == ("en", "casual", len("now in rust pls"))
    assert data.examples[0].category == "general"
    write_jsonl(path, rows[2:])
    with pytest.raises(ValueError, match=r"data.jsonl:1: empty prompt"):
        load_labelled_jsonl(path, ["coding"])


def test_linear_classifier_gives_one_probability_row_per_text_with_two_classes_too():
    from coe_core.routing.classifier import SoftmaxLinearSVC

    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(-1, 0.3, (10, 4)), rng.normal(1, 0.3, (10, 4))])
    y = np.array(["a"] * 10 + ["b"] * 10)
    proba = SoftmaxLinearSVC(C=1.0, random_state=0).fit(x, y).predict_proba(x)
    assert proba.shape == (20, 2) and np.allclose(proba.sum(axis=1), 1.0)
    assert (proba[:10, 0] > 0.5).all() and (proba[10:, 1] > 0.5).all()


def test_calibration_on_the_development_set_reports_a_cross_fitted_ece():
    from coe_core.routing.calibration import calibrate_on_examples

    rng = np.random.default_rng(1)
    labels = ["coding", "math", "general"]
    n = 400
    truth = rng.integers(0, 3, n)
    top = np.where(rng.random(n) < 0.8, truth, (truth + 1) % 3)
    raw = np.full((n, 3), 0.01)
    raw[np.arange(n), top] = 0.98  # overconfident: right 80 % of the time
    examples = [LabelledPrompt(f"p{i}", labels[t], lang="en", style="clean", chars=10) for i, t in enumerate(truth)]
    examples.append(LabelledPrompt("outside", "sports", lang="en", style="clean", chars=10))  # not a label
    raw = np.vstack([raw, [[0.34, 0.33, 0.33]]])
    changes = calibrate_on_examples(
        raw, labels, examples, target_precision=0.9, fallback="general", confidence_kind="max_prob"
    )
    report = changes["dev_metrics"]
    assert changes["temperature"] > 1.5 and changes["temperature_fitted_on"] == "development set"
    assert report["ece"] < 0.1 and report["ece"] != report["ece_in_sample"]
    assert changes["calibration"]["on"] == "development set" and 0 <= changes["threshold"] <= 1
    assert report["n"] == n + 1


def test_prompts_that_paste_the_same_material_share_a_group():
    from coe_core.routing.training import group_shared_material

    material = "\n".join(f"line {i}: the quarterly revenue of the north region grew by {i} percent" for i in range(5))
    rows = [
        LabelledPrompt(f"summarise for the board:\n{material}", "writing"),
        LabelledPrompt(f"{material}\nlist every percentage as json", "extraction"),
        LabelledPrompt("an unrelated short prompt", "general"),
        LabelledPrompt(f"{material}\nexplicit group wins", "math", group="conv-1"),
    ]
    out = group_shared_material(rows)
    assert out[0].group == out[1].group and out[0].group.startswith("material:")
    assert out[2].group == "" and out[3].group == "conv-1"
