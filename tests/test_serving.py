"""The serving queue: the policy function, the aging bound, cancelled queued turns, many users at once."""

from __future__ import annotations

import threading
import time
from collections import Counter

from coe_core.config import config_from_dict
from coe_core.engine import CoE
from coe_core.events import Queued, TurnDone
from coe_core.serving import Scheduler, Waiting, fifo, next_turn
from tests.conftest import tiny_config_dict

LIMITS = {"max_running": 4, "max_bypass": 3, "max_wait_s": 60.0}


def pick(waiting, running, resident=("a",), now=10.0, **limits):
    costs = {"a": 0.0, "b": 2.0, "c": 0.5}

    def cost(expert: str) -> float:
        return 0.0 if expert in resident else costs[expert]

    return next_turn(waiting, running, now=now, swap_cost_s=cost, **{**LIMITS, **limits})


# -- the policy function -----------------------------------------------------------------------------------
def test_policy_prefers_the_resident_expert_over_an_earlier_turn_that_needs_a_swap():
    waiting = [Waiting(1, "b", 0.0), Waiting(2, "a", 1.0)]
    assert pick(waiting, {}).id == 2


def test_policy_joins_the_running_batch_but_never_swaps_while_turns_run():
    waiting = [Waiting(1, "b", 0.0), Waiting(2, "a", 1.0)]
    assert pick(waiting, {"a": 2}).id == 2  # joins the batch on the resident expert
    assert pick(waiting[:1], {"a": 2}) is None  # b needs a swap: it waits until a's turns end
    assert pick(waiting[:1], {}).id == 1  # nothing runs: now the swap is allowed


def test_policy_takes_the_cheapest_swap_first_and_arrival_order_on_ties():
    assert pick([Waiting(1, "b", 0.0), Waiting(2, "c", 1.0)], {}, resident=()).id == 2
    assert pick([Waiting(1, "a", 1.0), Waiting(2, "a", 0.5)], {}).id == 2


def test_policy_a_due_turn_goes_first_and_blocks_the_others_until_it_can_start():
    starving = Waiting(1, "b", 0.0, bypassed=3)  # bypassed max_bypass times
    fresh = Waiting(2, "a", 5.0)
    assert pick([starving, fresh], {"a": 1}) is None  # no more joins: the batch drains
    assert pick([starving, fresh], {}).id == 1
    old = Waiting(1, "b", 0.0)  # or waited max_wait_s
    assert pick([old, fresh], {"a": 1}, now=59.0).id == 2
    assert pick([old, fresh], {"a": 1}, now=60.0) is None


def test_policy_keeps_to_max_running_and_fifo_is_arrival_order():
    waiting = [Waiting(1, "b", 0.0), Waiting(2, "a", 1.0)]
    assert pick(waiting, {"a": 4}) is None
    assert fifo(waiting, {}, now=0, swap_cost_s=lambda e: 0.0, **LIMITS).id == 1
    assert fifo(waiting, {"a": 4}, now=0, swap_cost_s=lambda e: 0.0, **LIMITS) is None


# -- the scheduler -----------------------------------------------------------------------------------------
def test_aging_bound_holds_under_a_stream_of_turns_for_the_resident_expert():
    """Turns for the resident expert keep coming; one turn needs a swap. It is bypassed at most max_bypass
    times, then runs once the running batch has drained."""
    clock = [0.0]
    sched = Scheduler(
        max_running=2,
        max_queue=100,
        max_wait_s=1e9,
        max_bypass=5,
        swap_cost_s=lambda e: 0.0 if e == "a" else 1.0,
        clock=lambda: clock[0],
    )
    tickets = [sched.admit("a"), sched.admit("a")]
    clock[0] += 1
    other = sched.admit("b")
    assert other.state == "waiting"
    for _ in range(50):
        clock[0] += 1
        tickets.append(sched.admit("a"))
        sched.leave(next(t for t in tickets if t.state == "running"))  # the oldest running turn ends
        assert other.bypassed <= 5
        if other.state == "running":
            break
    assert other.state == "running" and other.bypassed == 5
    assert sched.snapshot()["running"] == {"b": 1}  # the resident expert's batch drained before the swap


def test_queued_events_say_who_goes_first():
    sched = Scheduler(max_running=1, max_queue=10, swap_cost_s=lambda e: 0.0 if e == "a" else 1.0)
    first = sched.admit("a")
    later = sched.admit("b")
    cancel = threading.Event()
    event = next(sched.wait(later, cancel))
    assert isinstance(event, Queued) and event.position == 1 and event.reason == "swap"
    assert event.ahead_by_expert == {"a": 1}
    assert event.message == "waiting: 1 turn ahead on a, then a swap to b"
    sched.leave(first)
    assert later.state == "running"


def test_the_upcoming_expert_is_the_first_waiting_turns_expert_that_nothing_runs():
    sched = Scheduler(max_running=1, max_queue=10, swap_cost_s=lambda e: 0.0 if e == "a" else 1.0)
    running = sched.admit("a")
    assert sched.upcoming_expert() is None  # nothing waits
    sched.admit("a")
    assert sched.upcoming_expert() is None  # the waiting turn joins a's batch: nothing to stage
    sched.admit("b")
    assert sched.upcoming_expert() == "b"  # worth prefetching while a decodes
    sched.leave(running)


