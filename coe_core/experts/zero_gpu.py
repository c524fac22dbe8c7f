"""The generation entry point for ZeroGPU Spaces, decorated with ``spaces.GPU``.

On ZeroGPU (``SPACES_ZERO_GPU=true``) a GPU exists only inside a call of a ``@spaces.GPU`` function, which runs in
a forked worker process; its arguments and everything it yields are pickled between the processes (ZeroGPU docs,
https://huggingface.co/docs/hub/spaces-zerogpu, and the ``spaces`` package's wrappers). So the entry point takes
only small, picklable arguments (expert id, prompt token ids, generation parameters) and finds the expert's module
in a registry the main process filled before the fork. Off ZeroGPU ``spaces.GPU`` returns the function unchanged
(and without the ``spaces`` package we do the same), so local runs and CI take the ordinary path
(``stream_generate`` called by the engine) and never reach this module unless a test does.

Tier mapping on ZeroGPU (README, "Hugging Face Spaces"): the disk tier and the cpu tier work as everywhere; the
main process has no CUDA, so the cpu tier holds the weights between turns and the gpu tier is the slice attached
per call: the worker moves the expert's module to ``cuda`` (bf16) the first time it serves that expert and keeps
it there while ZeroGPU keeps the worker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from coe_core.experts.generation import GenerationParams, GenerationResult, stream_generate
from coe_core.hf_spaces import GPUQuotaError, gpu_error_message, zero_gpu_duration

try:  # a no-op off ZeroGPU; optional so that local installs without it work the same
    import spaces as _spaces

    _gpu = _spaces.GPU
except ImportError:  # pragma: no cover - exercised where the package is missing
    _spaces = None

    def _gpu(task=None, **_kwargs):
        return task if callable(task) else (lambda fn: fn)


#: expert id -> (module, tokenizer); filled in the main process before a call, inherited by the forked worker
_EXPERTS: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def register(expert: str, model: Any, tokenizer: Any) -> None:
    with _LOCK:
        _EXPERTS[expert] = (model, tokenizer)


def stage_for_gpu_calls(tiers: Any, experts: list[str]) -> None:
    """Load every local expert (``experts``) into CPU RAM and register it, at start: a ZeroGPU worker is forked once and
    reused while idle, so it only has the modules the main process held when it was forked. Needs a cpu budget
    that holds them all (an expert evicted since is caught in the worker with a message that says so)."""
    for expert in experts:
        with tiers.acquire(expert) as lease:
            register(expert, lease.model, lease.tokenizer)


def _duration(expert: str, input_ids: list[int], params: GenerationParams) -> int:
    return zero_gpu_duration(params.max_new_tokens, len(input_ids))


@_gpu(duration=_duration)
def generate_on_gpu(expert: str, input_ids: list[int], params: GenerationParams) -> Iterator[tuple[str, Any]]:
    """Inside the GPU call: yields ``("text", piece)``* then ``("tokens", new_token_count)``."""
    try:
        model, tokenizer = _EXPERTS[expert]
    except KeyError:
        raise RuntimeError(f"{expert} was loaded after this GPU worker started; send the message again") from None
    if next(model.parameters()).device.type == "meta":
        raise RuntimeError(
            f"{expert} was evicted from CPU RAM before this GPU worker started: raise COE_CPU_BUDGET "
            "so that every expert fits, then restart the Space"
        )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and next(model.parameters()).device.type != "cuda":
        model.to(device=device, dtype=torch.bfloat16)  # this worker's copy only: the main process keeps its own
    result = GenerationResult()
    for piece in stream_generate(
        model, tokenizer, input_ids, params, device=device, cancel=threading.Event(), result=result
    ):
        yield "text", piece
    yield "tokens", result.new_tokens


def announce_gpu_functions() -> str:
    """Run the start-up hook ``spaces`` attaches to ``gr.Blocks.launch`` (it reports the decorated functions to
    ZeroGPU). The app mounts Gradio on its FastAPI app and runs uvicorn, so ``launch`` is never called and the hook
    would never run. Call once, after ``CoE.prepare`` (which imported this module: the entry point is decorated).
    Returns what to print."""
    startup = getattr(getattr(_spaces, "zero", None), "startup", None)
    if startup is None:  # off ZeroGPU, or a spaces release that moved it
        return "ZeroGPU: the spaces package has no start-up hook to run here; GPU calls may be refused"
    startup()
    return "ZeroGPU: the generation entry point is registered with ZeroGPU"


def _zero_gpu_error(exc: BaseException) -> GPUQuotaError | None:
    """``spaces`` reports a refused or failed GPU call as ``gr.Error(message, title="ZeroGPU ...")``."""
    title = getattr(exc, "title", None) or ""
    if "ZeroGPU" in str(title) or "ZeroGPU" in type(exc).__name__:
        return GPUQuotaError(gpu_error_message(str(title), str(getattr(exc, "message", exc))))
    return None


def stream_via_gpu_call(
    expert: str,
    model: Any,
    tokenizer: Any,
    input_ids: list[int],
    params: GenerationParams,
    *,
    device: torch.device,
    cancel: threading.Event,
    result: GenerationResult,
) -> Iterator[str]:
    """``stream_generate``'s contract (text pieces; ``result`` holds the count) through the ZeroGPU call."""
    register(expert, model, tokenizer)
    calls = generate_on_gpu(expert, list(input_ids), params)
    completed = False
    try:
        for kind, value in calls:
            if kind == "tokens":
                result.new_tokens = int(value)
                continue
            yield value
            if cancel.is_set():
                break
        else:
            completed = True
    except Exception as exc:
        mapped = _zero_gpu_error(exc)
        if mapped is None:
            raise
        result.error = mapped
        raise mapped from None
    finally:
        result.cancelled = not completed
        calls.close()  # stops the worker's generator too (spaces sets its stop event)
