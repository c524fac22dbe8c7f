"""Batched decoding on the transformers runtime: turns join and leave a running batch and each still gets its own
answer; per-turn sampling, stop strings and cancel; one broken turn leaves the others alone; the batch's KV cache
is counted in the tier budget and a turn waits for room."""

from __future__ import annotations

import threading
import time

import pytest

from coe_core.errors import ExpertUnavailable, InvalidRequest, TierBusy
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


@pytest.fixture
def tiny_tiers(tiny_config):
    """A tier manager over the tiny experts (cpu tier), closed afterwards."""
    config = tiny_config()
    tiers = TierManager(config, gpu=False, progress=False)
    yield config, tiers
    tiers.close()


def tiny_prompt(lease, config, expert: str, new_tokens: int, text: str = "once upon a time") -> list[int]:
    return lease.runtime.format_prompt(
        [{"role": "user", "content": text}], config.experts[expert], context_length=256, reserve_tokens=new_tokens
    ).input_ids


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


def test_the_batch_kv_cache_is_counted_in_the_tier_and_a_turn_waits_for_room(tiny_tiers):
    config, tiers = tiny_tiers
    with tiers.acquire("small") as lease:
        batcher = lease.runtime.batcher
        weights = tiers.snapshot().tiers["cpu"].used_bytes
        ids = tiny_prompt(lease, config, "small", 40)
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
        assert "does not fit" in str(too_long.error) and isinstance(too_long.error, InvalidRequest)
    tiers.evict("small", "cpu")
    assert tiers.slots["small"].batcher is None  # the decode thread went with the expert
    batcher._thread.join(timeout=10)
    assert not batcher._thread.is_alive()
    with pytest.raises(ExpertUnavailable):  # a turn that still holds the old runtime gets a clear error
        batcher.submit(ids, greedy(4), threading.Event())


def test_kv_room_evicts_idle_experts_only_when_that_makes_the_room(tiny_tiers):
    config, tiers = tiny_tiers
    with tiers.acquire("plain"):
        pass  # resident and idle: evictable
    with tiers.acquire("small") as lease:
        slot, kv = tiers.slots["small"], lease.runtime.batcher.kv_budget
        used = tiers.snapshot().tiers["cpu"].used_bytes
        tiers.tiers["cpu"].budget_bytes = used
        too_much = tiers.slots["plain"].bytes_in("cpu") + 1  # more than evicting "plain" frees
        assert not tiers._reserve_kv(slot, kv, too_much)
        assert tiers.state("plain") == "cpu" and slot.kv_live == 0  # evicted for nothing before
        assert tiers._reserve_kv(slot, kv, too_much - 1)  # exactly what evicting it frees
        assert tiers.state("plain") == "disk" and slot.kv_live == too_much - 1
        tiers._release_kv(slot, kv, too_much - 1)


# -- failure paths (a tiny random Llama: what matters is who ends, with what, and that nothing hangs) -------------
@pytest.fixture
def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=200,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    model.generation_config.eos_token_id = None  # every turn runs to its max_new_tokens
    return model


class Budget:
    """A tier's KV budget in a test: ``room`` bytes; ``fail_at`` makes that reserve call (1-based) raise."""

    def __init__(self, room: int = 10**12, fail_at: int | None = None):
        self.room, self.fail_at, self.calls, self.held = room, fail_at, 0, 0
        #: whether another expert's turns decode in the tier (and will free room)
        self.others_decoding = False

    def reserve(self, n: int) -> bool:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("reserve failed")
        if self.held + n > self.room:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n

    def kv(self):
        from coe_core.experts.batched_decode import KVBudget

        return KVBudget(
            self.reserve,
            self.release,
            lambda: 10**12,
            holders=lambda: ["other-expert"],
            others_decoding=lambda: self.others_decoding,
        )


def decoder(model, budget: Budget | None = None):
    import types

    from coe_core.experts.batched_decode import BatchedDecoder

    tokenizer = types.SimpleNamespace(eos_token_id=None)
    return BatchedDecoder(model, tokenizer, "cpu", kv_budget=budget.kv() if budget else None)


