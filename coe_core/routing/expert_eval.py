"""Expert score table S[expert][category] measured on the per-category eval sets (``coe eval-experts``).

Metric: for every ``{"prompt", "reference"}`` pair of ``assets/eval/<category>.jsonl`` the expert
is given the prompt in its own prompt format (exactly as for generation) and we take the mean
per-token log-likelihood of the reference answer (sum of log-probs / reference tokens). An expert's
raw score for a category is the mean of that over the category's pairs (each pair weighs the same).

Normalisation within each category: ``score = exp(raw - max_expert raw)``, i.e. the expert's
geometric-mean per-token likelihood of the references relative to the best expert in that category
(1.0 = best, 0.5 = half as likely per token). Unlike min-max or z-scores it keeps the size of the
gap with only two experts, and it is comparable across categories for the optimiser. The fallback
category's column is each expert's mean normalised score over the categories.

Raw values are cached per (expert, category, eval-file hash) in the table itself, so a rerun only
measures what changed; the table records how it was made (metric, eval-set hashes, experts, date).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from coe_core.routing.training import iter_jsonl

METRIC = (
    "mean per-token log-likelihood of the reference answer under the expert's own prompt format, "
    "averaged over the category's pairs"
)
NORMALISATION = "exp(raw - best raw in the category): per-token likelihood relative to the best expert (1 = best)"

#: (expert_id, messages, reference) -> (sum of log-probs of the reference tokens, token count)
ReferenceLogprob = Callable[[str, list[dict], str], tuple[float, int]]


@dataclass
class EvalSet:
    category: str
    path: Path
    items: list[dict[str, str]]
    sha256: str


def load_eval_sets(eval_dir: Path, categories: list[str]) -> dict[str, EvalSet]:
    """``<eval_dir>/<category>.jsonl`` for every category; a missing or malformed file is an error."""
    sets, missing = {}, []
    for cat in categories:
        path = Path(eval_dir) / f"{cat}.jsonl"
        if not path.exists():
            missing.append(str(path))
            continue
        raw = path.read_bytes()
        items = []
        for number, row in iter_jsonl(raw, path, '{"prompt": "...", "reference": "..."}'):
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "reference")
            ):
                raise ValueError(f'{path}:{number} needs non-empty string fields "prompt" and "reference"')
            items.append({"prompt": row["prompt"], "reference": row["reference"]})
        if not items:
            raise ValueError(f'{path} has no pairs: add {{"prompt", "reference"}} lines')
        sets[cat] = EvalSet(cat, path, items, hashlib.sha256(raw).hexdigest())
    if missing:
        raise FileNotFoundError(
            f"eval sets missing for {len(missing)} categories: {', '.join(missing)}; "
            'write {"prompt", "reference"} lines per category (see assets/eval/README.md)'
        )
    return sets


def mean_token_logprob(
    reference_logprob: ReferenceLogprob, expert: str, items: list[dict[str, str]], bar: Any | None = None
) -> float:
    per_pair = []
    for item in items:
        total, count = reference_logprob(expert, [{"role": "user", "content": item["prompt"]}], item["reference"])
        if count <= 0:
            raise ValueError(f"expert {expert}: the reference {item['reference'][:40]!r}... has no tokens")
        per_pair.append(total / count)
        if bar is not None:
            bar.update(1)
    return sum(per_pair) / len(per_pair)


def normalise(raw: dict[str, dict[str, float]], categories: list[str], fallback: str) -> dict[str, dict[str, float]]:
    """Per category: exp(raw - best raw); the fallback column is the mean over categories."""
    out: dict[str, dict[str, float]] = {e: {} for e in raw}
    for cat in categories:
        values = {e: row[cat] for e, row in raw.items() if cat in row}
        if not values:
            continue
        best = max(values.values())
        for e, v in values.items():
            out[e][cat] = round(math.exp(v - best), 6)
    for row in out.values():
        if row:
            row[fallback] = round(sum(row.values()) / len(row), 6)
    return out


def eval_experts(
    reference_logprob: ReferenceLogprob,
    experts: list[str],
    eval_sets: dict[str, EvalSet],
    *,
    fallback: str,
    params: dict[str, int],
    cache_path: Path,
    force: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Measure (or reuse cached) raw scores, normalise, write the table to ``cache_path``, return it."""
    previous: dict[str, Any] = {}
    if cache_path.exists() and not force:
        try:
            previous = json.loads(cache_path.read_text(encoding="utf-8")).get("method", {}).get("raw", {})
        except (json.JSONDecodeError, AttributeError):
            previous = {}
    raw: dict[str, dict[str, dict[str, Any]]] = {e: {} for e in experts}
    todo = []
    for e in experts:
        for cat, es in eval_sets.items():
            hit = previous.get(e, {}).get(cat)
            if hit and hit.get("eval_sha256") == es.sha256:
                raw[e][cat] = hit
            else:
                todo.append((e, cat))
    total = sum(len(eval_sets[c].items) for _, c in todo)
    with tqdm(total=total, desc="eval-experts", unit="pair", disable=not show_progress or not total) as bar:
        for e, cat in todo:
            bar.set_postfix_str(f"{e} / {cat}")
            es = eval_sets[cat]
            value = mean_token_logprob(reference_logprob, e, es.items, bar)
            raw[e][cat] = {"value": round(value, 6), "eval_sha256": es.sha256, "n": len(es.items)}
            # written after every category: an interrupted run resumes from here (the service uses the
            # table only once it covers every expert and category)
            _write_table(cache_path, _table(raw, experts, eval_sets, fallback, params, todo))
    table = _table(raw, experts, eval_sets, fallback, params, todo)
    _write_table(cache_path, table)
    return table


def _table(
    raw: dict,
    experts: list[str],
    eval_sets: dict[str, EvalSet],
    fallback: str,
    params: dict[str, int],
    todo: list[tuple[str, str]],
) -> dict[str, Any]:
    measured = {e: {c: v for c, v in row.items() if v} for e, row in raw.items()}
    categories = list(eval_sets)
    scores = normalise(
        {e: {c: v["value"] for c, v in row.items()} for e, row in measured.items() if row}, categories, fallback
    )
    table = {
        "scores": scores,
        "params": {e: int(params[e]) for e in experts if e in params},
        "method": {
            "kind": "measured with coe eval-experts",
            "metric": METRIC,
            "normalisation": NORMALISATION,
            "fallback_column": f"{fallback}: mean of the expert's normalised category scores",
            "eval_sets": {
                c: {"file": str(es.path), "sha256": es.sha256, "n": len(es.items)} for c, es in eval_sets.items()
            },
            "experts": experts,
            "date": datetime.now(UTC).isoformat(),
            "measured_now": [f"{e}/{c}" for e, c in todo],
            "raw": raw,
        },
    }
    return table


def _write_table(cache_path: Path, table: dict[str, Any]) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2), encoding="utf-8")
    tmp.replace(cache_path)
