"""Hostile but fair visitors: CPU for free, other people's prompts, poisoned labels, crashes (issue 11).

Engine-level checks run on tiny random-weight experts; the HTTP checks on a served CoE of them.
"""

from __future__ import annotations

import time

import pytest

from coe_core.config import config_from_dict
from coe_core.engine import CoE, PromptTooLong
from coe_core.experts.prompt_format import format_prompt
from tests.conftest import make_tokenizer, tiny_config_dict


def tiny_engine(tiny_sources, tmp_path, *, store=None, **limits) -> CoE:
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    raw["limits"] = limits
    return CoE(config_from_dict(raw, env=False), routing=None, store=store, gpu=False, progress=False)


def test_truncation_renders_a_logarithmic_number_of_times(monkeypatch):
    """10,000 short messages used to be re-rendered once per dropped turn (542 s of one core)."""
    from coe_core.config import ExpertConfig
    from coe_core.experts import prompt_format

    calls = []
    real = prompt_format.render
    monkeypatch.setattr(prompt_format, "render", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = make_tokenizer()
    messages = []
    for i in range(2000):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
    messages.append({"role": "user", "content": "the final question"})
    start = time.perf_counter()
    prompt = format_prompt(tok, messages, ExpertConfig(source="dir:/x"), context_length=120, reserve_tokens=8)
    assert prompt.truncated and len(prompt.input_ids) <= 112 and "oldest turn" in prompt.notice
    assert len(calls) <= 16  # 1 full render + ~log2(2000) candidates
    assert time.perf_counter() - start < 30  # generous on a shared box; the old way took minutes
    # the kept history is the longest that fits: one more turn would not
    kept = tok.decode(prompt.input_ids)
    assert "the final question" in kept


def test_too_many_messages_is_refused_before_any_model_work(tiny_sources, tmp_path):
    coe = tiny_engine(tiny_sources, tmp_path, max_messages=50)
    messages = [{"role": "user", "content": "hi"}] * 10_001
    start = time.perf_counter()
    with pytest.raises(PromptTooLong, match="limits.max_messages"):
        next(coe.chat(messages))
    assert time.perf_counter() - start < 1.0
    assert coe.tiers.snapshot()["experts"]["small"]["state"] in ("disk", "absent", "not materialised")
    coe.close()


def test_prompt_tokens_are_capped_whatever_the_experts_context(tiny_sources, tmp_path):
    coe = tiny_engine(tiny_sources, tmp_path, max_prompt_tokens=40)
    history = []
    for i in range(20):
        history += [{"role": "user", "content": f"question {i} about the quick brown fox"},
                    {"role": "assistant", "content": "the lazy dog answer"}]
    history.append({"role": "user", "content": "the final question"})
    stats = list(coe.chat(history, temperature=0, max_new_tokens=4))[-1].stats
    assert stats.status == "ok" and stats.truncated and stats.prompt_tokens <= 40
    coe.close()


def test_lone_surrogates_and_nul_are_made_safe_text(tiny_sources, tmp_path):
    coe = tiny_engine(tiny_sources, tmp_path)
    stats = list(coe.chat("bad \ud800 text \x00 here", temperature=0, max_new_tokens=2))[-1].stats
    assert stats.status == "ok"
    coe.close()
