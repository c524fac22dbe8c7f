"""Sanity checks for the per-category expert eval sets in assets/eval/ (fast, no models)."""

import json
from pathlib import Path

import pytest

from coe_core.config import DEFAULT_CATEGORIES

EVAL_DIR = Path(__file__).resolve().parents[1] / "assets" / "eval"
PER_CATEGORY = 30


def _load(category: str) -> list[dict]:
    lines = (EVAL_DIR / f"{category}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("category", DEFAULT_CATEGORIES)
def test_eval_set_shape(category: str) -> None:
    rows = _load(category)
    assert len(rows) == PER_CATEGORY
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "reference"}, f"{category}:{i + 1} keys {sorted(row)}"
        for key in ("prompt", "reference"):
            assert isinstance(row[key], str) and row[key].strip(), f"{category}:{i + 1} empty {key}"
        n_words = len(row["reference"].split())
        assert 15 <= n_words <= 120, f"{category}:{i + 1} reference has {n_words} words"
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts), f"duplicate prompt in {category}"


def test_no_prompt_shared_across_categories() -> None:
    seen: dict[str, str] = {}
    for category in DEFAULT_CATEGORIES:
        for row in _load(category):
            key = " ".join(row["prompt"].lower().split())
            assert key not in seen, f"prompt in both {seen[key]} and {category}: {row['prompt'][:60]}"
            seen[key] = category


def test_the_router_development_set_shares_no_prompt_with_its_training_data():
    """The development set is written apart: not one prompt (normalised) is also a training prompt."""
    import json
    import re

    from tests.conftest import REPO

    def texts(pattern: str) -> set[str]:
        out = set()
        for path in (REPO / "assets" / "router").glob(pattern):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    text = row.get("prompt") or "\n".join(m["content"] for m in row["messages"])
                    out.add(re.sub(r"\s+", " ", text).strip().lower())
        return out

    train = texts("seed_prompts.jsonl") | texts("train/*.jsonl")
    dev = texts("dev/*.jsonl")
    assert len(train) > 4000 and len(dev) > 900
    assert not train & dev
