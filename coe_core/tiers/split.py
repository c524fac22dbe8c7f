"""Experts larger than the execution tier run split across tiers with accelerate.

accelerate's offloaded execution streams every offloaded layer for every token, so this is the fallback for
experts that do not fit, not the swap path (see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from coe_core.experts.weights import MODULE_BUILD_LOCK, WEIGHTS_FILE


@dataclass
class SplitPlacement:
    model: nn.Module
    device_map: dict[str, str | int]
    #: tier -> bytes of the expert placed there
    bytes_by_tier: dict[str, int]


def _tier_of(device: str | int) -> str:
    if device == "disk":
        return "disk"
    if device == "cpu":
        return "cpu"
    return "gpu"


def place_split(folder: Path, dtype: torch.dtype, free: dict[str, int], offload_dir: Path) -> SplitPlacement:
    """Place the expert over the free bytes of gpu/cpu (``free``), the rest on disk, and dispatch it."""
    from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with MODULE_BUILD_LOCK, init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    max_memory: dict[str | int, int] = {}
    if "gpu" in free:
        max_memory[0] = free["gpu"]
    max_memory["cpu"] = free.get("cpu", 0)
    no_split = getattr(model, "_no_split_modules", None) or []
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if not any(v != "disk" for v in device_map.values()):
        raise ValueError(
            f"the free execution memory ({', '.join(f'{k}: {v / 1e6:.1f} MB' for k, v in free.items())}) cannot hold "
            "even the embedding and one layer of this expert: raise the tier budget (COE_CPU_BUDGET/COE_GPU_BUDGET)"
        )
    offload_dir.mkdir(parents=True, exist_ok=True)
    with MODULE_BUILD_LOCK:
        model = load_checkpoint_and_dispatch(
            model, str(folder / WEIGHTS_FILE), device_map=device_map, offload_folder=str(offload_dir), dtype=dtype
        )
    model.eval()
    sizes = compute_module_sizes(model, dtype=dtype)
    by_tier = {"gpu": 0, "cpu": 0, "disk": 0}
    for name, device in device_map.items():
        by_tier[_tier_of(device)] += sizes.get(name, 0)
    return SplitPlacement(model, device_map, by_tier)
