"""One turn of the CoE: route -> acquire expert -> generate -> log, as typed events.

Every front end (app, API, CLI) drives ``CoE.chat`` and gets the same event sequence:
``RouteDecision``, ``Queued``*, ``SwapEvent``* (or one ``RemoteConnect``), ``Notice``*, ``TextChunk``*,
``TurnDone``, and gathers it with ``events.Transcript``. Errors are ``coe_core.errors.CoEError``s. Every turn goes
through the one serving queue (``CoE.scheduler``, ``serve.*``); beyond ``serve.max_queue`` it raises ``QueueFull``
before anything is logged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from coe_core.config import CoEConfig, load_config
from coe_core.errors import ExpertUnavailable, InvalidRequest, PromptTooLong, RateLimited, RemoteExpertError, StoreError
from coe_core.events import (
    Event,
    Notice,
    RemoteConnect,
    RouteDecision,
    SwapEvent,
    TextChunk,
    Transcript,
    TurnDone,
    TurnStats,
)
from coe_core.experts.catalog import ExpertCatalog
from coe_core.experts.generation import GenerationParams, GenerationResult
from coe_core.experts.remote import RemoteExpert
from coe_core.hf_spaces import on_zero_gpu
from coe_core.routing.protocol import Routing
from coe_core.serving import Scheduler
from coe_core.store.models import review_of
from coe_core.tiers.manager import TierManager

if TYPE_CHECKING:
    from coe_core.store.store import Store

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


#: feedback kinds that become training labels (a like confirms the routed category)


def clean_text(text: str) -> str:
    """Text every tokenizer, JSON encoder and database takes: a lone UTF-16 surrogate (valid in JSON, not in
    UTF-8) and NUL (refused by PostgreSQL) become U+FFFD; valid text is returned as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


class RateWindow:
    """At most ``limit`` hits per ``window_s`` for each key (a session id, an API key's name); thread-safe."""

    def __init__(self, limit: int, window_s: float, what: str, setting: str, max_keys: int = 10_000):
        self.limit, self.window_s, self.what, self.setting, self.max_keys = limit, window_s, what, setting, max_keys
        self._hits: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._hits) > self.max_keys:  # forget idle keys, so many sessions cannot grow it unbounded
                self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - self.window_s}
            recent = [t for t in self._hits.get(key, ()) if t > now - self.window_s]
            if len(recent) >= self.limit:
                raise RateLimited(
                    f"too much {self.what}: at most {self.limit} per {self.window_s:.0f} s "
                    f"({self.setting}); try again in a minute"
                )
            recent.append(now)
            self._hits[key] = recent


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Readiness:
    """Whether the engine can serve a turn now (the API's ``/readyz``)."""

    ready: bool
    #: ``loaded``; ``not loaded`` (no prompt routed and no warm-up yet); ``none`` (no router: the default expert
    #: serves, which is ready)
    router_state: Literal["loaded", "not loaded", "none"]
    available_experts: list[str] = field(default_factory=list)
    #: expert -> why it cannot serve now (failed to materialise, remote endpoint down lately)
    unavailable: dict[str, str] = field(default_factory=dict)


