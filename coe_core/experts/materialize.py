"""The disk tier: each expert materialised once into a folder of safetensors in the compute dtype.

Folder layout (``<data_dir>/experts/<expert>/<dtype>/``)::

    model.safetensors   one file, so a swap is one large parallel read into one buffer
    config.json, generation_config.json, tokenizer files
    manifest.json       params, bytes, dtype, sha256, source, created_at

A GGUF expert on the llama.cpp runtime keeps the GGUF file itself instead (``<data_dir>/experts/<expert>/gguf/``:
``model.gguf`` + ``manifest.json``, copied and hashed in one pass, no float32 conversion).

Materialising is atomic (temp dir + rename) and idempotent; a folder whose manifest is missing or whose
weights do not match it is re-materialised.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from coe_core.config import ExpertConfig
from coe_core.errors import ExpertUnavailable
from coe_core.experts.sources import load_from_source, resolve_source
from coe_core.experts.weights import (
    GGUF_FILE,
    MANIFEST_FILE,
    MODULE_BUILD_LOCK,
    WEIGHTS_FILE,
    check_gguf_magic,
    dtype_name,
    safetensors_header,
    sha256_file,
)

#: the disk-tier folder name of GGUF copies (beside the dtype folders of converted copies)
GGUF_FOLDER = "gguf"
FORMAT_VERSION = 1


def expert_folder(data_dir: Path, expert_id: str, dtype: torch.dtype) -> Path:
    return data_dir / "experts" / expert_id / dtype_name(dtype)


@dataclass
class DiskCopy:
    """A materialised expert in the disk tier."""

    expert: str
    folder: Path
    manifest: dict

    @property
    def weights_path(self) -> Path:
        return self.folder / self.manifest.get("weights_file", WEIGHTS_FILE)

    @property
    def is_gguf(self) -> bool:
        return self.manifest.get("weights_file") == GGUF_FILE

    @property
    def bytes(self) -> int:
        return int(self.manifest["bytes"])

    @property
    def params(self) -> int:
        return int(self.manifest["params"])

    def problem(self, *, full: bool) -> str | None:
        """Why this copy cannot be used (None if fine). ``full`` also checks the sha256 of every byte."""
        path = self.weights_path
        if not path.is_file():
            return f"weights file {path} is missing"
        size = path.stat().st_size
        if size != self.manifest.get("file_bytes"):
            return f"weights file {path} has {size} bytes, manifest says {self.manifest.get('file_bytes')}"
        try:
            if self.is_gguf:
                check_gguf_magic(path)
            else:
                safetensors_header(path)
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"weights file {path} has a corrupt header ({exc})"
        if full and sha256_file(path) != self.manifest.get("sha256"):
            return f"weights file {path} does not match its sha256 (corrupt or changed on disk)"
        return None


def read_disk_copy(folder: Path, expert_id: str) -> DiskCopy | None:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        return None
    return DiskCopy(expert_id, folder, manifest)


def materialize(
    expert_id: str, cfg: ExpertConfig, data_dir: Path, dtype: torch.dtype, *, progress: bool = True, force: bool = False
) -> DiskCopy:
    """Make sure a disk copy of the expert exists and return it (idempotent, atomic).

    ``force`` writes a new copy even if one is there (the caller found it corrupt).
    """
    folder = expert_folder(data_dir, expert_id, dtype)
    existing = None if force else read_disk_copy(folder, expert_id)
    if existing and existing.manifest.get("source") == cfg.source and existing.problem(full=False) is None:
        return existing

    steps = tqdm(total=4, desc=f"materialise {expert_id}", unit="step", disable=not progress, leave=True)
    started = time.perf_counter()
    steps.set_postfix_str("resolve source")
    resolved = resolve_source(cfg.source, data_dir / "sources", cfg.revision)
    steps.update()
    steps.set_postfix_str(f"load {resolved.description}")
    with MODULE_BUILD_LOCK:
        model, tokenizer = load_from_source(resolved, dtype)
    steps.update()

    tmp = folder.parent / f".tmp-{folder.name}-{time.time_ns()}"
    tmp.mkdir(parents=True)
    try:
        steps.set_postfix_str("write safetensors")
        # One shard: a swap then reads one contiguous file into one buffer.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")
        tokenizer.save_pretrained(tmp)
        weights = tmp / WEIGHTS_FILE
        if not weights.is_file():
            raise ExpertUnavailable(f"materialising {expert_id} wrote no {WEIGHTS_FILE}")
        steps.update()
        steps.set_postfix_str("hash")
        data_offset, header = safetensors_header(weights)
        file_bytes = weights.stat().st_size
        manifest = {
            "format_version": FORMAT_VERSION,
            "expert": expert_id,
            "source": cfg.source,
            "source_description": resolved.description,
            "architecture": type(model).__name__,
            "params": sum(p.numel() for p in model.parameters()),
            "bytes": file_bytes - data_offset,
            "file_bytes": file_bytes,
            "tensors": len([k for k in header if k != "__metadata__"]),
            "dtype": dtype_name(dtype),
            "sha256": sha256_file(weights),
            "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "context_length": getattr(model.config, "max_position_embeddings", None),
            "materialise_s": None,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        manifest["materialise_s"] = round(time.perf_counter() - started, 2)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        steps.update()
        del model
        if folder.exists():  # an old, corrupt or outdated copy: replace it
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        steps.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    copy = read_disk_copy(folder, expert_id)
    assert copy is not None
    return copy


def gguf_folder(data_dir: Path, expert_id: str) -> Path:
    return data_dir / "experts" / expert_id / GGUF_FOLDER


def _copy_hashing(src: Path, dst: Path, chunk: int = 16 << 20) -> str:
    """Copy ``src`` to ``dst`` and return the sha256 of the bytes written (one pass over the file)."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            fout.write(block)
    return digest.hexdigest()


