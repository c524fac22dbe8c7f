"""Compare router representations on the development set, side by side (the routing README's table).

    python scripts/compare_router_features.py [--json out.json]

Trains one linear classifier per feature combination on the training data of spaces.yaml
(``router.seed_data``) and reports top-choice accuracy on the development set (``router.dev_data``) per
slice, with the time each block takes per prompt. "baseline" is the first router: MiniLM on the first
128 tokens of the text (no head and tail windows), RBF SVM. Slow the first time a block needs the
sentence embedder (MiniLM on every prompt: minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coe_core.config import load_config  # noqa: E402
from coe_core.routing.classifier import SoftmaxLinearSVC  # noqa: E402
from coe_core.routing.evaluation import slices_of  # noqa: E402
from coe_core.routing.features import FeatureSet  # noqa: E402
from coe_core.routing.service import RoutingService  # noqa: E402
from coe_core.routing.training import prepare  # noqa: E402

COMBOS = [
    ("tokens",),
    ("chars",),
    ("sentence",),
    ("tokens", "chars"),
    ("tokens", "sentence"),
    ("chars", "sentence"),
    ("tokens", "chars", "sentence"),
    ("tokens", "chars", "shape"),
]


def accuracy_by_slice(examples, predicted) -> dict[str, float]:
    by: dict[str, list[bool]] = defaultdict(list)
    for ex, p in zip(examples, predicted, strict=True):
        for s in ["all", *slices_of(ex)]:
            by[s].append(p == ex.category)
    return {s: round(float(np.mean(v)), 3) for s, v in sorted(by.items())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--json", default=None, help="write the results here as well")
    args = parser.parse_args()
    config = load_config(args.config, env=False)
    config = config.model_copy(
        update={"router": config.router.model_copy(update={"features": ["tokens", "chars", "sentence", "shape"]})}
    )
    service = RoutingService(config, progress=lambda m: print(m, file=sys.stderr))
    train, _ = prepare(config, service.seed_labelled())
    dev = service.dev_labelled()
    resources = service.resources()
    texts_train, texts_dev = [ex.prompt for ex in train], [ex.prompt for ex in dev]
    y = np.array([ex.category for ex in train])
    blocks, per_prompt_ms = {}, {}
    for block in ("tokens", "chars", "sentence", "shape"):
        fs = FeatureSet((block,)).fit(texts_train, resources)
        start = time.perf_counter()
        x_dev = fs.transform(texts_dev, resources)
        per_prompt_ms[block] = round((time.perf_counter() - start) * 1000 / len(dev), 2)
        blocks[block] = (fs.transform(texts_train, resources), x_dev)
        print(f"{block}: {per_prompt_ms[block]} ms per prompt (batched)", file=sys.stderr)
    rows = []
    for combo in COMBOS:
        x_train = sparse.hstack([blocks[b][0] for b in combo], format="csr")
        x_dev = sparse.hstack([blocks[b][1] for b in combo], format="csr")
        clf = SoftmaxLinearSVC(C=3.0, max_iter=5000, random_state=0).fit(x_train, y)
        rows.append(
            {
                "features": "+".join(combo),
                "ms_per_prompt": round(sum(per_prompt_ms[b] for b in combo), 2),
                **accuracy_by_slice(dev, clf.predict(x_dev)),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    # the first router: MiniLM on the start of the text only, RBF SVM with calibrated probabilities
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    embedder = resources.sentence
    truncated = embedder.embed(texts_train), embedder.embed(texts_dev)
    svm = CalibratedClassifierCV(SVC(C=1.0, kernel="rbf"), method="temperature", cv=3, ensemble=False)
    svm.fit(
        truncated[0][[i for i, ex in enumerate(train) if ex.category != "general"]],
        y[[i for i, ex in enumerate(train) if ex.category != "general"]],
    )
    rows.append(
        {
            "features": "baseline (MiniLM first 128 tokens, RBF SVM, no general class)",
            "ms_per_prompt": per_prompt_ms["sentence"],
            **accuracy_by_slice(dev, svm.predict(truncated[1])),
        }
    )
    print(json.dumps(rows[-1]), file=sys.stderr)
    slices = sorted(
        {k for r in rows for k in r if k not in ("features", "ms_per_prompt")}, key=lambda s: (s != "all", s)
    )
    print("| features | ms/prompt | " + " | ".join(slices) + " |")
    print("|---|---|" + "---|" * len(slices))
    for r in rows:
        print(f"| {r['features']} | {r['ms_per_prompt']} | " + " | ".join(str(r.get(s, "")) for s in slices) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n_train": len(train), "n_dev": len(dev), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
