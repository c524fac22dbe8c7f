"""Batched decoding on the transformers runtime: turns join and leave a running batch and each still gets its own
answer; per-turn sampling, stop strings and cancel; one broken turn leaves the others alone; the batch's KV cache
is counted in the tier budget and a turn waits for room."""

from __future__ import annotations

import threading

import pytest

from coe_core.experts.generation import GenerationParams, GenerationResult, stream_generate
from coe_core.tiers.manager import TierManager

SMOL = "smollm2-135m"
PROMPTS = ["Write a haiku about autumn leaves.", "What is 17 times 23?", "Name three uses of a hash map."]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 (packaged) on the transformers runtime, resident in the cpu tier, with its prompts' token ids."""
    from coe_core.bench.swap import with_runtime
    from tests.conftest import packaged_config

    config = with_runtime(packaged_config(tmp_path_factory.mktemp("batch") / "data"), "transformers", [SMOL])
    tiers = TierManager(config, gpu=False, progress=False)
    with tiers.acquire(SMOL) as lease:
        ids = [
            lease.runtime.format_prompt(
                [{"role": "user", "content": p}], config.experts[SMOL], context_length=2048, reserve_tokens=64
            ).input_ids
            for p in PROMPTS
        ]
        assert lease.runtime.batcher is not None
        yield tiers, lease, ids
    tiers.close()


def greedy(n: int, **kw) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0.0, min_new_tokens=kw.pop("min_new_tokens", n), **kw)


def alone(lease, ids, params) -> tuple[str, list[int]]:
    """Today's per-turn path (one ``generate`` per turn): the reference."""
    import torch

    result = GenerationResult()
    text = "".join(
        stream_generate(
            lease.model,
            lease.tokenizer,
            ids,
            params,
            device=torch.device("cpu"),
            cancel=threading.Event(),
            result=result,
        )
    )
    return text, result.token_ids


class Turn(threading.Thread):
    """A turn streaming through the batcher on its own thread; ``pieces`` counts what it has received so far."""

    def __init__(self, lease, ids, params, cancel_after: int | None = None):
        super().__init__(daemon=True)
        self.lease, self.ids, self.params, self.cancel_after = lease, ids, params, cancel_after
        self.cancel, self.result, self.text, self.error = threading.Event(), GenerationResult(), "", None
        self.pieces = threading.Semaphore(0)
        self.start()

    def run(self):
        try:
            for n, piece in enumerate(
                self.lease.runtime.stream(self.ids, self.params, cancel=self.cancel, result=self.result), 1
            ):
                self.text += piece
                self.pieces.release()
                if self.cancel_after is not None and n >= self.cancel_after:
                    self.cancel.set()  # the stop button
        except Exception as exc:
            self.error = exc
        finally:
            self.pieces.release()

    def wait_pieces(self, n: int) -> None:
        for _ in range(n):
            assert self.pieces.acquire(timeout=120)


@pytest.mark.slow
def test_turns_joining_and_leaving_a_running_batch_get_their_solo_greedy_text(smol):
    tiers, lease, ids = smol
    batcher = lease.runtime.batcher
    reference = [alone(lease, i, greedy(n)) for i, n in zip(ids, (24, 8, 16), strict=True)]
    steps = batcher.steps
    first = Turn(lease, ids[0], greedy(24))
    first.wait_pieces(3)
    second = Turn(lease, ids[1], greedy(8))  # joins the running batch, leaves it well before the first ends
    second.join()
    third = Turn(lease, ids[2], greedy(16))  # joins after the second left
    for turn in (first, second, third):
        turn.join()
    assert batcher.steps > steps  # decode steps carried more than one turn
    for turn, (text, token_ids) in zip((first, second, third), reference, strict=True):
        assert turn.error is None
        assert turn.result.token_ids == token_ids and turn.text == text
    # a lone turn decodes as the per-turn path does
    solo = Turn(lease, ids[1], greedy(8))
    solo.join()
    assert solo.result.token_ids == reference[1][1]


