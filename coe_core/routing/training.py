"""Training data of the category router and how a router version is trained and evaluated from it."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from coe_core.config import CoEConfig
from coe_core.labelled import LabelledPrompt
from coe_core.routing.artifact import RouterArtifact, columns, new_version_id, router_signature, save_artifact
from coe_core.routing.calibration import threshold_effect
from coe_core.routing.classifier import confidence, select_and_fit
from coe_core.routing.evaluation import evaluate_proba
from coe_core.routing.features import FeatureSet, Resources
from coe_core.routing.metrics import classification_metrics
from coe_core.routing.model import RouterModel, fit_temperature, scale_temperature
from coe_core.routing.text import head_tail, routed_text, text_of

#: share of groups held out for evaluation and calibration
HELDOUT_FRACTION = 0.2
#: fewer labelled prompts than this in a category cannot train a usable router
MIN_PER_CATEGORY = 3

Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    path: str | Path,
    categories: list[str],
    *,
    source: str = "seed",
    keep_labels: Iterable[str] = (),
    context_turns: int = 1,
    context_chars: int = 2000,
) -> LabelledFile:
    """Read ``{"prompt" | "messages", "category"[, "lang", "style", "group"]}`` lines. A ``messages``
    row (a conversation ending with the user's turn) becomes its routed text. Labels outside
    ``categories`` (+ ``keep_labels``) are counted, not loaded; a malformed line is an error naming it."""
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
    shape = '{"prompt": "...", "category": "..."} or {"messages": [...], "category": "..."}'
    for number, row in iter_jsonl(raw, path, shape):
        if not isinstance(row, dict) or not isinstance(row.get("category"), str):
            raise ValueError(f'{path}:{number} needs a string field "category" and a "prompt" or "messages"')
        messages = row.get("messages")
        if messages is None:
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{number} needs a string field "prompt" (or a "messages" list)')
            messages = [{"role": "user", "content": row["prompt"]}]
        try:
            text = routed_text(messages, context_turns, context_chars)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        if row["category"] not in allowed:
            outside[row["category"]] += 1
            continue
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        examples.append(
            LabelledPrompt(
                text,
                row["category"],
                source,
                str(row.get("group", "")),
                lang=str(row.get("lang", "")),
                style=str(row.get("style", "")),
                turns=len(users),
                chars=len(text_of(users[-1].get("content"))),
            )
        )
    return LabelledFile(examples, dict(outside), hashlib.sha256(raw).hexdigest())


def expand_paths(patterns: Iterable[str], resolve: Callable[[str], Path]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, resolved by ``resolve``), in order, each once.
    A pattern that matches nothing is an error: a typo must not silently shrink the training set."""
    out: list[Path] = []
    for pattern in patterns:
        path = resolve(pattern)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(path.parent.glob(path.name))
            if not matches:
                raise FileNotFoundError(f"{pattern!r} matches no file in {path.parent}")
        else:
            matches = [path]
        out += [m for m in matches if m not in out]
    return out


def load_labelled_files(paths: Iterable[Path], categories: list[str], **kwargs: Any) -> LabelledFile:
    """:func:`load_labelled_jsonl` over several files, concatenated (one sha256 over all of them)."""
    examples: list[LabelledPrompt] = []
    outside: Counter[str] = Counter()
    digest = hashlib.sha256()
    for path in paths:
        data = load_labelled_jsonl(path, categories, **kwargs)
        examples += data.examples
        outside.update(data.outside_taxonomy)
        digest.update(data.sha256.encode())
    return LabelledFile(examples, dict(outside), digest.hexdigest())


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


#: a line at least this long that two prompts share marks pasted material they have in common
SHARED_LINE_CHARS = 60


def group_shared_material(examples: list[LabelledPrompt]) -> list[LabelledPrompt]:
    """Put prompts that paste the same material (they share a line of >= 60 characters) into one group.

    The same report pasted once with "summarise it for the board" and once with "extract the revenue
    per year" must land on one side of the held-out split; otherwise the held-out prompt is judged by
    its material's twin in training, which has another label, and the held-out figures (and the
    temperature fitted on them) describe that artefact instead of new traffic. Explicit groups win.
    """
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with_line: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.group:
            continue
        for line in ex.prompt.splitlines():
            line = line.strip()
            if len(line) < SHARED_LINE_CHARS:
                continue
            j = first_with_line.setdefault(line, i)
            if j != i:
                parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for i in range(len(examples)):
        members.setdefault(root(i), []).append(i)
    out = list(examples)
    for indices in members.values():
        if len(indices) > 1:
            name = f"material:{_digest(normalise_prompt(examples[indices[0]].prompt))[:16]}"
            for i in indices:
                out[i] = replace(examples[i], group=name)
    return out


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


def prepare(config: CoEConfig, examples: Iterable[LabelledPrompt]) -> tuple[list[LabelledPrompt], dict[str, int]]:
    """Keep examples of the taxonomy's categories and of the fallback category (others counted by
    label), deduplicated, text capped like routed text; raise when a category has too few examples."""
    kept, skipped = [], Counter()
    for ex in examples:
        if ex.category in config.all_categories and ex.prompt.strip():
            kept.append(replace(ex, prompt=head_tail(ex.prompt, config.router.context_chars)))
        else:
            skipped[ex.category] += 1
    kept = group_shared_material(dedupe(kept))
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


def heldout_row(ex: LabelledPrompt) -> dict[str, Any]:
    return {
        "prompt": ex.prompt,
        "category": ex.category,
        "source": ex.source,
        "group": group_of(ex),
        "lang": ex.lang,
        "style": ex.style,
        "turns": ex.turns,
        "chars": ex.chars,
    }


def from_heldout_row(row: dict[str, Any]) -> LabelledPrompt:
    return LabelledPrompt(
        row["prompt"],
        row["category"],
        row.get("source", ""),
        row.get("group", ""),
        row.get("lang", ""),
        row.get("style", ""),
        int(row.get("turns", 1)),
        int(row.get("chars", len(row["prompt"]))),
    )


def train_router(
    config: CoEConfig,
    examples: list[LabelledPrompt],
    *,
    resources: Resources,
    parent: str | None = None,
    progress: Progress | None = print_progress,
    seed_file: dict[str, Any] | None = None,
) -> RouterArtifact:
    """Train, calibrate (temperature) and evaluate on the held-out groups, and save a new router
    version (not activated)."""
    say = progress or (lambda _m: None)
    kept, skipped = prepare(config, examples)
    train, test = split(kept)
    labels = [c for c in config.all_categories if any(ex.category == c for ex in kept)]
    features = FeatureSet(tuple(config.router.features))
    features.fit([ex.prompt for ex in train], resources)
    say(f"router: features {'+'.join(features.blocks)} of {len(kept)} labelled prompts")
    x = features.transform([ex.prompt for ex in kept], resources)
    index = {id(ex): i for i, ex in enumerate(kept)}
    x_train = x[[index[id(ex)] for ex in train]]
    x_test = x[[index[id(ex)] for ex in test]]
    y_train = np.array([ex.category for ex in train])
    say(f"router: comparing classifiers {config.router.classifiers} on {len(train)} training prompts")
    selection = select_and_fit(
        x_train, y_train, np.array([group_of(ex) for ex in train]), list(config.router.classifiers)
    )
    model = RouterModel(features, selection.model)
    proba = np.zeros((len(test), len(labels)))
    temperature = 1.0
    if test:
        raw = columns(selection.model.predict_proba(x_test), model.classes, labels)
        temperature = fit_temperature(raw, np.array([labels.index(ex.category) for ex in test]))
        proba = scale_temperature(raw, temperature)
    y_test = [ex.category for ex in test]
    y_pred = [labels[i] for i in proba.argmax(axis=1)] if test else []
    metrics = classification_metrics(y_test, y_pred, labels)
    correct = np.array([t == p for t, p in zip(y_test, y_pred, strict=True)], dtype=bool)
    metrics["at_threshold"] = (
        threshold_effect(confidence(proba, config.router.confidence), correct, config.router.threshold)
        if test
        else None
    )
    digest = data_hash(kept)
    meta: dict[str, Any] = {
        "id": new_version_id(digest),
        **router_signature(config.router, config.categories),
        "labels": labels,
        "fallback_category": config.fallback_category,
        "classifier": selection.describe(),
        # fitted on the held-out split here; calibration on the development set replaces it
        "temperature": round(temperature, 4),
        "confidence": config.router.confidence,
        # None until calibrated on the development set (or `coe calibrate-router`); until then
        # router.threshold of spaces.yaml applies
        "threshold": None,
        "metrics": metrics,
        "trained_at": datetime.now(UTC).isoformat(),
        "samples": {
            "total": len(kept),
            "train": len(train),
            "heldout": len(test),
            "by_source": dict(Counter(ex.source for ex in kept)),
            "by_category": {c: sum(ex.category == c for ex in kept) for c in labels},
            "skipped_labels": skipped,
        },
        "data_hash": digest,
        "parent": parent,
        "seed_file": seed_file,
    }
    artifact = save_artifact(config.data_path, meta, model, [heldout_row(ex) for ex in test], proba)
    say(
        f"router: saved version {meta['id']} ({selection.name}, temperature {temperature:.2f}, held-out "
        f"macro-F1 {metrics['macro_f1']:.3f} on {len(test)} prompts)"
    )
    return artifact


def evaluate(router: Any, examples: list[LabelledPrompt], *, with_fallback: bool = False) -> dict[str, Any]:
    """Metrics of ``router`` (a :class:`coe_core.routing.router.Router`) on labelled examples.

    Without fallback the classifier's winner is compared with the label (what versions are compared
    on); with fallback a prompt below the threshold counts as ``general`` and is wrong unless the label
    is ``general``. Either way the result has the slices, ECE and reliability table of
    :func:`coe_core.routing.evaluation.evaluate_proba`.
    """
    if not examples:
        raise ValueError("no labelled examples to evaluate on")
    proba = router.predict_proba([ex.prompt for ex in examples], use_cache=False)
    return evaluate_proba(
        proba,
        router.categories,
        examples,
        threshold=router.threshold if with_fallback else 0.0,
        fallback=router.fallback_category,
        confidence_kind=router.confidence_kind,
    )


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
