"""Serving many turns at once: one bounded fair queue in front of the tiers, with a swap-aware order."""

from coe_core.serving.policy import Waiting, fifo, next_turn
from coe_core.serving.scheduler import QueueFull, Scheduler, Ticket

__all__ = ["QueueFull", "Scheduler", "Ticket", "Waiting", "fifo", "next_turn"]