@pytest.mark.slow
def test_each_turn_keeps_its_own_sampling_stop_strings_and_cancel(smol):
    tiers, lease, ids = smol
    text, token_ids = alone(lease, ids[0], greedy(20))
    words = text.split()
    assert len(words) > 3
    stop = " " + words[2]  # cut the answer just before its third word
    runs = [
        Turn(lease, ids[0], greedy(20)),
        Turn(lease, ids[0], greedy(20, stop=(stop,), min_new_tokens=0)),
        Turn(lease, ids[0], GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, min_new_tokens=12)),
        Turn(lease, ids[0], greedy(20), cancel_after=2),
    ]
    for turn in runs:
        turn.join()
    plain, stopped, sampled, cancelled = runs
    assert all(turn.error is None for turn in runs)
    assert plain.result.token_ids == token_ids and plain.text == text  # its neighbours changed nothing
    assert stopped.text == text[: text.index(stop)] and len(stopped.result.token_ids) < 20
    assert len(sampled.result.token_ids) == 12 and not sampled.result.cancelled
    assert cancelled.result.cancelled and len(cancelled.result.token_ids) < 20


@pytest.mark.slow
def test_a_turn_that_breaks_ends_alone_and_the_others_keep_decoding(smol):
    tiers, lease, ids = smol
    text, token_ids = alone(lease, ids[1], greedy(16))
    good = Turn(lease, ids[1], greedy(16))
    good.wait_pieces(2)
    vocab = lease.model.config.vocab_size
    bad = Turn(lease, [*ids[2][:-1], vocab + 7], greedy(8))  # a token id the embedding does not have
    bad.join()
    good.join()
    assert bad.error is not None and bad.result.token_ids == []
    assert good.error is None and good.result.token_ids == token_ids and good.text == text
    again = Turn(lease, ids[1], greedy(4))  # the batch still serves new turns afterwards
    again.join()
    assert again.error is None and again.result.token_ids == token_ids[:4]
    # arriving together, they are prefilled in one forward: that fails, and each is then prefilled alone
    batcher = lease.runtime.batcher
    with batcher._cv:  # the decode thread sees both at once
        rows = [
            batcher.submit(ids[1], greedy(16), threading.Event()),
            batcher.submit([*ids[2][:-1], vocab + 7], greedy(8), threading.Event()),
        ]
    for row in rows:
        row.done.wait(timeout=120)
    assert rows[0].error is None and rows[0].out == token_ids
    assert rows[1].error is not None and rows[1].out == []


def test_the_batch_kv_cache_is_counted_in_the_tier_and_a_turn_waits_for_room(tiny_config):
    config = tiny_config()
    tiers = TierManager(config, gpu=False, progress=False)
    try:
        with tiers.acquire("small") as lease:
            batcher = lease.runtime.batcher
            weights = tiers.snapshot().tiers["cpu"].used_bytes
            ids = lease.runtime.format_prompt(
                [{"role": "user", "content": "once upon a time"}],
                config.experts["small"],
                context_length=256,
                reserve_tokens=40,
            ).input_ids
            one_row = (len(ids) + 40) * batcher.bytes_per_token
            tiers.tiers["cpu"].budget_bytes = weights + one_row + one_row // 2  # room for one turn's KV cache, not two
            first = Turn(lease, ids, greedy(40))
            first.wait_pieces(1)
            assert tiers.snapshot().tiers["cpu"].used_bytes == weights + one_row
            second = Turn(lease, ids, greedy(40))
            first.join()
            second.join()
            assert first.error is None and second.error is None
            assert len(second.result.token_ids) == 40
            assert batcher.widest == 1  # the second waited for the first's room instead of joining it
            assert tiers.snapshot().tiers["cpu"].used_bytes == weights  # both gave their bytes back
            too_long = Turn(lease, ids, greedy(200))  # its cache alone would not fit beside the weights
            too_long.join()
            assert "does not fit" in str(too_long.error)
        tiers.evict("small", "cpu")
        assert tiers.slots["small"].batcher is None  # the decode thread went with the expert
        batcher._thread.join(timeout=10)
        assert not batcher._thread.is_alive()
    finally:
        tiers.close()
