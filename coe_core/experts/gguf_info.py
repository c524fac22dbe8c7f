"""What a GGUF file says about itself: architecture, sizes, context, chat template, parameter count.

Read by hand (a few hundred KB of header, ~0.1 s) because ``gguf.GGUFReader`` maps the whole file and builds
numpy views of every field: 9 s for Gemma 3 270M's 262k-token vocabulary here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: llama.cpp's file types (``general.file_type``), for display
_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


class _Reader:
    def __init__(self, fh, chunk: int = 1 << 20):
        self.fh, self.chunk = fh, chunk
        self.buf, self.pos = b"", 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            more = self.fh.read(max(self.chunk, n))
            self.buf = self.buf[self.pos :] + more
            self.pos = 0
            if len(self.buf) < n:
                raise ValueError("GGUF header ends early")

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 26:
            raise ValueError("implausible string length in GGUF header")
        self.need(n)
        text = self.buf[self.pos : self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return text

    def value(self, kind: int, keep: bool):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS and not keep:  # skip fixed-size arrays without decoding them
                size = struct.calcsize(_SCALARS[item]) * n
                while size:
                    self.need(1)
                    step = min(size, len(self.buf) - self.pos)
                    self.pos += step
                    size -= step
                return None
            values = [self.value(item, keep) for _ in range(n)]
            return values if keep else None
        raise ValueError(f"unknown GGUF value type {kind}")


@dataclass
class GGUFInfo:
    architecture: str
    metadata: dict = field(repr=False)
    tensors: int = 0
    params: int = 0

    @classmethod
    def read(cls, path: Path) -> GGUFInfo:
        with open(path, "rb") as fh:
            r = _Reader(fh)
            r.need(4)
            if r.buf[:4] != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file")
            r.pos = 4
            version = r.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            metadata = {}
            for _ in range(n_kv):
                key = r.string()
                kind = r.unpack("<I")
                # arrays (vocabulary, merges, scores) are skipped; scalars and strings are kept
                metadata[key] = r.value(kind, keep=False)
            params = 0
            for _ in range(n_tensors):
                r.string()
                dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
                r.unpack("<I")
                r.unpack("<Q")
                n = 1
                for d in dims:
                    n *= d
                params += n
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError(f"{path} names no general.architecture")
        return cls(arch, metadata, n_tensors, params)

    def _arch(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def context_length(self) -> int | None:
        return self._arch("context_length")

    @property
    def chat_template(self) -> str | None:
        template = self.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template else None

    @property
    def file_type(self) -> str:
        ft = self.metadata.get("general.file_type")
        return _FILE_TYPES.get(ft, f"type{ft}") if ft is not None else "gguf"

    def kv_bytes_per_token(self) -> int:
        """Bytes of llama.cpp's KV cache per token of context (f16 keys and values, every layer full size)."""
        layers = int(self._arch("block_count", 0))
        heads = int(self._arch("attention.head_count", 1) or 1)
        kv_heads = self._arch("attention.head_count_kv", heads)
        if not isinstance(kv_heads, int):  # a per-layer array (a few architectures): count every head
            kv_heads = heads
        head_dim = int(self._arch("embedding_length", 0)) // heads
        k_len = int(self._arch("attention.key_length", head_dim))
        v_len = int(self._arch("attention.value_length", head_dim))
        return layers * int(kv_heads) * (k_len + v_len) * 2
