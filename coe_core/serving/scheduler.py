"""One bounded fair queue for every door (playground chat, gradio API, /v1, CLI).

``Scheduler.admit`` puts a turn in the queue (or refuses it with ``QueueFull`` when ``serve.max_queue`` turns
already wait); ``Scheduler.wait`` yields ``Queued`` events while others go first and returns when the turn may
run; ``Scheduler.leave`` ends it (running, or still waiting: a cancelled queued turn never runs). Which waiting
turn starts next is the policy function in ``coe_core/serving/policy.py``.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coe_core.errors import QueueFull
from coe_core.events import Queued
from coe_core.serving.policy import Waiting, next_turn, priority

if TYPE_CHECKING:
    from coe_core.config import ServeConfig


@dataclass
class Ticket(Waiting):
    """One admitted turn: waiting, running, done or cancelled (left the queue without running)."""

    state: str = "waiting"
    started: float | None = None
    ended: float | None = None


class Scheduler:
    def __init__(
        self,
        *,
        max_running: int = 8,
        max_queue: int = 64,
        max_wait_s: float = 60.0,
        max_bypass: int = 8,
        swap_cost_s: Callable[[str], float] | None = None,
        policy: Callable[..., Waiting | None] = next_turn,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_running, self.max_queue = max_running, max_queue
        self.max_wait_s, self.max_bypass = max_wait_s, max_bypass
        self.swap_cost_s = swap_cost_s or (lambda expert: 0.0)
        self.policy, self.clock = policy, clock
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._waiting: list[Ticket] = []
        self._running: dict[str, int] = {}
        #: (ticket id, expert) of a started turn whose expert is being swapped in
        self._swapping: tuple[int, str] | None = None
        #: moving average of a running turn's seconds (for Retry-After)
        self._turn_s = 5.0
        self.refused = 0

    @classmethod
    def from_config(cls, serve: ServeConfig, swap_cost_s: Callable[[str], float], **overrides) -> Scheduler:
        """The queue ``serve.*`` describes; ``overrides`` (max_running, policy, ...) replace what they name."""
        limits = dict(
            max_running=serve.max_running,
            max_queue=serve.max_queue,
            max_wait_s=serve.max_wait_s,
            max_bypass=serve.max_bypass,
        )
        return cls(**{**limits, **overrides}, swap_cost_s=swap_cost_s)

    # -- the doors ---------------------------------------------------------------------------------
    def admit(self, expert: str) -> Ticket:
        """Queue a turn for ``expert``; it may start at once. Raises ``QueueFull`` beyond ``serve.max_queue``."""
        with self._cond:
            ticket = Ticket(id=next(self._ids), expert=expert, arrived=self.clock())
            self._waiting.append(ticket)
            self._dispatch_locked()
            if ticket.state == "waiting" and len(self._waiting) > self.max_queue:  # it cannot start and no room
                self._waiting.remove(ticket)
                ticket.state = "refused"
                self.refused += 1
                retry = self._retry_after_locked()
                raise QueueFull(
                    f"busy: {len(self._waiting)} turns are waiting already (serve.max_queue "
                    f"{self.max_queue}); try again in about {retry} s",
                    retry,
                )
            return ticket

    def wait(self, ticket: Ticket, cancel: threading.Event | None = None, poll_s: float = 0.1) -> Iterator[Queued]:
        """Yield a ``Queued`` event whenever the turn's place changes, until it may run. Returns early when
        ``cancel`` is set (the ticket then left the queue: ``ticket.state == "cancelled"``)."""
        last = None
        while True:
            with self._cond:
                if ticket.state != "waiting":
                    return
                if cancel is not None and cancel.is_set():
                    self._remove_locked(ticket, "cancelled")
                    return
                event = self._queued_locked(ticket)
                seen = (event.position, tuple(sorted(event.ahead_by_expert.items())), event.reason)
                if seen == last:
                    self._cond.wait(poll_s)
                    continue
            last = seen
            yield event

    def ready(self, ticket: Ticket) -> None:
        """The turn's expert is resident now (its swap, if any, is done): other experts' turns may start."""
        with self._cond:
            if self._swapping is not None and self._swapping[0] == ticket.id:
                self._swapping = None
                self._dispatch_locked()

    def leave(self, ticket: Ticket) -> None:
        """The turn ended (or was cancelled or failed); a waiting one leaves the queue without running."""
        with self._cond:
            if ticket.state == "waiting":
                self._remove_locked(ticket, "cancelled")
            elif ticket.state == "running":
                ticket.state, ticket.ended = "done", self.clock()
                if self._swapping is not None and self._swapping[0] == ticket.id:
                    self._swapping = None
                self._running[ticket.expert] -= 1
                if not self._running[ticket.expert]:
                    del self._running[ticket.expert]
                self._turn_s = 0.8 * self._turn_s + 0.2 * (ticket.ended - (ticket.started or ticket.ended))
                self._dispatch_locked()

    # -- what the UI and the API show -----------------------------------------------------------------
    def upcoming_expert(self) -> str | None:
        """The expert the first waiting turn in the policy's order needs that no running turn uses: the one
        worth prefetching while the current batch decodes (None when every waiting turn joins a running
        expert, or nothing waits)."""
        with self._cond:
            key = self._priorities_locked(self._costs())
            ordered = sorted(self._waiting, key=lambda t: key[t.id])
            return next((t.expert for t in ordered if not self._running.get(t.expert)), None)

    def snapshot(self) -> dict:
        with self._cond:
            return {
                "running": dict(self._running),
                "waiting": len(self._waiting),
                "waiting_by_expert": dict(Counter(t.expert for t in self._waiting)),
                "refused": self.refused,
                "max_running": self.max_running,
                "max_queue": self.max_queue,
            }

    # -- inside ----------------------------------------------------------------------------------------
    def _costs(self) -> Callable[[str], float]:
        """``swap_cost_s`` asked once per expert for one pass over the queue (it reads the tiers each time)."""
        return functools.cache(self.swap_cost_s)

    def _priorities_locked(self, cost: Callable[[str], float]) -> dict[int, tuple]:
        """Each waiting turn's sort key (``policy.priority``), by ticket id."""
        now = self.clock()
        return {
            t.id: priority(
                t,
                now=now,
                running=self._running,
                swap_cost_s=cost,
                max_bypass=self.max_bypass,
                max_wait_s=self.max_wait_s,
            )
            for t in self._waiting
        }

    def _retry_after_locked(self) -> int:
        """Seconds until the queue has room: the turns ahead, served ``max_running`` at a time."""
        ahead = len(self._waiting) - self.max_queue + 1 + sum(self._running.values())
        estimate = math.ceil(max(ahead, 1) * self._turn_s / self.max_running)
        return int(min(max(estimate, 1), max(self.max_wait_s, 1)))

    def _remove_locked(self, ticket: Ticket, state: str) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
        ticket.state, ticket.ended = state, self.clock()
        self._dispatch_locked()

    def _dispatch_locked(self) -> None:
        cost = self._costs()
        while True:
            turn = self.policy(
                self._waiting,
                self._running,
                now=self.clock(),
                swap_cost_s=cost,
                max_running=self.max_running,
                max_bypass=self.max_bypass,
                max_wait_s=self.max_wait_s,
                swapping=self._swapping[1] if self._swapping else None,
            )
            if turn is None:
                break
            self._waiting.remove(turn)
            for other in self._waiting:  # every earlier turn it went before was bypassed once more
                if (other.arrived, other.id) < (turn.arrived, turn.id):
                    other.bypassed += 1
            if self._swapping is None and not self._running.get(turn.expert) and cost(turn.expert) > 0:
                self._swapping = (turn.id, turn.expert)
            turn.state, turn.started = "running", self.clock()
            self._running[turn.expert] = self._running.get(turn.expert, 0) + 1
        self._cond.notify_all()

    def _queued_locked(self, ticket: Ticket) -> Queued:
        cost = self._costs()
        key = self._priorities_locked(cost)
        ahead = [t for t in self._waiting if key[t.id] < key[ticket.id]]
        by_expert = dict(self._running)
        for t in ahead:
            by_expert[t.expert] = by_expert.get(t.expert, 0) + 1
        if self._running.get(ticket.expert) or cost(ticket.expert) == 0.0:
            reason = "full" if sum(self._running.values()) >= self.max_running else "behind"
        else:
            reason = "swap"
        return Queued(position=len(ahead) + 1, ahead_by_expert=by_expert, reason=reason, expert=ticket.expert)