class CoE:
    """The Composition of Experts built from a config: routes a conversation, makes the chosen expert resident,
    streams its answer and logs the turn (``chat``), and the services around it (experts, readiness, feedback).
    Thread-safe: many turns may run at once; they share one serving queue (``scheduler``).

    Attributes front ends read: ``config``; ``routing`` (what the engine needs of routing, or None);
    ``tiers`` (residency); ``store`` (the interaction log, or None); ``zero_gpu``.
    """

    def __init__(
        self,
        config: CoEConfig | None = None,
        *,
        routing: Routing | Literal["auto"] | None = "auto",
        store: Store | Literal["auto"] | None = "auto",
        gpu: bool | None = None,
        progress: bool = True,
    ):
        """Build the engine: tiers (expert residency), the store (``"auto"``: the config's; None: no log), the
        routing (``"auto"``: a ``RoutingService`` fed with this engine's experts and traffic; None: the default
        expert, or a forced one, serves every turn) and the serving queue. Nothing is loaded yet (``prepare``).

        ``config``: None reads spaces.yaml (``load_config``). ``gpu``: None uses CUDA when present.
        ``progress``: print materialising progress. Raises ``StoreError`` when the log cannot be opened, and
        ``TypeError`` when ``routing`` is neither ``"auto"``, None nor a ``Routing``.
        """
        if routing is not None and routing != "auto" and not isinstance(routing, Routing):
            raise TypeError(
                f"routing must be 'auto', None or a Routing (decide, warm_up, runner_up, score_table, "
                f"router_loaded: a RoutingService), not {type(routing).__name__}"
            )
        self.config = config or load_config()
        #: ZeroGPU: no CUDA in this process; generation runs in the ``spaces.GPU`` call (experts/zero_gpu.py)
        self.zero_gpu = on_zero_gpu()
        self.tiers = TierManager(self.config, gpu=False if self.zero_gpu and gpu is None else gpu, progress=progress)
        # ZeroGPU runs each turn as its own forked spaces.GPU call: no decode thread here would ever batch
        self.tiers.batching = not self.zero_gpu
        #: every expert, local and remote, with its availability; ``tiers`` holds the local ones' residency
        self.catalog = ExpertCatalog(self.config, self.tiers)
        self.store: Store | None = None
        self.turn_logger = None
        if store == "auto":
            from coe_core.store.store import Store

            store = Store.from_config(self.config)
        if store is not None:
            from coe_core.store.writer import TurnLogger, default_spool_path

            self.store = store
            self._mark_interrupted(store)
            self.turn_logger = TurnLogger(store, default_spool_path(self.config))  # replays its spool on start
        if routing == "auto":
            from coe_core.routing.service import RoutingService

            routing = RoutingService(
                self.config,
                available_experts=self.available_experts,
                expert_params=self.expert_params,
                traffic_distribution=self.store.category_counts if self.store else None,
                store=self.store,
            )
        self.routing: Routing | None = routing
        #: the one queue every door's turns go through (serve.*): swap-aware order, refuses beyond max_queue
        self.scheduler = Scheduler.from_config(self.config.serve, self.swap_cost_s)
        self._feedback_rate = RateWindow(
            self.config.limits.feedback_per_minute, 60.0, "feedback", "limits.feedback_per_minute"
        )
        self._closed = False

    def _mark_interrupted(self, store) -> None:
        """Turns a previous process logged as running and never completed (crash, kill -9) say so. A SQLite
        log belongs to this instance alone; a shared database may hold other instances' running turns, so
        there only turns started over an hour ago count as interrupted."""
        from datetime import timedelta

        before = None if store.url.startswith("sqlite") else _now() - timedelta(hours=1)
        try:
            n = store.mark_interrupted(before)
        except Exception as exc:  # never keep the engine from starting
            log.warning("could not mark interrupted turns: %s", exc)
            return
        if n:
            log.warning("%d turn(s) were still running when the last process ended; logged as interrupted", n)

    # -- experts -----------------------------------------------------------------------------------
    def available_experts(self) -> set[str]:
        """The ids of the experts a turn may be routed to (``ExpertCatalog.available``: not marked unavailable:
        weights failed, runtime missing, ...)."""
        return self.catalog.available()

    def swap_cost_s(self, expert_id: str) -> float:
        """0 when the expert runs without a swap (resident on the execution tier, remote, unknown), else the
        estimated seconds to make it resident: its bytes at the mean GB/s of the tiers' recent swaps (1 GB/s
        before any). The scheduler orders waiting turns by it. Never raises: an unknown id costs 0."""
        slot = self.tiers.slots.get(expert_id)
        if slot is None or slot.unavailable is not None:  # a remote expert has no slot
            return 0.0
        if slot.placement in (self.tiers.exec_tier, "split"):
            return 0.0
        rates = [e.gbps for e in list(self.tiers.history)[-20:] if e.gbps > 0 and e.dst == self.tiers.exec_tier]
        gbps = sum(rates) / len(rates) if rates else 1.0
        return max(slot.bytes / (gbps * 1e9), 1e-3)

    def _queue_key(self, decision: RouteDecision) -> str:
        """The expert a turn waits for: the routed one, or the one that will stand in for it."""
        if decision.expert in self.available_experts():
            return decision.expert
        try:
            return self._stand_in(decision.expert, decision.category, "unavailable")
        except Exception:
            return decision.expert

    def expert_params(self) -> dict[str, int]:
        """Active parameters per materialised expert (from the disk tier manifests)."""
        return self.catalog.params()

    def experts_info(self) -> dict:
        """The ``coe experts --json`` shape: ``{"experts": [...], "tiers": {name: {exists, budget, used, free,
        budget_source}}, "exec_tier", "profile"}``: every expert of the catalog (a local one with its residency
        (source, params, bytes, state, tiers, available, reason, runtime), a remote one with its endpoint's
        health). Loads nothing."""
        snap = self.tiers.snapshot()
        experts = []
        for eid, cfg in self.config.experts.items():
            entry = {
                "id": eid,
                "source": cfg.source,
                "display_name": cfg.display_name or eid,
                "generalist": cfg.generalist,
            }
            if self.catalog.remote(eid) is not None:  # no weights and no tiers here
                entry.update(
                    params=None,
                    bytes=None,
                    dtype=None,
                    state="remote",
                    tiers={"gpu": 0, "cpu": 0, "disk": 0},
                    available=True,
                    reason=None,
                    runtime=None,
                    remote=self.catalog.remote_info(eid),
                )
                experts.append(entry)
                continue
            info = snap.experts[eid]
            entry.update(
                params=info.params or None,
                bytes=info.bytes or None,
                dtype=info.dtype,
                state=info.state,
                tiers=info.bytes_by_tier,
                available=info.available,
                reason=info.unavailable or (None if info.bytes else "not materialised yet (first use does it)"),
                runtime=info.runtime,
                **({"runtime_note": info.runtime_note} if info.runtime_note else {}),
            )
            experts.append(entry)
        tiers = {
            name: {
                "exists": t.exists,
                "budget": t.budget_bytes,
                "used": t.used_bytes,
                "free": t.free_bytes,
                "budget_source": t.budget_source,
            }
            for name, t in snap.tiers.items()
        }
        return {"experts": experts, "tiers": tiers, "exec_tier": snap.exec_tier, "profile": self.config.profile}

    def prepare(self, experts: list[str] | None = None) -> dict[str, str | None]:
        """Materialise and verify ``experts`` (None: all of the profile) and warm the router up (the first start
        of the app). Returns expert -> None when ready, else why not; an expert that fails is marked unavailable
        rather than raising. Errors of the router's warm-up (e.g. its training data missing) propagate."""
        problems = self.catalog.prepare(experts)
        if self.zero_gpu:  # before the first GPU call forks a worker, so that the worker inherits every expert
            from coe_core.experts.zero_gpu import stage_for_gpu_calls

            stage_for_gpu_calls(
                self.tiers, [e for e, problem in problems.items() if problem is None and self.catalog.remote(e) is None]
            )
        if self.routing is not None:
            self.routing.warm_up()
        return problems

    def readiness(self) -> Readiness:
        """Whether a turn can be served now: the router is loaded (or there is none) and at least one expert is
        available; a remote expert whose endpoint failed lately counts as unavailable. Loads nothing, so a
        readiness probe may call it often. Never raises."""
        if self.routing is None:
            router_state = "none"
        else:
            router_state = "loaded" if self.routing.router_loaded() else "not loaded"
        unavailable = self.catalog.problems()  # a remote expert whose endpoint failed lately is not ready either
        available = sorted(self.available_experts() - set(unavailable))
        return Readiness(
            ready=router_state != "not loaded" and bool(available),
            router_state=router_state,
            available_experts=available,
            unavailable=unavailable,
        )

    # -- routing -------------------------------------------------------------------------------------
    def route(self, messages: list[dict], overrides: dict | None = None) -> RouteDecision:
        """The routing decision for a conversation (a string is one user message), without generating or
        logging. ``overrides``: ``{"category": c}`` or ``{"expert": e}`` forces that step. Raises
        ``InvalidRequest`` for bad messages or overrides (``ValueError`` from the router for an unknown
        category or expert)."""
        messages = self._validate(messages)
        overrides = {k: v for k, v in (overrides or {}).items() if v}
        if any(not isinstance(v, str) for v in overrides.values()):
            raise InvalidRequest("a forced category or expert must be a name (text)")
        if self.routing is not None:
            return self.routing.decide(messages, overrides)
        return self._default_decision(messages, overrides)

    def _default_decision(self, messages: list[dict], overrides: dict) -> RouteDecision:
        """Without a router: the forced expert, else the profile's default expert."""
        expert = overrides.get("expert") or self.config.active_profile.default_expert
        if expert not in self.config.experts:
            raise InvalidRequest(f"unknown expert {expert!r}; experts: {', '.join(self.config.experts)}")
        reason = "override-expert" if overrides.get("expert") else "default"
        category = overrides.get("category") or self.config.fallback_category
        if category not in self.config.all_categories:
            raise InvalidRequest(f"unknown category {category!r}; categories: {', '.join(self.config.all_categories)}")
        return RouteDecision(
            category=category,
            expert=expert,
            reason=reason,
            override=overrides or None,
            routed_text=messages[-1]["content"],
            explanation=f"{category} -> {expert}: {reason} (no router)",
        )

    # -- one turn ------------------------------------------------------------------------------------
    def _validate(self, messages: list[dict]) -> list[dict]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list of {role, content}")
        most = self.config.limits.max_messages
        if len(messages) > most:  # counted before anything else looks at them
            raise PromptTooLong(
                f"the conversation has {len(messages)} messages, more than the limit of {most} "
                "(limits.max_messages): shorten it or start a new chat"
            )
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidRequest(f"message {i} must be {{'role': system|user|assistant, 'content': str}}")
            clean.append({"role": m["role"], "content": clean_text(m["content"])})
        if clean[-1]["role"] != "user":
            raise InvalidRequest("the last message must be the user's")
        if not clean[-1]["content"].strip():
            raise InvalidRequest("empty prompt: type a question or a task")
        total = sum(len(m["content"]) for m in clean)
        limit = self.config.limits.max_prompt_chars
        if total > limit:
            raise PromptTooLong(
                f"the conversation has {total} characters, more than the limit of {limit} "
                "(limits.max_prompt_chars): shorten it or start a new chat"
            )
        return clean

    def _params(
        self, max_new_tokens, temperature, top_p, stop, expert: str, min_new_tokens: int = 0
    ) -> GenerationParams:
        lim = self.config.limits
        try:  # inf, "abc", [] ...: a bad request, not a failed turn
            max_new = lim.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
            temp = lim.temperature if temperature is None else float(temperature)
            tp = lim.top_p if top_p is None else float(top_p)
        except (TypeError, ValueError, OverflowError):
            raise InvalidRequest("max_new_tokens must be a whole number, temperature and top_p numbers") from None
        if not 1 <= max_new <= lim.max_new_tokens_cap:
            raise InvalidRequest(f"max_new_tokens must be between 1 and {lim.max_new_tokens_cap}")
        if not 0 <= temp <= 2:
            raise InvalidRequest("temperature must be between 0 and 2")
        if not 0 < tp <= 1:
            raise InvalidRequest("top_p must be in (0, 1]")
        stops = tuple(self.config.experts[expert].stop) + tuple(clean_text(str(s)) for s in stop or ())
        return GenerationParams(max_new, temp, tp, stops, min(max(int(min_new_tokens), 0), max_new))

    def chat(
        self,
        messages: list[dict] | str,
        overrides: dict | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        cancel: threading.Event | None = None,
        client: str = "cli",
        session_id: str | None = None,
        conversation_id: int | None = None,
        min_new_tokens: int = 0,
    ) -> Iterator[Event]:
        """Run one turn, yielding its events: ``RouteDecision``, ``Queued``*, ``SwapEvent``*, ``Notice``*,
        ``TextChunk``*, ``TurnDone`` (its stats carry the logged interaction id). Closing the iterator, or
        setting ``cancel``, cancels generation (logged as cancelled). ``overrides`` force a category or expert;
        ``max_new_tokens``/``temperature``/``top_p`` default to ``limits.*``; ``client``, ``session_id`` and
        ``conversation_id`` go into the log.

        Bad requests raise ``InvalidRequest`` before anything is yielded or logged. Expert failures end the turn
        with ``status == "error"`` in ``TurnDone`` (logged), and other experts keep serving. Beyond
        ``serve.max_queue`` waiting turns it raises ``QueueFull``, also before anything is logged.
        """
        messages = self._validate(messages)
        start = time.perf_counter()
        started_at = _now()
        decision = self.route(messages, overrides)
        route_end = time.perf_counter() - start
        params = self._params(max_new_tokens, temperature, top_p, stop, decision.expert, min_new_tokens)
        cancel = cancel or threading.Event()
        # beyond serve.max_queue: QueueFull, before anything is logged (the front end says busy / 429)
        ticket = self.scheduler.admit(self._queue_key(decision))
        try:
            stats = TurnStats(expert=decision.expert, response="", timeline=[("route", 0.0, route_end)])
            # the turn's log row at its start and at its end: the same request, only the swaps and stats grow
            make_record = functools.partial(
                self._record, decision, messages, started_at, client, session_id, conversation_id
            )
            uid = self._log_start(make_record, stats)
            swaps: list[SwapEvent] = []
            pieces: list[str] = []
            failure: Exception | None = None
            # the turn is logged on whichever way out it takes; only whether to wait for the write differs
            finish = functools.partial(self._finish, make_record, stats, pieces, start, swaps, uid=uid)
            try:
                yield decision
                t_queue = time.perf_counter() - start
                queued = False
                for event in self.scheduler.wait(ticket, cancel):
                    queued = True
                    yield event
                stats.queue_s = time.perf_counter() - start - t_queue
                if queued:
                    stats.timeline.append(("queue", t_queue, t_queue + stats.queue_s))
                if ticket.state == "cancelled":  # stopped while waiting: it never ran
                    stats.status = "cancelled"
                else:
                    yield from self._serve(
                        decision,
                        messages,
                        params,
                        cancel,
                        start,
                        stats,
                        swaps,
                        pieces,
                        ready=lambda: self.scheduler.ready(ticket),
                    )
            except (GeneratorExit, KeyboardInterrupt):  # the client went away (or Ctrl-C): stop, log what we have
                cancel.set()
                stats.status = "cancelled"
                self.scheduler.leave(ticket)
                finish(wait=False)
                raise
            except Exception as exc:  # bad requests were refused above: whatever fails now is logged as an error
                log.warning("turn on %s failed: %s", stats.expert, exc)
                stats.status, stats.error, stats.error_type = "error", str(exc), type(exc).__name__
                failure = exc
            self.scheduler.leave(ticket)  # the next turn may start while this one is logged
            finish(wait=True)
        finally:
            self.scheduler.leave(ticket)
        yield TurnDone(stats, error=failure)

    def _serve(
        self, decision, messages, params, cancel, start, stats, swaps, pieces, ready=lambda: None
    ) -> Iterator[Event]:
        """``ready()`` is called once the expert that serves is resident (the queue may then start others)."""
        expert = decision.expert
        if expert not in self.available_experts():
            problem = self.catalog.problem(expert)
            replacement = self._stand_in(expert, decision.category, f"{expert} is unavailable ({problem})")
            yield Notice(
                f"{expert} is unavailable ({problem}); {replacement} serves this turn instead.",
                kind="warning",
                expert=replacement,
            )
            params = self._restop(params, expert, replacement)
            expert = stats.expert = replacement
        remote = self.catalog.remote(expert)
        if remote is not None:
            ready()
            try:
                yield from self._serve_remote(remote, messages, params, cancel, start, stats, swaps, pieces)
                return
            except RemoteExpertError as exc:
                if pieces:  # it broke off mid-answer: a clean fallback is no longer possible
                    raise
                if cancel.is_set():  # stopped while connecting: nothing to fall back for
                    stats.status = "cancelled"
                    return
                replacement = self._stand_in(expert, decision.category, str(exc), local_only=True)
                yield Notice(f"{exc}; {replacement} serves this turn instead.", kind="warning", expert=replacement)
                decision.reason = "remote-fallback"
                decision.explanation += f"; {expert} did not answer, {replacement} served instead"
                params = self._restop(params, expert, replacement)
                expert = stats.expert = replacement
        yield from self._serve_local(decision, expert, messages, params, cancel, start, stats, swaps, pieces, ready)

    def _restop(self, params: GenerationParams, old: str, new: str) -> GenerationParams:
        """The stand-in's own stop strings (a plain-format expert needs its turn markers), plus the caller's."""
        caller = params.stop[len(self.config.experts[old].stop) :]
        return replace(params, stop=(*self.config.experts[new].stop, *caller))

    def _serve_local(
        self, decision, expert, messages, params, cancel, start, stats, swaps, pieces, ready=lambda: None
    ) -> Iterator[Event]:
        t_acquire = time.perf_counter() - start
        with self.tiers.acquire(expert) as lease:
            ready()
            self._maybe_prefetch(decision, expert)  # only now: a prefetch must never take the room this turn needs
            for event in lease.events:
                event.started_at = (event.started_at - start) if event.started_at else None
                swaps.append(event)
                yield event
            t_ready = time.perf_counter() - start
            stats.timeline.append(("swap" if lease.events else "resident", t_acquire, t_ready))
            cfg = self.config.experts[expert]
            context = cfg.context_length or lease.manifest.get("context_length") or 2048
            # the prompt any expert prefills is bounded (limits.max_prompt_tokens), whatever its context
            context = min(context, self.config.limits.max_prompt_tokens + params.max_new_tokens)
            prompt = lease.runtime.format_prompt(
                messages, cfg, context_length=context, reserve_tokens=params.max_new_tokens
            )
            stats.prompt_tokens, stats.truncated = len(prompt.input_ids), prompt.truncated
            if prompt.notice:
                yield Notice(prompt.notice)
            result = GenerationResult()
            t_gen = time.perf_counter() - start
            try:
                if self.zero_gpu and lease.runtime.name == "transformers":
                    # the GPU is attached for this call only (a no-op wrapper off ZeroGPU)
                    from coe_core.experts.zero_gpu import stream_via_gpu_call

                    stream = stream_via_gpu_call(
                        expert,
                        lease.model,
                        lease.tokenizer,
                        prompt.input_ids,
                        params,
                        device=lease.device,
                        cancel=cancel,
                        result=result,
                    )
                else:
                    stream = lease.runtime.stream(prompt.input_ids, params, cancel=cancel, result=result)
                with contextlib.closing(stream):
                    for piece in stream:
                        if stats.ttft_s is None:
                            stats.ttft_s = time.perf_counter() - start
                            stats.timeline.append(("prefill", t_gen, stats.ttft_s))
                        pieces.append(piece)
                        yield TextChunk(piece)
                stats.status = "cancelled" if result.cancelled else "ok"
            finally:  # also when the client went away mid-answer: the logged turn keeps its counts
                stats.new_tokens = result.new_tokens
                if stats.ttft_s is not None:
                    stats.timeline.append(("generate", stats.ttft_s, time.perf_counter() - start))

    def _serve_remote(
        self, remote: RemoteExpert, messages, params, cancel, start, stats, swaps, pieces
    ) -> Iterator[Event]:
        """A remote expert: no tiers to fill, so no swap; its connection is reported as a ``RemoteConnect``."""
        down = remote.down_reason()
        if down:
            raise RemoteExpertError(f"{remote.describe()} is down ({down})")
        t_open = time.perf_counter() - start
        reply = remote.open(messages, params, cancel)
        try:
            t = reply.timings
            stats.connection = RemoteConnect(
                remote.id,
                t.connect_s,
                t.headers_s,
                t.first_byte_s,
                attempts=t.attempts,
                base_url=remote.base_url,
                started_at=t_open,
            )
            yield stats.connection
            t_gen = time.perf_counter() - start
            stats.timeline.append(("connect", t_open, t_gen))
            for piece in reply.text(cancel):
                if stats.ttft_s is None:
                    stats.ttft_s = time.perf_counter() - start
                    stats.timeline.append(("prefill", t_gen, stats.ttft_s))
                pieces.append(piece)
                yield TextChunk(piece)
            stats.new_tokens, stats.prompt_tokens = reply.new_tokens, reply.prompt_tokens or 0
            stats.status = "cancelled" if reply.cancelled else "ok"
            if stats.ttft_s is not None:
                stats.timeline.append(("generate", stats.ttft_s, time.perf_counter() - start))
        finally:
            reply.close()

    def _stand_in(self, expert: str, category: str, problem: str, *, local_only: bool = False) -> str:
        """Who serves when ``expert`` cannot: the best available expert for ``category`` (highest score in the
        score table; ties and experts without scores in the order default, generalists, the rest)."""
        candidates = [
            e
            for e in self.available_experts()
            if e != expert
            and not (local_only and self.catalog.remote(e) is not None)
            and self.catalog.problem(e) is None  # not a remote endpoint known to be down: it would fail too
        ]
        if not candidates:
            where = "local expert" if local_only else "other expert"
            raise ExpertUnavailable(f"{problem}; no {where} is available to stand in")
        scores: dict = {}
        if self.routing is not None:
            with contextlib.suppress(Exception):  # the score table only orders candidates
                scores = self.routing.score_table().get("scores", {})
        cfgs = self.config.experts
        preference = [self.config.active_profile.default_expert, *[e for e, c in cfgs.items() if c.generalist], *cfgs]

        def rank(e: str) -> tuple[float, int]:
            score = scores.get(e, {}).get(category)
            return (float("-inf") if score is None else float(score), -preference.index(e))

        return max(candidates, key=rank)

    def _maybe_prefetch(self, decision: RouteDecision, serving: str) -> None:
        """While ``serving`` decodes, stage the expert a later turn will need: first the one a waiting turn is
        queued for (known; staged only into free room, so it never evicts what runs or waits), else the
        router's close runner-up for this prompt (a guess at the conversation's next turn)."""
        upcoming = self.scheduler.upcoming_expert()
        if upcoming and upcoming != serving and upcoming in self.available_experts():
            if self.catalog.remote(upcoming) is None:
                self.tiers.prefetch(upcoming, evict=False)
            return
        if self.routing is None or decision.override:
            return
        try:
            other = self.routing.runner_up(decision)
        except Exception:  # prefetch is an optimisation; never let it break a turn
            return
        if other and other != serving and other in self.available_experts():
            self.tiers.prefetch(other)

    def _record(self, decision, messages, started_at, client, session_id, conversation_id, swaps, stats):
        """The turn's log row as it stands (``chat`` binds the request, the start and the end add the rest)."""
        from coe_core.store.records import TurnRecord

        return TurnRecord.from_turn(
            decision,
            swaps,
            stats,
            prompt=messages[-1]["content"],
            started_at=started_at,
            client=client,
            session_id=session_id,
            conversation_id=conversation_id,
        )

    def _log_start(self, make_record, stats) -> str | None:
        """Log the turn as running before any compute: a crash from here on leaves an interrupted row, not
        nothing. The end of the turn completes the same row (same uid). Returns the uid."""
        if self.turn_logger is None:
            return None
        record = make_record([], stats)
        record.status, record.finished_at, record.response = "running", None, None
        try:
            self.turn_logger.submit(record)
        except Exception as exc:  # the end of the turn is still logged
            log.warning("could not log the start of the turn: %s", exc)
            return None
        return record.uid

    def _finish(
        self, make_record, stats: TurnStats, pieces, start, swaps, *, wait: bool, uid: str | None = None
    ) -> None:
        stats.response = "".join(pieces)
        stats.total_s = time.perf_counter() - start
        gen_s = stats.total_s - (stats.ttft_s or stats.total_s)
        stats.tokens_per_s = (stats.new_tokens - 1) / gen_s if stats.new_tokens > 1 and gen_s > 0 else 0.0
        stats.tiers = self.catalog.states()
        if self.turn_logger is None:
            return
        record = make_record(swaps, stats)
        if uid is not None:
            record.uid = uid
        future = self.turn_logger.submit(record)
        if not wait:
            return
        try:  # the stream has ended: waiting here never delays a token
            stats.interaction_id = future.result(timeout=15)
        except FutureTimeout:
            log.warning("logging the turn is slow; it stays queued and will be written")
        except Exception as exc:
            log.warning("the turn could not be logged now (%s); it was spooled for replay", exc)

    # -- other engine services ---------------------------------------------------------------------
    def run(self, messages, overrides=None, **kwargs) -> tuple[RouteDecision, list[SwapEvent], TurnStats]:
        """Run a whole turn and return (decision, swaps, stats): the non-streaming form of ``chat``, with its
        arguments and its errors (``Transcript.collect(coe.chat(...))`` keeps the rest: connection, notices, the
        failure)."""
        turn = Transcript.collect(self.chat(messages, overrides, **kwargs))
        return turn.decision, turn.swaps, turn.stats

    def reference_logprob(self, expert_id: str, messages: list[dict], reference: str) -> tuple[float, int]:
        """Sum of log-probs of ``reference`` as the expert's answer to ``messages`` (same prompt format as
        generation) and the number of its tokens. Makes the expert resident; raises ``InvalidRequest`` for an
        unknown expert and ``ExpertUnavailable`` for one that cannot be loaded."""
        with self.tiers.acquire(expert_id) as lease:
            return lease.runtime.reference_logprob(messages, reference, self.config.experts[expert_id])

    def feedback(
        self,
        interaction_id: int,
        kind: str,
        corrected_category: str | None = None,
        comment: str | None = None,
        *,
        owner: str | None = None,
        trusted: bool = True,
    ) -> int:
        """Feedback on a logged turn. ``owner``: the session or key giving it; it must have made the turn
        (None: not checked, the CLI). An untrusted author's like or correction waits for an admin's review
        before it trains the router; ``limits.feedback_per_minute`` bounds each owner. Returns the feedback id.
        Raises ``StoreError`` without a store, ``RateLimited`` past the limit, ``StoreError`` for an unknown
        turn, kind or category, or a turn of another owner."""
        if self.store is None:
            raise StoreError("this engine runs without a store; feedback needs one")
        if owner is not None:
            self._feedback_rate.hit(owner)
        review = review_of(kind, trusted)
        return self.store.add_feedback(
            interaction_id,
            kind,
            corrected_category,
            comment,
            categories=self.config.all_categories,
            owner=owner,
            review=review,
            author=owner,
        )

    def close(self) -> None:
        """Close remote experts' connections, write the turns still queued for the log and close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.catalog.close()
        self.tiers.close()
        if self.turn_logger is not None:
            self.turn_logger.close()
        if self.store is not None:
            self.store.close()
