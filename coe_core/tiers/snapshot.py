"""What the tier manager reports: a typed, immutable picture of the tiers and of each local expert's residency.

``TierManager.snapshot()`` returns a :class:`TierSnapshot`; the app's residency plot, ``coe experts`` and the
engine read its fields. Every size is in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coe_core.events import SwapEvent

#: where a local expert is: ``loading`` while it moves in, ``unavailable`` when it cannot be made resident
ResidencyState = Literal["disk", "cpu", "gpu", "split", "loading", "unavailable"]


@dataclass(frozen=True)
class TierUsage:
    """One tier: whether this machine has it, its byte budget and what it holds."""

    name: str
    exists: bool
    budget_bytes: int
    used_bytes: int
    #: where the budget came from: "spaces.yaml", "auto: 50% of 20.1 GB free", "absent: no CUDA device"
    budget_source: str
    #: the cpu tier's freed buffers kept for reuse (part of ``used_bytes``)
    pooled_bytes: int = 0

    @property
    def free_bytes(self) -> int:
        return max(self.budget_bytes - self.used_bytes, 0)


@dataclass(frozen=True)
class ExpertResidency:
    """One local expert: where it is, what it takes in each tier, and why it cannot be used if it cannot."""

    state: ResidencyState
    #: tier -> bytes of this expert there (a GPU-resident expert keeps its CPU copy as staging)
    bytes_by_tier: dict[str, int]
    #: weights (0 until it is materialised)
    bytes: int
    params: int
    #: compute dtype, or the GGUF file type for a llama.cpp expert
    dtype: str
    #: transformers | llama_cpp
    runtime: str
    #: one line when the runtime is not the one asked for (why, and what it costs)
    runtime_note: str | None = None
    #: llama.cpp's preallocated KV cache, counted in the cpu tier
    kv_bytes: int = 0
    #: why it cannot be made resident (materialising, verifying or loading failed), else None
    unavailable: str | None = None
    #: turns generating on it now (it is never evicted while pinned)
    pinned: int = 0
    #: time.monotonic() of its last acquire
    last_used: float = 0.0

    @property
    def available(self) -> bool:
        return self.unavailable is None


@dataclass(frozen=True)
class TierSnapshot:
    """Every tier and every local expert at one moment, and the latest moves."""

    #: the tier that runs experts: gpu when CUDA exists, else cpu
    exec_tier: str
    tiers: dict[str, TierUsage]
    experts: dict[str, ExpertResidency]
    recent_swaps: list[SwapEvent] = field(default_factory=list)
