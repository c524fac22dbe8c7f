"""TierManager: materialising, swaps, budgets, LRU eviction, pinning, concurrency, split placement, corruption."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from coe_core.errors import ExpertUnavailable, TierBusy
from coe_core.experts.weights import MANIFEST_FILE, WEIGHTS_FILE
from coe_core.tiers.manager import TierManager


def manager(config) -> TierManager:
    return TierManager(config, gpu=False, progress=False)


def sizes(tiers: TierManager) -> dict[str, int]:
    tiers.prepare(verify=False)
    return {e: s.bytes for e, s in tiers.slots.items()}


def test_materialise_writes_a_verified_manifest_once(tiny_config):
    tiers = manager(tiny_config())
    copy = tiers.ensure_disk("small")
    manifest = json.loads((copy.folder / MANIFEST_FILE).read_text())
    assert manifest["dtype"] == "float32"
    assert manifest["params"] > 0 and manifest["bytes"] == manifest["params"] * 4
    assert len(manifest["sha256"]) == 64 and manifest["source"].startswith("dir:")
    assert not [p for p in copy.folder.parent.iterdir() if p.name.startswith(".tmp")]  # atomic: no leftovers
    mtime = (copy.folder / WEIGHTS_FILE).stat().st_mtime_ns
    again = manager(tiny_config()).ensure_disk("small")  # idempotent: a second manager reuses the copy
    assert (again.folder / WEIGHTS_FILE).stat().st_mtime_ns == mtime


def test_swap_gives_the_same_model_as_from_pretrained(tiny_config):
    from transformers import AutoModelForCausalLM

    tiers = manager(tiny_config())
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with tiers.acquire("medium") as lease:
        assert lease.events and lease.events[0].src == "disk" and lease.events[0].dst == "cpu"
        assert lease.events[0].bytes == tiers.slots["medium"].bytes
        assert {"read", "bind", "warmup"} <= set(lease.events[0].phases)
        got = lease.model(ids).logits
        assert all(p.dtype == torch.float32 for p in lease.model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(tiers.disk_folder("medium"), dtype=torch.float32)
    torch.testing.assert_close(got, reference(ids).logits)


def test_lru_eviction_is_size_aware_and_records_who_was_evicted(tiny_config):
    probe = sizes(manager(tiny_config()))
    budget = probe["large"] + 1000  # small + medium fit; a third one, or large, needs evictions
    assert probe["small"] + probe["medium"] <= budget < probe["small"] + probe["medium"] + probe["plain"]
    tiers = manager(tiny_config(cpu=budget))
    for eid in ("small", "medium"):
        with tiers.acquire(eid):
            pass
    assert tiers.state("small") == tiers.state("medium") == "cpu"
    with tiers.acquire("small"):  # small is now the most recently used
        pass
    with tiers.acquire("plain") as lease:  # plain is as big as small: evicting medium (LRU) is enough
        assert lease.events[0].evicted == ["medium"]
    assert tiers.state("medium") == "disk" and tiers.state("small") == "cpu"
    with tiers.acquire("large") as lease:
        assert set(lease.events[0].evicted) == {"small", "plain"}
    snap = tiers.snapshot()
    assert snap.tiers["cpu"].used_bytes <= budget
    assert any(e.trigger == "eviction" and e.src == "cpu" for e in snap.recent_swaps)


def test_pinned_expert_is_never_evicted_while_generating(tiny_config):
    probe = sizes(manager(tiny_config()))
    tiers = manager(tiny_config(cpu=max(probe["small"], probe["medium"]) + 1000))  # room for one expert
    with tiers.acquire("small"):
        with pytest.raises(TierBusy, match="in use"), tiers.acquire("medium", timeout=0.3):
            pass
        assert tiers.state("small") == "cpu"
    with tiers.acquire("medium") as lease:  # unpinned now: small can go
        assert lease.events[0].evicted == ["small"]


def test_waiting_acquire_proceeds_when_the_pin_is_released(tiny_config):
    probe = sizes(manager(tiny_config()))
    tiers = manager(tiny_config(cpu=max(probe["small"], probe["medium"]) + 1000))
    release = threading.Event()
    got = {}

    def hold_small():
        with tiers.acquire("small"):
            release.wait(5)

    holder = threading.Thread(target=hold_small)
    holder.start()
    time.sleep(0.3)

    def want_medium():
        with tiers.acquire("medium", timeout=10) as lease:
            got["evicted"] = lease.events[0].evicted

    waiter = threading.Thread(target=want_medium)
    waiter.start()
    time.sleep(0.3)
    assert "evicted" not in got  # still waiting for the pin
    release.set()
    holder.join(5)
    waiter.join(10)
    assert got["evicted"] == ["small"]


def test_concurrent_acquires_of_one_expert_load_it_once(tiny_config):
    tiers = manager(tiny_config())
    tiers.prepare()
    events = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        with tiers.acquire("large") as lease:
            events.extend(lease.events)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len([e for e in events if e.dst == "cpu"]) == 1


def test_prefetch_stages_in_cpu_without_blocking(tiny_config):
    tiers = manager(tiny_config())
    tiers.prepare()
    thread = tiers.prefetch("medium")
    assert thread is not None
    thread.join(30)
    assert tiers.state("medium") == "cpu"
    assert tiers.history[-1].trigger == "prefetch"
    with tiers.acquire("medium") as lease:
        assert lease.events == []  # already resident


def test_expert_larger_than_the_execution_tier_runs_split(tiny_config):
    probe = sizes(manager(tiny_config()))
    tiers = manager(tiny_config(cpu=int(probe["large"] * 0.7)))
    with tiers.acquire("large") as lease:
        assert tiers.state("large") == "split"
        out = lease.model(torch.tensor([[1, 2, 3]])).logits
        assert out.shape[:2] == (1, 3) and torch.isfinite(out).all()
    residency = tiers.snapshot().experts["large"].bytes_by_tier
    assert 0 < residency["cpu"] <= probe["large"] * 0.7 and residency["disk"] > 0
    assert lease.events[0].dst.startswith("split(")


def test_corrupt_weights_are_rematerialised_and_others_keep_serving(tiny_config, tiny_sources):
    config = tiny_config()
    tiers = manager(config)
    tiers.prepare()
    weights = tiers.disk_folder("small") / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, same header, wrong bytes
    weights.write_bytes(bytes(data))
    fresh = manager(config)  # a new process: verifies once by sha256
    with fresh.acquire("small") as lease:
        assert lease.model is not None
    assert fresh.slots["small"].disk.problem(full=True) is None


def test_missing_weights_and_missing_source_mark_only_that_expert_unavailable(tiny_config, tiny_sources, tmp_path):
    import shutil

    config = tiny_config()
    tiers = manager(config)
    tiers.prepare()
    (tiers.disk_folder("plain") / WEIGHTS_FILE).unlink()
    moved = tmp_path / "moved-plain"
    shutil.move(tiny_sources["plain"], moved)  # the source is gone too: cannot re-materialise
    try:
        fresh = manager(config)
        with pytest.raises(ExpertUnavailable, match="plain|missing|config.json"), fresh.acquire("plain"):
            pass
        assert fresh.state("plain") == "unavailable"
        assert "missing" in fresh.snapshot().experts["plain"].unavailable
        with fresh.acquire("small") as lease:  # the others keep serving
            assert lease.model is not None
    finally:
        shutil.move(moved, tiny_sources["plain"])


def test_snapshot_reports_tiers_and_states(tiny_config):
    tiers = manager(tiny_config())
    snap = tiers.snapshot()
    assert snap.exec_tier == "cpu"
    assert snap.tiers["gpu"].exists is False
    assert snap.tiers["cpu"].budget_bytes > 0 and snap.tiers["disk"].exists
    assert set(snap.experts) == {"small", "medium", "large", "plain"}
    with tiers.acquire("small"):
        inside = tiers.snapshot().experts["small"]
        assert inside.state == "cpu" and inside.pinned == 1
        assert inside.bytes_by_tier["cpu"] == inside.bytes > 0


def test_evict_frees_the_cpu_copy_but_keeps_disk(tiny_config):
    tiers = manager(tiny_config())
    with tiers.acquire("small"):
        pass
    tiers.evict("small")
    info = tiers.snapshot().experts["small"]
    assert info.state == "disk" and info.bytes_by_tier["cpu"] == 0 and info.bytes_by_tier["disk"] > 0
    assert all(p.device.type == "meta" for p in tiers.slots["small"].model.parameters())
    with tiers.acquire("small") as lease:  # and it comes back
        assert lease.events[0].src == "disk"


def test_an_expert_larger_than_the_staging_tier_is_never_prefetched(tiny_config):
    probe = sizes(manager(tiny_config()))
    tiers = manager(tiny_config(cpu=probe["large"] - 1000))
    with tiers.acquire("small"):
        pass
    assert tiers.prefetch("large") is None  # it would evict everything and still not fit
    assert tiers.state("small") == "cpu"


def test_a_prefetch_into_free_room_only_evicts_nothing(tiny_config):
    probe = sizes(manager(tiny_config()))
    tiers = manager(tiny_config(cpu=max(probe["small"], probe["medium"]) + 1000))  # room for one of them
    with tiers.acquire("small"):
        pass
    assert tiers.prefetch("medium", evict=False) is None
    assert tiers.state("small") == "cpu"
    thread = tiers.prefetch("medium")  # the default may evict an idle expert for it
    thread.join(30)
    assert tiers.state("medium") == "cpu" and tiers.state("small") == "disk"


def test_swaps_under_a_tight_budget_reuse_pooled_buffers(tiny_config, monkeypatch):
    from coe_core.tiers import loader

    probe = sizes(manager(tiny_config()))
    tiers = manager(tiny_config(cpu=probe["small"] + 1000))  # room for one: every switch evicts
    allocations = []
    real = loader.allocate_buffer
    monkeypatch.setattr(loader, "allocate_buffer", lambda n, pin: allocations.append(n) or real(n, pin=pin))
    for expert in ["small", "plain"] * 3:  # same size: the evicted buffer serves the next load
        with tiers.acquire(expert):
            pass
    assert len(allocations) == 1
    assert tiers.snapshot().tiers["cpu"].used_bytes <= probe["small"] + 1000


def test_a_turn_waiting_behind_a_prefetch_proceeds_when_the_prefetch_lands(tiny_config, monkeypatch):
    from coe_core.tiers import loader

    probe = sizes(manager(tiny_config()))
    tiers = manager(tiny_config(cpu=max(probe["small"], probe["medium"]) + 1000))  # room for one
    real_read = loader.parallel_read

    def slow_read(*args, **kwargs):
        time.sleep(1.0)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(loader, "parallel_read", slow_read)
    thread = tiers.prefetch("medium")
    time.sleep(0.2)  # the prefetch holds the room while it loads
    started = time.monotonic()
    with tiers.acquire("small", timeout=30) as lease:
        assert lease.events[0].evicted == ["medium"]
    # woken when the load landed (about 1 s), not left asleep until the 30 s timeout
    assert time.monotonic() - started < 15
    thread.join(10)
