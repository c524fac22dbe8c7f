"""What executes an expert: the one small interface both runtimes implement, and which runtime an expert gets.

``transformers``: the expert converted once into safetensors in the compute dtype, moved between the three
tiers by ``coe_core.tiers`` (hub experts, GPUs, split placement). ``llama_cpp``: a GGUF expert run from its
quantised file by llama.cpp (``coe_core.experts.llama_cpp_runtime``): 3-9x the tokens/s of the dequantised
float32 model on CPU (docs/benchmarks.md) and a quarter of its memory.

The tier manager hands out an ``ExpertRuntime`` with every lease; the engine formats, generates and scores
through it and does not know which runtime it talks to.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from coe_core.config import ExpertConfig
from coe_core.experts.batched_decode import BatchedDecoder
from coe_core.experts.generation import GenerationParams, GenerationResult, reference_logprob, stream_generate
from coe_core.experts.prompt_format import FormattedPrompt, format_prompt, reference_ids

RUNTIMES = ("transformers", "llama_cpp")

#: what running a GGUF expert on transformers instead of llama.cpp costs, measured here (docs/benchmarks.md)
TRANSFORMERS_COST = (
    "the GGUF is dequantised to float32 once (20-50 s per expert at first start), then runs 3-9x "
    "slower per token on CPU with 4-5x the memory"
)


class ExpertRuntime(Protocol):
    """What the engine needs from a resident expert, whichever runtime executes it."""

    name: str

    def format_prompt(
        self, messages: list[dict], cfg: ExpertConfig, *, context_length: int, reserve_tokens: int
    ) -> FormattedPrompt: ...

    def stream(
        self, input_ids: list[int], params: GenerationParams, *, cancel: threading.Event, result: GenerationResult
    ) -> Iterator[str]: ...

    def reference_logprob(self, messages: list[dict], reference: str, cfg: ExpertConfig) -> tuple[float, int]: ...


@dataclass
class TransformersRuntime:
    """A transformers module resident on ``device`` (its moves between tiers belong to the tier manager).

    With a ``batcher`` (the tier manager gives one to a module resident on the execution tier) concurrent turns
    decode together in one batch (``coe_core.experts.batched_decode``); without one (an expert split across tiers)
    each turn runs its own ``generate``."""

    model: object
    tokenizer: object
    device: object
    batcher: BatchedDecoder | None = None
    name: str = "transformers"

    def format_prompt(self, messages, cfg, *, context_length, reserve_tokens) -> FormattedPrompt:
        return format_prompt(
            self.tokenizer, messages, cfg, context_length=context_length, reserve_tokens=reserve_tokens
        )

    def stream(self, input_ids, params, *, cancel, result) -> Iterator[str]:
        if self.batcher is not None:
            return self.batcher.stream(input_ids, params, cancel=cancel, result=result)
        return stream_generate(
            self.model, self.tokenizer, input_ids, params, device=self.device, cancel=cancel, result=result
        )

    def reference_logprob(self, messages, reference, cfg) -> tuple[float, int]:
        prompt, ref = reference_ids(self.tokenizer, messages, reference, cfg)
        return reference_logprob(self.model, prompt, ref, self.device)


def choose_runtime(cfg: ExpertConfig, *, gpu: bool) -> tuple[str, str | None]:
    """(runtime, note): which runtime serves the expert, and one line saying why when it is not the one asked for
    (or not the fast one a GGUF expert would get). ``auto`` = llama.cpp for GGUF sources when no GPU executes and
    llama-cpp-python is importable; transformers otherwise."""
    from coe_core.experts.llama_cpp_runtime import llama_cpp_unavailable

    if cfg.is_remote or not cfg.is_gguf or cfg.runtime == "transformers":
        return "transformers", None
    if cfg.runtime == "auto" and gpu:
        return "transformers", None  # a GPU executes: the dequantised model in bf16 on the GPU tier
    problem = llama_cpp_unavailable()
    if problem:
        return "transformers", (
            f"llama-cpp-python is not importable ({problem}), so GGUF experts run on "
            f"transformers instead: {TRANSFORMERS_COST}. Install it with "
            "pip install llama-cpp-python==0.3.36 (a 5-8 minute C++ build)."
        )
    return "llama_cpp", None