def materialize_gguf(
    expert_id: str, cfg: ExpertConfig, data_dir: Path, *, progress: bool = True, force: bool = False
) -> DiskCopy:
    """The GGUF file itself as the disk tier of a llama.cpp expert (copied and hashed once, atomic, idempotent)."""
    from coe_core.experts.gguf_info import GGUFInfo

    folder = gguf_folder(data_dir, expert_id)
    existing = None if force else read_disk_copy(folder, expert_id)
    if existing and existing.manifest.get("source") == cfg.source and existing.problem(full=False) is None:
        return existing
    started = time.perf_counter()
    steps = tqdm(total=2, desc=f"materialise {expert_id} (GGUF)", unit="step", disable=not progress, leave=True)
    try:
        steps.set_postfix_str("resolve source")
        resolved = resolve_source(cfg.source, data_dir / "sources", cfg.revision)
        if not resolved.is_gguf:
            raise ExpertUnavailable(f"{resolved.description} is not a GGUF file: use runtime transformers")
        src = Path(resolved.location) / resolved.gguf_file
        try:
            info = GGUFInfo.read(src)
        except Exception as exc:
            raise ExpertUnavailable(f"{src} is not a readable GGUF file: {exc}") from exc
        steps.update()
        steps.set_postfix_str("copy + hash")
        tmp = folder.parent / f".tmp-{folder.name}-{time.time_ns()}"
        tmp.mkdir(parents=True)
        try:
            sha = _copy_hashing(src, tmp / GGUF_FILE)
            file_bytes = (tmp / GGUF_FILE).stat().st_size
            manifest = {
                "format_version": FORMAT_VERSION,
                "expert": expert_id,
                "source": cfg.source,
                "source_description": resolved.description,
                "runtime": "llama_cpp",
                "weights_file": GGUF_FILE,
                "architecture": info.architecture,
                "params": info.params,
                "bytes": file_bytes,
                "file_bytes": file_bytes,
                "tensors": info.tensors,
                "dtype": info.file_type,
                "sha256": sha,
                "has_chat_template": info.chat_template is not None,
                "context_length": info.context_length,
                "kv_bytes_per_token": info.kv_bytes_per_token(),
                "materialise_s": round(time.perf_counter() - started, 2),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            steps.update()
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        steps.close()
    copy = read_disk_copy(folder, expert_id)
    assert copy is not None
    return copy