def drain(row) -> list[int]:
    """What the turn was streamed (hang guard: a row that never ends fails the test)."""
    assert row.done.wait(timeout=60), "the turn never ended"
    return list(iter(row.tokens.get, None))


def test_a_turn_whose_room_only_other_experts_hold_ends_tier_busy_instead_of_waiting(tiny_model):
    budget = Budget(room=0)  # its own batch is empty: nothing of its own will ever free room
    dec = decoder(tiny_model, budget)
    row = dec.submit([5, 6, 7], greedy(4), threading.Event())
    assert drain(row) == []
    assert isinstance(row.error, TierBusy) and "other-expert" in str(row.error) and row.error.retry_after_s >= 1
    # with a turn of its own running, a second one waits for its room, but not past the deadline
    one_row = (3 + 50) * dec.bytes_per_token
    budget.room = one_row
    dec.room_wait_s = 0.0
    running = dec.submit([5, 6, 7], greedy(50), threading.Event())
    assert running.tokens.get(timeout=60) is not None  # in the batch
    late = dec.submit([5, 6, 7], greedy(4), threading.Event())
    assert drain(late) == [] and isinstance(late.error, TierBusy)
    assert len(drain(running)) == 49 and running.error is None
    dec.close(wait=True)
    assert budget.held == 0


def test_a_turn_waits_for_room_another_experts_decoding_turns_will_free(tiny_model):
    budget = Budget(room=0)
    budget.others_decoding = True  # its own batch is empty, but another expert's rows will leave
    dec = decoder(tiny_model, budget)
    row = dec.submit([5, 6, 7], greedy(4), threading.Event())
    time.sleep(0.3)
    assert not row.done.is_set() and row.error is None  # it waits instead of ending busy
    budget.others_decoding, budget.room = False, 10**12  # the other expert's turns left: room
    assert len(drain(row)) == 4 and row.error is None
    dec.close(wait=True)


def test_two_experts_whose_turns_need_each_others_room_do_not_wait_forever(tiny_tiers):
    config, tiers = tiny_tiers
    with tiers.acquire("small") as a, tiers.acquire("plain") as b:
        weights = tiers.snapshot().tiers["cpu"].used_bytes
        row = 80 * a.runtime.batcher.bytes_per_token
        tiers.tiers["cpu"].budget_bytes = weights + row // 2  # neither turn's cache fits while both are pinned
        turns = []
        for lease, name in ((a, "small"), (b, "plain")):
            turns.append(Turn(lease, tiny_prompt(lease, config, name, 40), greedy(40)))
        for turn in turns:
            turn.join(timeout=60)  # (hang guard)
            assert not turn.is_alive()
        small, plain = turns
        assert isinstance(small.error, TierBusy) and "plain" in str(small.error)
        assert isinstance(plain.error, TierBusy) and "small" in str(plain.error)
    assert tiers.snapshot().tiers["cpu"].used_bytes == weights  # nothing was left counted


def test_a_decode_thread_that_breaks_ends_every_turn_and_gives_its_kv_bytes_back(tiny_model):
    budget = Budget(fail_at=2)  # the first turn gets its room; asking room for the second breaks the thread
    dec = decoder(tiny_model, budget)
    running = dec.submit([5, 6, 7], greedy(200), threading.Event())
    assert running.tokens.get(timeout=60) is not None
    assert budget.held > 0
    second = dec.submit([8, 9], greedy(4), threading.Event())
    assert drain(second) == [] and str(second.error) == "reserve failed"
    drain(running)
    assert str(running.error) == "reserve failed" and len(running.out) < 200
    dec._thread.join(timeout=60)
    assert dec.closed and budget.held == 0
    with pytest.raises(ExpertUnavailable):
        dec.submit([5], greedy(1), threading.Event())


def test_the_tier_manager_replaces_a_stopped_decoder_and_ignores_its_late_release(tiny_tiers):
    config, tiers = tiny_tiers
    with tiers.acquire("small") as lease:
        dead = lease.runtime.batcher
        dead.close(wait=True)
        slot = tiers.slots["small"]
        slot.kv_live = 123  # bytes a broken thread could not give back
    with tiers.acquire("small") as lease:
        assert lease.runtime.batcher is not dead and not lease.runtime.batcher.closed
        assert slot.kv_live == 0
        dead.kv_budget.release(50)  # a stopped decoder's late release takes nothing off its successor
        assert slot.kv_live == 0
        turn = Turn(lease, tiny_prompt(lease, config, "small", 4, "hi"), greedy(4))
        turn.join(timeout=60)
        assert turn.error is None and len(turn.result.token_ids) == 4


