"""Which tiers exist on this machine and how many bytes each may hold."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from coe_core.config import TiersConfig

TIER_ORDER = ("gpu", "cpu", "disk")


@dataclass
class Tier:
    name: str
    exists: bool
    #: how many bytes the tier may hold (``tiers.<name>.budget`` in spaces.yaml, ``COE_<NAME>_BUDGET``)
    budget_bytes: int
    #: where the budget came from: "spaces.yaml", "auto: 50% of 20.1 GB free", "absent"
    budget_source: str


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _auto(fraction: float, free: int, what: str) -> tuple[int, str]:
    return int(free * fraction), f"auto: {fraction:.0%} of {free / 1e9:.1f} GB {what}"


def detect_tiers(cfg: TiersConfig, data_dir: Path, *, gpu: bool | None = None) -> dict[str, Tier]:
    """Budgets: a number from spaces.yaml/env, or ``auto`` = a safe fraction of what is free now."""
    gpu = cuda_available() if gpu is None else gpu
    tiers: dict[str, Tier] = {}
    if gpu:
        free, _total = torch.cuda.mem_get_info()
        budget, source = (
            (cfg.gpu.budget, "spaces.yaml")
            if cfg.gpu.budget != "auto"
            else _auto(cfg.gpu.auto_fraction, free, "free GPU memory")
        )
        tiers["gpu"] = Tier("gpu", True, budget, source)
    else:
        tiers["gpu"] = Tier("gpu", False, 0, "absent: no CUDA device")
    free_ram = psutil.virtual_memory().available
    budget, source = (
        (cfg.cpu.budget, "spaces.yaml")
        if cfg.cpu.budget != "auto"
        else _auto(cfg.cpu.auto_fraction, free_ram, "available RAM")
    )
    tiers["cpu"] = Tier("cpu", True, budget, source)
    data_dir.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(data_dir).free
    budget, source = (
        (cfg.disk.budget, "spaces.yaml")
        if cfg.disk.budget != "auto"
        else _auto(cfg.disk.auto_fraction, free_disk, "free disk")
    )
    tiers["disk"] = Tier("disk", True, budget, source)
    return tiers
