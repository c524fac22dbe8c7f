"""Static token embeddings of an LLM's tokenizer, as a router feature that reads every language.

Gemma 3's tokenizer has 262,144 tokens covering about 140 languages, and its input embedding table
places translations near each other (nearest tokens of ``▁código``: ``▁codigo``, ``▁codice``,
``▁코드``, ``▁CODE``, ``代码``). The packaged Gemma 3 270M GGUF carries that table (Q8_0), so the
router gets a multilingual representation offline, from a package we already install for an expert.

Building it once (dequantise the table, convert the tokenizer) takes about 40 s; the result is
cached as ``tokenizer.json`` + ``embeddings.npy`` (float16, 335 MB for Gemma 3) in a folder keyed by the
source and its version (the package's version, or a ``gguf:`` file's size and modification time), so an
upgraded package or a replaced file builds a new table. Loading memory-maps the file and then reads every
page once (a lazy map is not a load: the first prompts after a cold start would pay the disk reads).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from coe_core.errors import ConfigError

#: the tensor of a GGUF file that holds the input token embeddings
EMBEDDING_TENSOR = "token_embd.weight"


class TokenTableError(ConfigError):
    """The token table cannot be built or read; the message says what to do."""


def _gguf_path(source: str, scratch: Path) -> Path:
    from coe_core.errors import ExpertUnavailable
    from coe_core.experts.sources import resolve_source

    try:
        resolved = resolve_source(source, scratch)
    except ExpertUnavailable as exc:
        raise TokenTableError(f"router token table {source!r}: {exc}") from None
    if not resolved.is_gguf:
        raise TokenTableError(f"router token table {source!r} must be a GGUF file (gguf: or package: source)")
    return Path(resolved.location) / resolved.gguf_file


def build_table(gguf_file: Path, folder: Path) -> None:
    """Write ``tokenizer.json`` and ``embeddings.npy`` of ``gguf_file`` into ``folder`` (atomically)."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(gguf_file))
    tensor = next((t for t in reader.tensors if t.name == EMBEDDING_TENSOR), None)
    if tensor is None:
        raise TokenTableError(f"{gguf_file} has no {EMBEDDING_TENSOR} tensor")
    table = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    table = np.asarray(table, dtype=np.float32).reshape(-1, table.shape[-1])
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    if len(tokenizer) < table.shape[0] * 0.9:
        raise TokenTableError(f"{gguf_file}: tokenizer has {len(tokenizer)} tokens, table {table.shape[0]} rows")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        np.save(tmp / "embeddings.npy", table.astype(np.float16))
        (tmp / "meta.json").write_text(
            json.dumps({"gguf": str(gguf_file), "rows": int(table.shape[0]), "dim": int(table.shape[1])})
        )
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "embeddings.npy").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process built the same table first: use it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TokenTable:
    """A tokenizer and its static token embeddings; pools windows of a text into fixed vectors."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.table = np.load(folder / "embeddings.npy", mmap_mode="r")
        self.dim = int(self.table.shape[1])
        self._touch()
        special = (
            self.tokenizer.get_added_tokens_decoder() if hasattr(self.tokenizer, "get_added_tokens_decoder") else {}
        )
        # one mask over the table's rows, built once: np.isin against the 6k added tokens per text cost ~1 ms
        self._keep = np.ones(self.table.shape[0], dtype=bool)
        added = np.array(sorted(special), dtype=np.int64)
        self._keep[added[(added >= 0) & (added < len(self._keep))]] = False

    def _touch(self, rows: int = 16384) -> None:
        """Read every page of the table once (into the page cache), so routing never waits for the disk."""
        for start in range(0, self.table.shape[0], rows):
            np.asarray(self.table[start : start + rows]).sum()

    def token_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for enc in encodings:
            ids = np.asarray(enc.ids, dtype=np.int64)
            ids = ids[ids < len(self._keep)]
            ids = ids[self._keep[ids]]
            out.append(ids)
        return out

    def document_frequency(self, texts: Sequence[str]) -> np.ndarray:
        """How many of ``texts`` contain each token (one count per text)."""
        df = np.zeros(self.table.shape[0], dtype=np.float32)
        for ids in self.token_ids(texts):
            df[np.unique(ids)] += 1
        return df

    def pooled(self, texts: Sequence[str], window: int, weights: np.ndarray | None = None) -> np.ndarray:
        """(n, 3 * dim): weighted mean embedding of all tokens, of the first ``window`` and of the last
        ``window`` tokens, each scaled to unit length (a request sits at one end of a long paste).

        ``weights`` (one per token, e.g. IDF from the training prompts) keep function words, which
        every text has, from drowning what the text is about."""
        out = np.zeros((len(texts), 3 * self.dim), dtype=np.float32)
        for i, ids in enumerate(self.token_ids(texts)):
            if not len(ids):
                continue
            vecs = np.asarray(self.table[ids], dtype=np.float32)
            if weights is not None:
                vecs = vecs * weights[ids][:, None]
            for j, part in enumerate((vecs, vecs[:window], vecs[-window:])):
                total = part.sum(axis=0)
                norm = float(np.linalg.norm(total))
                if norm > 0:
                    out[i, j * self.dim : (j + 1) * self.dim] = total / norm
        return out


_TABLES: dict[str, TokenTable] = {}
_LOCK = threading.Lock()


def get_token_table(source: str, cache_dir: Path, progress: Callable[[str], None] | None = None) -> TokenTable:
    """The process-wide token table of ``source`` (``package:...`` or ``gguf:...``), built into
    ``cache_dir`` on first use."""
    with _LOCK:
        key = f"{source}@{cache_dir}"
        if key in _TABLES:
            return _TABLES[key]
        folder = Path(cache_dir) / _slug(f"{source}@{_source_version(source)}")
        if not (folder / "embeddings.npy").exists():
            say = progress or (lambda _m: None)
            say(f"router: building the token table of {source} (once, about 40 s)")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(dir=cache_dir, prefix="scratch-"))  # one per build
            try:
                build_table(_gguf_path(source, scratch), folder)
            except TokenTableError:
                raise
            except Exception as exc:  # a damaged GGUF, a tokenizer transformers cannot convert, a full disk
                raise TokenTableError(f"router token table {source!r} could not be built: {exc}") from None
            finally:  # an assembled copy of a chunked GGUF is only needed while building
                shutil.rmtree(scratch, ignore_errors=True)
        try:
            table = TokenTable(folder)
        except Exception as exc:
            raise TokenTableError(
                f"router token table in {folder} is damaged ({exc}); delete that folder to rebuild it"
            ) from None
        _TABLES[key] = table
        return table


def _source_version(source: str) -> str:
    """What identifies the bytes behind ``source``: the installed package's version, or a file's size and
    modification time (cheap: no hashing of a 250 MB file on every start)."""
    from coe_core.experts.sources import SourceSpec

    spec = SourceSpec.parse(source)
    if spec.kind == "package":
        from importlib.metadata import PackageNotFoundError, version

        for name in (spec.target, spec.target.replace("_", "-")):
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return "unknown"
    path = Path(os.path.expanduser(spec.target)) / (spec.gguf_file or "")
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}-{int(st.st_mtime)}"


def _slug(source: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in source)[:120]