def test_the_queue_prefetches_a_waiting_turns_expert_while_another_decodes(tiny_sources, tmp_path):
    coe = tiny(tiny_sources, tmp_path, max_running=1)
    coe.tiers.prepare()
    first = coe.chat("hi", {"expert": "small"}, max_new_tokens=2, min_new_tokens=2, temperature=0)
    second = coe.chat("hi", {"expert": "medium"}, max_new_tokens=2, temperature=0)
    next(first)  # the decision: small's turn is admitted and runs
    next(second)  # medium's turn waits behind it
    staged = []
    coe.tiers.prefetch = lambda expert, evict=True: staged.append((expert, evict))
    list(first)
    assert staged == [("medium", False)]  # into free room only, never evicting
    assert any(isinstance(e, TurnDone) for e in second)


# -- the engine ---------------------------------------------------------------------------------------------
def tiny(tiny_sources, tmp_path, **serve) -> CoE:
    raw = tiny_config_dict(tiny_sources, tmp_path / "data")
    raw["serve"] = serve
    return CoE(config_from_dict(raw, env=False), routing=None, gpu=False, progress=False)


def test_a_cancelled_queued_turn_never_runs_and_is_logged_cancelled(tiny_sources, tmp_path):
    coe = tiny(tiny_sources, tmp_path, max_running=1)
    acquired = []
    real_acquire = coe.tiers.acquire

    def acquire(expert_id, **kwargs):
        acquired.append(expert_id)
        return real_acquire(expert_id, **kwargs)

    coe.tiers.acquire = acquire
    held = coe.scheduler.admit("small")  # the one running place is taken
    cancel = threading.Event()
    events = coe.chat("hello there", {"expert": "medium"}, max_new_tokens=4, cancel=cancel, session_id="q1")
    seen = []
    for event in events:
        seen.append(event)
        if isinstance(event, Queued):
            cancel.set()  # the user pressed stop while waiting
    done = seen[-1]
    assert isinstance(done, TurnDone) and done.stats.status == "cancelled" and done.stats.new_tokens == 0
    assert any(phase == "queue" for phase, _, _ in done.stats.timeline)
    # a second queued turn whose client went away (the generator closed while waiting)
    gone = coe.chat("hello again", {"expert": "medium"}, max_new_tokens=4, session_id="q2")
    assert any(isinstance(e, Queued) for e in [next(gone), next(gone)])
    gone.close()
    coe.scheduler.leave(held)
    assert acquired == [] and coe.scheduler.snapshot()["waiting"] == 0
    deadline = time.monotonic() + 15  # the closed turn is logged in the background
    while True:
        rows = {r["session_id"]: r for r in coe.store.recent_interactions(10)}
        if rows.get("q2", {}).get("status") not in (None, "running") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows["q1"]["status"] == "cancelled" and rows["q2"]["status"] == "cancelled"
    assert rows["q1"]["new_tokens"] == 0
    coe.close()


def test_sixteen_users_at_once_no_refusals_no_errors_every_turn_logged_once(tiny_sources, tmp_path):
    coe = tiny(tiny_sources, tmp_path)  # the default serve.* bounds
    coe.tiers.prepare(["small", "medium"])
    turns_of = {u: 2 + u % 3 for u in range(16)}  # 2-4 turns each
    results: dict[int, list] = {u: [] for u in turns_of}
    failures: list[BaseException] = []

    def user(u: int) -> None:
        try:
            for k in range(turns_of[u]):
                expert = ("small", "medium")[(u + k) % 2]
                _, _, stats = coe.run(
                    f"user {u} turn {k}: say something",
                    {"expert": expert},
                    max_new_tokens=4,
                    temperature=0,
                    session_id=f"user-{u}",
                    client="api",
                )
                results[u].append(stats)
        except BaseException as exc:  # a refusal (QueueFull) or anything else fails the test below
            failures.append(exc)

    threads = [threading.Thread(target=user, args=(u,)) for u in turns_of]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert failures == []
    assert all(s.status == "ok" for r in results.values() for s in r)
    assert coe.scheduler.snapshot()["refused"] == 0
    rows = coe.store.recent_interactions(1000)
    assert Counter(r["session_id"] for r in rows) == {f"user-{u}": n for u, n in turns_of.items()}
    assert len({r["id"] for r in rows}) == sum(turns_of.values())
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["queue_s"] is not None for r in rows)
    # the Analytics tab's serving figure: swaps per 100 turns and queue wait by hour
    hours = coe.store.stats()["serving_by_hour"]
    assert sum(h["turns"] for h in hours) == sum(turns_of.values())
    assert all(h["queue_wait_p95_s"] is not None and h["swaps_per_100_turns"] >= 0 for h in hours)
    from app.plots import serving_figure

    assert [t.name for t in serving_figure(hours).data] == ["swaps per 100 turns", "queue wait p50", "queue wait p95"]
    coe.close()
