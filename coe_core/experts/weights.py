"""The weights files of the disk tier, and the lock every module construction holds.

A ground-floor module (it imports nothing of the project): ``experts/materialize.py`` writes these files and
``tiers/loader.py`` and ``tiers/split.py`` read them, so what both sides need lives here, below both, and
neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path

import torch

#: the converted checkpoint of an expert: one shard, so a swap is one large parallel read into one buffer
WEIGHTS_FILE = "model.safetensors"
#: the GGUF file itself, for an expert on the llama.cpp runtime
GGUF_FILE = "model.gguf"
MANIFEST_FILE = "manifest.json"

#: Building modules is not thread-safe: accelerate's ``init_empty_weights`` (and transformers' loading, which
#: uses the same trick) patch ``nn.Module.register_parameter`` process-wide, so a module built in another thread
#: at that moment would get meta weights. Every module construction in the project holds this lock.
MODULE_BUILD_LOCK = threading.RLock()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file; raises ValueError if malformed."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("file shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            raise ValueError("safetensors header length is implausible")
        header = json.loads(fh.read(length))
    return 8 + length, header


def check_gguf_magic(path: Path) -> None:
    """Raise ValueError unless ``path`` starts like a GGUF file (magic and a known version)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) != 8 or head[:4] != b"GGUF" or struct.unpack("<I", head[4:])[0] not in (2, 3):
        raise ValueError("not a GGUF file (bad magic or version)")