def test_a_group_whose_merge_fails_is_prefilled_again_alone_and_streams_each_token_once(tiny_model):
    from coe_core.experts.batched_decode import _Row

    prompts = ([5, 6, 7], [8, 9, 10, 11])
    dec = decoder(tiny_model)
    solo = []
    for prompt in prompts:
        row = dec.submit(prompt, greedy(5), threading.Event())
        solo.append(drain(row))
    merge, calls = dec._merge, []

    def flaky(rows, cache, mask):  # out of memory while a group joins the batch
        calls.append(len(rows))
        if len(rows) > 1 and len(calls) == 1:
            raise RuntimeError("simulated out of memory in merge")
        return merge(rows, cache, mask)

    dec._merge = flaky
    with dec._cv:  # the decode thread sees both at once: one group
        rows = [_Row(p, greedy(5), threading.Event(), dec._processors(greedy(5))) for p in prompts]
        dec._waiting.extend(rows)
        dec._cv.notify_all()
    for row, expected in zip(rows, solo, strict=True):
        assert drain(row) == expected and row.out == expected and row.error is None
    assert calls[0] == 2  # (the group was tried first)
    dec.close(wait=True)


def test_a_failed_merge_leaves_the_running_batch_as_it_was(tiny_model, monkeypatch):
    import torch

    from coe_core.experts import batched_decode

    dec = decoder(tiny_model)
    running = dec.submit([5, 6, 7], greedy(30), threading.Event())
    assert running.tokens.get(timeout=60) is not None
    dec.close(wait=True)  # (the thread stops; the batch it left is merged into by hand below)
    dec._active, dec._cache, dec._mask = [running], *_one_row_cache(dec, [5, 6, 7, 9])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in dec._cache.layers]
    mask_before = dec._mask.clone()
    newcomer = batched_decode._Row([1, 2], greedy(3), threading.Event(), dec._processors(greedy(3)))
    dec._prefilling = [newcomer]
    cache, mask = _one_row_cache(dec, [1, 2])
    real_cat, seen = torch.cat, []

    def cat_failing_at_the_second_layer(tensors, *args, **kw):
        seen.append(1)
        if len(seen) > 2:
            raise RuntimeError("simulated out of memory")
        return real_cat(tensors, *args, **kw)

    monkeypatch.setattr(batched_decode.torch, "cat", cat_failing_at_the_second_layer)
    with pytest.raises(RuntimeError, match="simulated"):
        dec._merge([newcomer], cache, mask)
    monkeypatch.undo()
    for layer, (keys, values) in zip(dec._cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    assert torch.equal(dec._mask, mask_before) and dec._prefilling == [newcomer] and dec._active == [running]


def _one_row_cache(dec, ids):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=dec.model.config)
    with torch.inference_mode():
        dec.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    return cache, torch.ones(1, len(ids), dtype=torch.long)


def test_a_long_prompt_gets_prefill_chunks_while_short_prompts_keep_arriving(tiny_model):
    from transformers.generation.logits_process import LogitsProcessorList

    from coe_core.experts import generation
    from coe_core.experts.batched_decode import _Row

    dec = decoder(tiny_model)
    dec.close(wait=True)  # (the group choice is asked by hand, with no thread running)

    def row(n):
        return _Row(list(range(1, n + 1)), greedy(4), threading.Event(), LogitsProcessorList())

    long = row(4 * generation.PREFILL_CHUNK)
    dec._prefilling = [long]
    chunks = 0
    for _ in range(12):  # every step a new short prompt arrives
        dec._prefilling.append(row(3))
        group = dec._prefill_group()
        if group == [long]:
            chunks += 1
        else:
            assert long not in group
            dec._prefilling = [r for r in dec._prefilling if r not in group]
    assert chunks >= 12 // 3
