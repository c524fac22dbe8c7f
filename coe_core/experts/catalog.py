"""The expert catalog: which experts this CoE has, where each runs, and whether it can serve now (and why not).

Local experts run from the memory tiers; remote experts (``openai:`` sources) run on an OpenAI-compatible
endpoint and have no weights or tiers here. The catalog knows both kinds; the tier manager
(``coe_core.tiers.TierManager``) knows only the local ones, and of them only residency: budgets, LRU, moves.
The catalog reads what it needs of the tier manager through :class:`LocalExperts`, so it stays a floor below.
"""

from __future__ import annotations

from typing import Protocol

from coe_core.config import CoEConfig
from coe_core.experts.remote import RemoteExpert


class LocalExperts(Protocol):
    """What the catalog asks of the tier manager about the local experts."""

    def unavailable_reason(self, expert_id: str) -> str | None:
        """Why a local expert cannot be made resident (materialising or loading failed), else None."""

    def state(self, expert_id: str) -> str:
        """Where a local expert is: disk, cpu, gpu, split, loading or unavailable."""

    def params(self) -> dict[str, int]:
        """Active parameters of each materialised local expert."""

    def prepare(self, expert_ids: list[str] | None = None, *, verify: bool = True) -> dict[str, str | None]:
        """Materialise (and verify) local experts; expert -> problem (None if ready)."""


class ExpertCatalog:
    """Every expert of the config, local and remote, with its availability and the reason when it has none.

    Thread-safe as far as its parts are: the remote clients and the tier manager each lock their own state.
    """

    def __init__(self, config: CoEConfig, local: LocalExperts) -> None:
        """``local``: the tier manager of this CoE's local experts. Builds a client for each remote expert."""
        self.config = config
        self.local = local
        self._remotes: dict[str, RemoteExpert] = {
            eid: RemoteExpert(eid, cfg) for eid, cfg in config.experts.items() if cfg.is_remote
        }

    # -- which experts ---------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Every expert, in the config's order."""
        return list(self.config.experts)

    def local_ids(self) -> list[str]:
        """The experts with weights here (the tier manager's experts), in the config's order."""
        return [e for e in self.config.experts if e not in self._remotes]

    def remote_ids(self) -> list[str]:
        """The experts on a remote endpoint, in the config's order."""
        return list(self._remotes)

    def remote(self, expert_id: str) -> RemoteExpert | None:
        """The client of a remote expert; None for a local one. Raises KeyError for an unknown id."""
        if expert_id not in self.config.experts:
            raise KeyError(f"unknown expert {expert_id!r}; experts: {', '.join(self.config.experts)}")
        return self._remotes.get(expert_id)

    # -- availability ------------------------------------------------------------------------------------
    def available(self) -> set[str]:
        """Experts a turn may be routed to: local ones that can be made resident, and every remote one (its
        endpoint is checked when a turn opens it, and a local expert stands in when it does not answer)."""
        return {e for e in self.local_ids() if self.local.unavailable_reason(e) is None} | set(self._remotes)

    def problem(self, expert_id: str) -> str | None:
        """Why the expert cannot serve right now, else None: a local expert's materialising or loading failure,
        or a remote endpoint that failed within its health window."""
        remote = self.remote(expert_id)
        if remote is None:
            return self.local.unavailable_reason(expert_id)
        down = remote.down_reason()
        return f"remote endpoint down: {down}" if down else None

    def problems(self) -> dict[str, str]:
        """expert -> why it cannot serve now, for every expert that cannot (readiness lists them)."""
        found = {e: self.problem(e) for e in self.ids()}
        return {e: why for e, why in found.items() if why}

    def params(self) -> dict[str, int]:
        """Active parameters per materialised local expert (a remote expert's size is not known here)."""
        return self.local.params()

    def states(self) -> dict[str, str]:
        """expert -> where it is now: a tier state for a local expert, ``remote`` for a remote one."""
        return {e: "remote" if e in self._remotes else self.local.state(e) for e in self.ids()}

    def remote_info(self, expert_id: str) -> dict:
        """Where a remote expert is and whether its endpoint answers (the cached check; never blocks)."""
        remote = self._remotes[expert_id]
        return {"base_url": remote.base_url, "model": remote.cfg.model, "health": remote.health().to_dict()}

    # -- start and end -----------------------------------------------------------------------------------
    def prepare(self, expert_ids: list[str] | None = None, *, verify: bool = True) -> dict[str, str | None]:
        """Make experts ready up front: materialise and verify local ones, check remote endpoints now.
        Returns expert -> problem (None if ready), in the order asked."""
        wanted = expert_ids or self.ids()
        local = [e for e in wanted if e not in self._remotes]
        problems = self.local.prepare(local, verify=verify) if local else {}
        for eid in wanted:
            remote = self.remote(eid)
            if remote is not None:
                health = remote.check()
                problems[eid] = None if health.ok else f"remote endpoint {remote.base_url}: {health.error}"
        return {e: problems[e] for e in wanted}

    def close(self) -> None:
        """Close the connection pools of the remote experts."""
        for remote in self._remotes.values():
            remote.close()
