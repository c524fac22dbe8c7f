"""Training data of the category router and how a router version is trained and evaluated from it."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from coe_core.config import CoEConfig
from coe_core.routing.artifact import RouterArtifact, new_version_id, save_artifact
from coe_core.routing.calibration import threshold_effect
from coe_core.routing.classifier import confidence, select_and_fit
from coe_core.routing.embedder import Embedder, get_embedder
from coe_core.routing.metrics import classification_metrics

#: share of groups held out for evaluation and calibration
HELDOUT_FRACTION = 0.2
#: fewer labelled prompts than this in a category cannot train a usable router
MIN_PER_CATEGORY = 3

Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LabelledPrompt:
    """One training example of the router.

    ``source`` says where the label came from (``seed``, ``feedback``, ``correction``, ...);
    ``group`` keeps examples that must not be split across train and held-out sets together
    (a conversation id; every seed prompt is its own group).
    """

    prompt: str
    category: str
    source: str = "seed"
    group: str = ""


def normalise_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def group_of(example: LabelledPrompt) -> str:
    """The example's group; a prompt without one is its own group (keyed by its text, so stable)."""
    return example.group or f"prompt:{_digest(normalise_prompt(example.prompt))[:16]}"


@dataclass
class LabelledFile:
    examples: list[LabelledPrompt]
    #: label -> count of lines whose label is not a routed category of the taxonomy
    outside_taxonomy: dict[str, int]
    sha256: str


def iter_jsonl(raw: bytes, path: Path, line_shape: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; a malformed line is an error naming it."""
    for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be {line_shape}") from None


def load_labelled_jsonl(
    path: str | Path, categories: list[str], *, source: str = "seed", keep_labels: Iterable[str] = ()
) -> LabelledFile:
    """Read ``{"prompt", "category"}`` lines. Labels outside ``categories`` (+ ``keep_labels``) are
    counted, not loaded; a malformed line is an error naming the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"labelled prompt file {path} does not exist: write one JSON object "
            '{"prompt": ..., "category": ...} per line'
        )
    allowed = set(categories) | set(keep_labels)
    raw = path.read_bytes()
    examples: list[LabelledPrompt] = []
    outside: Counter[str] = Counter()
    for number, row in iter_jsonl(raw, path, '{"prompt": "...", "category": "..."}'):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("category"), str)
        ):
            raise ValueError(f'{path}:{number} needs string fields "prompt" and "category"')
        if not row["prompt"].strip():
            raise ValueError(f"{path}:{number} has an empty prompt")
        if row["category"] not in allowed:
            outside[row["category"]] += 1
            continue
        examples.append(LabelledPrompt(row["prompt"], row["category"], source, str(row.get("group", ""))))
    return LabelledFile(examples, dict(outside), hashlib.sha256(raw).hexdigest())


def dedupe(examples: Iterable[LabelledPrompt]) -> list[LabelledPrompt]:
    """One example per normalised prompt; the LAST one wins, so corrections that callers append
    after the seed set (and later feedback after earlier) replace older labels."""
    latest: dict[str, LabelledPrompt] = {}
    for ex in examples:
        key = normalise_prompt(ex.prompt)
        latest.pop(key, None)  # re-insert to keep the order of last occurrence
        latest[key] = ex
    return list(latest.values())


def is_heldout(group: str) -> bool:
    """Deterministic group split by hash instead of a random GroupShuffleSplit: the same group lands
    on the same side in every version, so a candidate and the active version can be compared on
    held-out data neither was trained on, and a group is never on both sides."""
    return int(_digest(group)[:8], 16) % 1000 < HELDOUT_FRACTION * 1000


def split(examples: list[LabelledPrompt]) -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
    train = [ex for ex in examples if not is_heldout(group_of(ex))]
    test = [ex for ex in examples if is_heldout(group_of(ex))]
    # a category whose every example hashed to the held-out side goes to training whole (groups stay
    # together): a classifier that never saw a category cannot route to it
    trained = {ex.category for ex in train}
    moved = [ex for ex in test if ex.category not in trained]
    if moved:
        train += moved
        test = [ex for ex in test if ex.category in trained]
    return train, test


def data_hash(examples: Iterable[LabelledPrompt]) -> str:
    rows = sorted(f"{normalise_prompt(ex.prompt)}\t{ex.category}" for ex in examples)
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def prepare(
    config: CoEConfig, examples: Iterable[LabelledPrompt]
) -> tuple[list[LabelledPrompt], dict[str, int]]:
    """Keep examples of the taxonomy's routed categories (others counted by label), deduplicated,
    text capped like routed text; raise when a category has too few examples."""
    kept, skipped = [], Counter()
    for ex in examples:
        if ex.category in config.categories and ex.prompt.strip():
            kept.append(
                LabelledPrompt(ex.prompt[: config.router.context_chars], ex.category, ex.source, ex.group)
            )
        else:
            skipped[ex.category] += 1
    kept = dedupe(kept)
    counts = Counter(ex.category for ex in kept)
    short = {c: counts.get(c, 0) for c in config.categories if counts.get(c, 0) < MIN_PER_CATEGORY}
    if short:
        raise ValueError(
            f"too few labelled prompts to train the router: {short} "
            f"(need >= {MIN_PER_CATEGORY} per category). "
            f'Add {{"prompt", "category"}} lines for them to {config.router.seed_data} '
            "or remove those categories from spaces.yaml"
        )
    return kept, dict(skipped)


