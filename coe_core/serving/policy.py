"""The order in which waiting turns start: one small policy function, ``next_turn``.

Swap-aware, with an aging bound:

1. A turn is **due** when it has been bypassed ``max_bypass`` times (a later turn started before it) or has
   waited ``max_wait_s``. The oldest due turn goes first, and while it cannot start, nothing else starts (the
   running turns drain, then it gets its expert). So no turn is bypassed more than ``max_bypass`` times.
2. Otherwise turns whose expert needs **no swap** go first: the expert is already running (the turn joins its
   batch: both runtimes decode concurrent turns of one expert together, llama.cpp in one ``llama_batch``,
   transformers in ``coe_core/experts/batched_decode.py``) or is resident on the execution tier (or remote).
   Among the others, the cheapest swap first (bytes / the tiers' measured GB/s). Ties: arrival order.
3. A turn that needs a swap starts only when nothing is running, so an expert serves its waiting turns before
   it can be evicted, and two experts never thrash the tiers in arrival order. Until its expert is resident
   (``swapping``), only turns for that expert start (they join it; nothing pins the expert it may evict).
4. At most ``max_running`` turns run at once.

While a turn decodes, the engine stages the expert of the first waiting turn that needs a swap in CPU RAM when
the tier has free room (``Scheduler.upcoming_expert``, ``TierManager.prefetch(evict=False)``), so its swap
to the execution tier starts from RAM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Waiting:
    """What the policy knows of one waiting turn."""

    id: int
    expert: str
    #: monotonic seconds when it was admitted
    arrived: float
    #: how many later turns started before it
    bypassed: int = 0


def is_due(turn: Waiting, now: float, max_bypass: int, max_wait_s: float) -> bool:
    return turn.bypassed >= max_bypass or now - turn.arrived >= max_wait_s


def priority(
    turn: Waiting,
    *,
    now: float,
    running: Mapping[str, int],
    swap_cost_s: Callable[[str], float],
    max_bypass: int,
    max_wait_s: float,
) -> tuple:
    """Sort key of a waiting turn (smaller goes first): due turns by age, then by swap cost, then by age."""
    if is_due(turn, now, max_bypass, max_wait_s):
        return (0, 0.0, turn.arrived, turn.id)
    cost = 0.0 if running.get(turn.expert) else swap_cost_s(turn.expert)
    return (1, cost, turn.arrived, turn.id)


def next_turn(
    waiting: Sequence[Waiting],
    running: Mapping[str, int],
    *,
    now: float,
    swap_cost_s: Callable[[str], float],
    max_running: int,
    max_bypass: int,
    max_wait_s: float,
    swapping: str | None = None,
) -> Waiting | None:
    """The waiting turn to start now, or None (wait for a running turn to end).

    ``running``: expert -> turns running on it. ``swap_cost_s(expert)``: 0 when it is resident on the execution
    tier (or remote), else the estimated seconds of its swap. ``swapping``: the expert a started turn is being
    swapped in for (its swap has not finished), if any.
    """
    if not waiting or sum(running.values()) >= max_running:
        return None
    if swapping is not None:
        waiting = [t for t in waiting if t.expert == swapping]
    key = {
        t.id: priority(
            t, now=now, running=running, swap_cost_s=swap_cost_s, max_bypass=max_bypass, max_wait_s=max_wait_s
        )
        for t in waiting
    }
    ordered = sorted(waiting, key=lambda t: key[t.id])
    for turn in ordered:
        due = key[turn.id][0] == 0
        startable = bool(running.get(turn.expert)) or swap_cost_s(turn.expert) == 0.0 or not any(running.values())
        if startable:
            return turn
        if due:  # the oldest due turn blocks everything behind it until it can start
            return None
    return None


def fifo(waiting: Sequence[Waiting], running: Mapping[str, int], *, max_running: int, **_: object) -> Waiting | None:
    """Arrival order, nothing else (the baseline ``coe bench serve`` compares against). It takes ``next_turn``'s
    keywords (the scheduler passes them all) and ignores all but ``max_running``."""
    if not waiting or sum(running.values()) >= max_running:
        return None
    return min(waiting, key=lambda t: (t.arrived, t.id))
