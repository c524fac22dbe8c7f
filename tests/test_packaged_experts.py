"""The real packaged experts, end to end, offline: the CLI as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def coe_cli(config, *args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COE_DATA_DIR": str(config.data_path)}
    return subprocess.run(
        [sys.executable, "-m", "coe_core.cli", "--config", str(REPO / "spaces.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def chat_json(config, prompt, *options, max_new_tokens):
    """``coe chat --json`` at temperature 0, as a user scripts it: the parsed answer (the exit code must be 0)."""
    done = coe_cli(
        config, "chat", "--json", *options, "--max-new-tokens", str(max_new_tokens), "--temperature", "0", prompt
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("expert", ["smollm2-135m", "gemma3-270m"])
def test_chat_json_answers_offline_with_each_packaged_expert(real_config, expert):
    out = chat_json(real_config, "Name the capital of France.", "--no-router", "--expert", expert, max_new_tokens=12)
    assert out["expert"] == expert and out["status"] == "ok"
    assert out["response"].strip() and 0 < out["new_tokens"] <= 12
    assert out["ttft_s"] > 0 and out["tokens_per_s"] > 0 and out["interaction_id"] >= 1
    assert out["swaps"] and out["swaps"][0]["src"] == "disk" and out["swaps"][0]["dst"] == "cpu"
    if expert == "smollm2-135m":
        # (not "What is the capital of France?": there SmolLM2's two best first tokens are 0.09 logits apart in
        # float32, and llama.cpp's 8-bit activations pick the other one, which rambles)
        assert "paris" in out["response"].lower()


@pytest.mark.slow
def test_routed_chat_and_experts_listing(routed_config):
    out = chat_json(routed_config, "Write a Python function that reverses a string.", max_new_tokens=8)
    assert out["route"]["category"] == "coding" and out["route"]["reason"] in {"mapped", "mapping-override"}
    assert out["expert"] in {"smollm2-135m", "gemma3-270m"}
    listing = json.loads(coe_cli(routed_config, "experts", "--json").stdout)
    assert {e["id"] for e in listing["experts"]} == {"smollm2-135m", "gemma3-270m"}
    assert all(e["params"] > 1e8 and e["available"] for e in listing["experts"])
    runtime = "llama_cpp" if importlib.util.find_spec("llama_cpp") else "transformers"  # runtime auto, no GPU
    assert all(e["runtime"] == runtime for e in listing["experts"])
    assert listing["tiers"]["gpu"]["exists"] is False and listing["tiers"]["cpu"]["budget"] > 0


def test_cli_errors_are_one_clear_line(real_config, tmp_path):
    empty = coe_cli(real_config, "chat", "--no-router", "   ")
    assert empty.returncode == 2 and "empty prompt" in empty.stderr and "Traceback" not in empty.stderr
    unknown = coe_cli(real_config, "chat", "--no-router", "--expert", "gpt-17", "hi")
    assert unknown.returncode == 2 and "unknown expert 'gpt-17'" in unknown.stderr
    huge = coe_cli(real_config, "chat", "--no-router", "x" * 40_000)
    assert huge.returncode == 2 and "more than the limit" in huge.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles:\n  offline:\n    experts: {}\n    default_expert: x\n    colour: red\n")
    broken = subprocess.run(
        [sys.executable, "-m", "coe_core.cli", "--config", str(bad), "experts"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode == 2 and "profiles.offline.colour: unknown key" in broken.stderr
    assert "Traceback" not in broken.stderr