def train_router(
    config: CoEConfig,
    examples: list[LabelledPrompt],
    *,
    parent: str | None = None,
    embedder: Embedder | None = None,
    progress: Progress | None = print_progress,
    seed_file: dict[str, Any] | None = None,
) -> RouterArtifact:
    """Train, evaluate on the held-out groups and save a new router version (not activated)."""
    say = progress or (lambda _m: None)
    embedder = embedder or get_embedder(
        config.router.embedder, config.router.max_seq_tokens, config.router.threads
    )
    kept, skipped = prepare(config, examples)
    train, test = split(kept)
    say(f"router: embedding {len(kept)} labelled prompts with {config.router.embedder}")
    x = embedder.embed([ex.prompt for ex in kept], use_cache=False)
    index = {id(ex): i for i, ex in enumerate(kept)}
    x_train = x[[index[id(ex)] for ex in train]]
    x_test = x[[index[id(ex)] for ex in test]] if test else np.zeros((0, x.shape[1]), dtype=x.dtype)
    y_train = np.array([ex.category for ex in train])
    say(f"router: comparing classifiers {config.router.classifiers} on {len(train)} training prompts")
    selection = select_and_fit(
        x_train, y_train, np.array([group_of(ex) for ex in train]), list(config.router.classifiers)
    )
    classes = list(selection.model.classes_)
    proba = np.zeros((len(test), len(config.categories)))
    if test:
        raw = selection.model.predict_proba(x_test)
        for j, c in enumerate(classes):
            proba[:, config.categories.index(c)] = raw[:, j]
    y_test = [ex.category for ex in test]
    y_pred = [config.categories[i] for i in proba.argmax(axis=1)] if test else []
    metrics = classification_metrics(y_test, y_pred, config.categories)
    correct = np.array([t == p for t, p in zip(y_test, y_pred, strict=True)], dtype=bool)
    metrics["at_threshold"] = (
        threshold_effect(confidence(proba, config.router.confidence), correct, config.router.threshold)
        if test
        else None
    )
    digest = data_hash(kept)
    meta: dict[str, Any] = {
        "id": new_version_id(digest),
        "categories": list(config.categories),
        "fallback_category": config.fallback_category,
        "embedder": config.router.embedder,
        "embedding_dim": int(x.shape[1]),
        "max_seq_tokens": config.router.max_seq_tokens,
        "classifier": selection.describe(),
        "confidence": config.router.confidence,
        # None until `coe calibrate-router` sets it; until then router.threshold of spaces.yaml applies
        "threshold": None,
        "metrics": metrics,
        "trained_at": datetime.now(UTC).isoformat(),
        "samples": {
            "total": len(kept),
            "train": len(train),
            "heldout": len(test),
            "by_source": dict(Counter(ex.source for ex in kept)),
            "by_category": {c: sum(ex.category == c for ex in kept) for c in config.categories},
            "skipped_labels": skipped,
        },
        "data_hash": digest,
        "parent": parent,
        "seed_file": seed_file,
    }
    heldout = [
        {"prompt": ex.prompt, "category": ex.category, "source": ex.source, "group": group_of(ex)}
        for ex in test
    ]
    artifact = save_artifact(config.data_path, meta, selection.model, heldout, proba)
    say(
        f"router: saved version {meta['id']} ({selection.name}, held-out macro-F1 {metrics['macro_f1']:.3f} "
        f"on {len(test)} prompts)"
    )
    return artifact


def evaluate(router: Any, examples: list[LabelledPrompt], *, with_fallback: bool = False) -> dict[str, Any]:
    """Metrics of ``router`` (a :class:`coe_core.routing.router.Router`) on labelled examples.

    Without fallback the classifier's winner is compared with the label (what versions are compared
    on); with fallback a prompt below the threshold counts as ``general`` and is wrong unless the label
    is ``general``.
    """
    if not examples:
        raise ValueError("no labelled examples to evaluate on")
    results = router.classify([ex.prompt for ex in examples], use_cache=False)
    y_true = [ex.category for ex in examples]
    y_pred = [r.category if with_fallback else r.top_category for r in results]
    order = [*router.categories, router.fallback_category]
    metrics = classification_metrics(y_true, y_pred, order)
    metrics["fallback_rate"] = round(float(np.mean([r.fallback for r in results])), 4)
    metrics["accuracy_without_fallback"] = round(
        float(np.mean([r.top_category == t for r, t in zip(results, y_true, strict=True)])), 4
    )
    return metrics


def should_promote(
    candidate: dict[str, Any], active: dict[str, Any] | None, *, force: bool = False
) -> tuple[bool, str]:
    """A candidate replaces the active version only if its held-out macro-F1 is not worse."""
    if force:
        return True, "forced"
    if active is None:
        return True, "no compatible active version to compare with"
    c, a = candidate["macro_f1"], active["macro_f1"]
    if c >= a:
        return True, f"held-out macro-F1 {c:.4f} >= active {a:.4f}"
    return (
        False,
        f"held-out macro-F1 {c:.4f} < active {a:.4f}: kept the active version (use --force to promote)",
    )
