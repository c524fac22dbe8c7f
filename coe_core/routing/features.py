"""Features of a routed text, fused into one vector for a linear classifier.

Blocks (``router.features`` in spaces.yaml; the comparison that chose the default is in the routing
README):

- ``tokens``: static token embeddings of a multilingual LLM tokenizer (Gemma 3, 140 languages;
  see token_table.py), IDF-weighted means over the whole text, its first and its last tokens (IDF
  from the training prompts: without it "the", "my", "的" dominate every mean).
- ``chars``: character 1-4-gram TF-IDF of the text's head and tail (any script; strong on code and
  math notation, typos and transliteration). Hashed, so nothing but the IDF weights is stored.
- ``sentence``: the sentence embedder (all-MiniLM-L6-v2) of the text's head and tail; English only,
  so it is scaled by the text's share of Latin letters.
- ``shape``: a few numbers about the text (length, lines, code and digit share, non-Latin share),
  so that "a long paste" is something the classifier sees without it deciding the category.

Each dense block is unit length and multiplied by its weight; the sparse block is L2-normalised
TF-IDF. The fitted state (IDF weights of tokens and of character n-grams) is pickled with the
classifier; the heavy resources (token table, sentence model) are process-wide and bound after loading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from coe_core.routing.text import head_tail

BLOCKS = ("tokens", "chars", "sentence", "shape")
#: characters of a long text the ``chars`` and ``sentence`` blocks read (its head and tail)
WINDOW_CHARS = 600
#: tokens of the head and tail windows of the ``tokens`` block
TOKEN_WINDOW = 48

_CODE = re.compile(r"[{}();=<>\[\]#$`\\|&]")
_DIGIT = re.compile(r"\d")
_LATIN = re.compile(r"[A-Za-z]")


def latin_share(texts: Sequence[str]) -> np.ndarray:
    """Per text, the share of its letters that are Latin (1 for a text without letters)."""
    out = []
    for t in texts:
        letters = sum(ch.isalpha() for ch in t)
        out.append(len(_LATIN.findall(t)) / letters if letters else 1.0)
    return np.asarray(out, dtype=np.float32)


def shape_features(texts: Sequence[str]) -> np.ndarray:
    rows = []
    for t in texts:
        n = max(len(t), 1)
        letters = sum(ch.isalpha() for ch in t) or 1
        rows.append(
            [
                math.log1p(len(t)) / 8.0,
                math.log1p(t.count("\n")) / 5.0,
                len(_CODE.findall(t)) / n * 5,
                len(_DIGIT.findall(t)) / n * 3,
                1.0 - len(_LATIN.findall(t)) / letters,
                float("```" in t),
                float("?" in t[-200:] or "？" in t[-200:]),
            ]
        )
    return np.asarray(rows, dtype=np.float32)


@dataclass
class Resources:
    """The heavy, shared parts the blocks need: bound after an artifact is loaded."""

    token_table: Any | None = None  # token_table.TokenTable
    sentence: Any | None = None  # embedder.Embedder


@dataclass
class FeatureSet:
    """The configured blocks; ``fit`` learns the IDF weights, ``transform`` makes the matrix."""

    blocks: tuple[str, ...]
    weights: dict[str, float] = field(default_factory=dict)
    _chars: Any = None  # fitted (HashingVectorizer, TfidfTransformer)
    _token_idf: Any = None  # fitted IDF per token of the token table (float32 array)

    def __post_init__(self) -> None:
        unknown = [b for b in self.blocks if b not in BLOCKS]
        if unknown or not self.blocks:
            raise ValueError(f"router.features: unknown or no blocks {unknown}; use some of {list(BLOCKS)}")

    def weight(self, block: str) -> float:
        return float(self.weights.get(block, 1.0))

    def fit(self, texts: Sequence[str], resources: Resources) -> FeatureSet:
        if "tokens" in self.blocks:
            if resources.token_table is None:
                raise ValueError("the tokens block needs the token table")
            df = resources.token_table.document_frequency(texts)
            self._token_idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
        if "chars" in self.blocks:
            from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

            hashing = HashingVectorizer(
                analyzer="char_wb",
                ngram_range=(1, 4),
                n_features=2**18,
                alternate_sign=False,
                norm=None,
                lowercase=True,
            )
            tfidf = TfidfTransformer(sublinear_tf=True).fit(hashing.transform(_windows(texts)))
            self._chars = (hashing, tfidf)
        return self

    def transform(self, texts: Sequence[str], resources: Resources) -> sparse.csr_matrix:
        texts = list(texts)
        parts = []
        for block in self.blocks:
            w = self.weight(block)
            if block == "chars":
                if self._chars is None:
                    raise ValueError("the chars block is not fitted")
                hashing, tfidf = self._chars
                parts.append(tfidf.transform(hashing.transform(_windows(texts))) * w)
            elif block == "tokens":
                if resources.token_table is None:
                    raise ValueError("the tokens block needs the token table")
                pooled = resources.token_table.pooled(texts, TOKEN_WINDOW, self._token_idf)
                parts.append(sparse.csr_matrix(pooled * (w / math.sqrt(3))))
            elif block == "sentence":
                if resources.sentence is None:
                    raise ValueError("the sentence block needs the sentence embedder")
                # no embedder cache: the router remembers whole results of single texts itself
                vec = resources.sentence.embed(_windows(texts), use_cache=False)
                # MiniLM's vocabulary is English word pieces: on Chinese, Arabic or Korean text its vector
                # is noise the classifier would learn from, so the block speaks in proportion to the
                # text's share of Latin letters
                parts.append(sparse.csr_matrix(vec * (w * latin_share(texts))[:, None]))
            else:
                parts.append(sparse.csr_matrix(shape_features(texts) * w))
        return sparse.hstack(parts, format="csr")


def _windows(texts: Sequence[str]) -> list[str]:
    return [head_tail(t, WINDOW_CHARS) for t in texts]


def feature_resources(
    blocks: Sequence[str],
    *,
    token_source: str,
    cache_dir: Path,
    sentence: Callable[[], Any],
    progress: Callable[[str], None] | None = None,
) -> Resources:
    """Load (or build, once) what ``blocks`` need."""
    res = Resources()
    if "tokens" in blocks:
        from coe_core.routing.token_table import get_token_table

        res.token_table = get_token_table(token_source, cache_dir, progress)
    if "sentence" in blocks:
        res.sentence = sentence()
    return res
