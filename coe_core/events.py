"""Typed events of one turn, and the one collector every front end gathers them with.

The engine yields ``RouteDecision``, ``Queued``*, ``SwapEvent``* or a ``RemoteConnect``, ``Notice``*,
``TextChunk``*, ``TurnDone`` to every front end (app, gradio API, OpenAI-compatible API, CLI) alike; each front
end feeds them to a ``Transcript`` and reads the turn from it, instead of a loop of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Why a turn went to its expert: ``mapped`` (the optimiser's mapping), ``fallback`` (the router was unsure:
#: the fallback category's expert), ``override-category`` / ``override-expert`` (the user forced one),
#: ``mapping-override`` (``mapping.overrides`` in spaces.yaml), ``default`` (no router: the default expert),
#: ``remote-fallback`` (set during the turn: its remote expert did not answer and a local one stood in).
RouteReason = Literal[
    "mapped", "fallback", "override-category", "override-expert", "mapping-override", "default", "remote-fallback"
]


@dataclass
class RouteDecision:
    """Step 1 (category) and step 2 (expert) of two-step routing, with the why."""

    category: str
    expert: str
    reason: RouteReason
    probabilities: dict[str, float] = field(default_factory=dict)
    confidence: float = 1.0
    fallback: bool = False
    latency_ms: float = 0.0
    threshold: float | None = None
    #: what the user forced, if anything: {"category": ...} or {"expert": ...}
    override: dict[str, str] | None = None
    router_version: str | None = None
    #: the text the router saw (latest user turn plus earlier context)
    routed_text: str = ""
    #: a human sentence for the UI: "coding (0.91) -> smollm2-135m: mapped by the optimiser"
    explanation: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SwapTrigger = Literal["request", "prefetch", "eviction"]


@dataclass
class SwapEvent:
    """One move of an expert's weights between tiers (disk, cpu, gpu)."""

    expert: str
    src: str
    dst: str
    bytes: int
    seconds: float
    trigger: SwapTrigger = "request"
    evicted: list[str] = field(default_factory=list)
    #: named phases and their seconds, e.g. {"read": 0.05, "bind": 0.001, "warmup": 0.03}
    phases: dict[str, float] = field(default_factory=dict)
    #: when it started, seconds on the engine's monotonic clock relative to the turn start (if in a turn)
    started_at: float | None = None

    @property
    def gbps(self) -> float:
        return (self.bytes / self.seconds / 1e9) if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbps"] = round(self.gbps, 3)
        return d


@dataclass
class RemoteConnect:
    """How a remote expert (an ``openai:`` source) was reached for a turn. It has no weights here, so nothing
    moves between tiers and it is no swap: its cost is the connection. Seconds from the start of the request."""

    expert: str
    #: TCP connect done (0 on a reused connection)
    connect_s: float
    #: response headers received
    headers_s: float
    #: first server-sent event read
    first_byte_s: float
    #: tries it took (connections refused or reset, 5xx and 429 are retried)
    attempts: int = 1
    base_url: str = ""
    #: when it started, seconds relative to the turn start
    started_at: float | None = None

    @property
    def phases(self) -> dict[str, float]:
        """Consecutive stretches (they add up to ``first_byte_s``): connect, wait for headers, first byte."""
        return {
            "connect": self.connect_s,
            "headers": max(self.headers_s - self.connect_s, 0.0),
            "first_byte": max(self.first_byte_s - self.headers_s, 0.0),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "phases": {k: round(v, 4) for k, v in self.phases.items()}}


@dataclass
class TextChunk:
    """A piece of streamed answer text."""

    text: str


@dataclass
class Notice:
    """Something the user should know that is not an error (e.g. the prompt was truncated)."""

    message: str
    kind: str = "info"
    #: set when the notice says another expert serves the turn (the mapped one is unavailable or down)
    expert: str | None = None


@dataclass
class Queued:
    """The turn waits in the serving queue while others go first (``coe_core/serving``)."""

    #: 1: next to start
    position: int
    #: turns that go first (running or waiting ahead), by expert
    ahead_by_expert: dict[str, int] = field(default_factory=dict)
    #: full (serve.max_running turns run) | behind (turns ahead go first) | swap (its expert needs a swap, so it
    #: waits for the running expert's turns)
    reason: str = "behind"
    #: the expert it waits for
    expert: str = ""

    @property
    def message(self) -> str:
        """For the chat: "waiting: 2 turns ahead on gemma3-270m, then a swap"."""
        ahead = sum(self.ahead_by_expert.values())
        where = ", ".join(f"{n} on {e}" for e, n in sorted(self.ahead_by_expert.items()))
        text = f"waiting: {ahead} turn{'s' if ahead != 1 else ''} ahead" + (f" ({where})" if where else "")
        if len(self.ahead_by_expert) == 1:
            text = f"waiting: {ahead} turn{'s' if ahead != 1 else ''} ahead on {where.split(' on ', 1)[1]}"
        if self.reason == "swap":
            text += f", then a swap to {self.expert}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


@dataclass
class TurnStats:
    expert: str
    response: str
    status: Literal["ok", "cancelled", "error"] = "ok"
    error: str | None = None
    #: class of the exception that failed the turn (ExpertUnavailable, TierBusy, RemoteExpertError, ...)
    error_type: str | None = None
    ttft_s: float | None = None
    total_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    tokens_per_s: float = 0.0
    truncated: bool = False
    #: timeline of the turn: [(phase, start_s, end_s)] relative to the turn start
    timeline: list[tuple[str, float, float]] = field(default_factory=list)
    #: expert -> state after the turn (disk, cpu, gpu, split, ...)
    tiers: dict[str, str] = field(default_factory=dict)
    interaction_id: int | None = None
    #: seconds the turn waited in the serving queue before it ran
    queue_s: float = 0.0
    #: how the remote expert that served was reached (None: a local expert served)
    connection: RemoteConnect | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TurnDone:
    """Last event of every turn, also when it was cancelled or failed."""

    stats: TurnStats
    #: the exception that failed the turn (``stats.status == "error"``), for a front end to map to its medium
    #: like any raised ``CoEError``; never logged as an object (``stats.error`` holds its message)
    error: Exception | None = None


Event = RouteDecision | Queued | SwapEvent | RemoteConnect | TextChunk | Notice | TurnDone


@dataclass
class Transcript:
    """One turn as a front end sees it, gathered from its events: ``add`` each event (or iterate
    ``follow(events)``), then read the fields. Errors the engine raises before the turn starts (a bad request,
    a full queue) propagate out of the iterator as they are; a turn that fails later ends with ``TurnDone`` and
    its exception in ``error``."""

    decision: RouteDecision | None = None
    #: the turn's waits in the serving queue, in order (empty: it started at once)
    queued: list[Queued] = field(default_factory=list)
    swaps: list[SwapEvent] = field(default_factory=list)
    #: set when a remote expert answered (or was reached and then failed mid-answer)
    connection: RemoteConnect | None = None
    notices: list[Notice] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    stats: TurnStats | None = None
    error: Exception | None = None

    def add(self, event: Event) -> Event:
        """Keep what ``event`` says about the turn; returns the event (so a loop can go on with it)."""
        if isinstance(event, RouteDecision):
            self.decision = event
        elif isinstance(event, Queued):
            self.queued.append(event)
        elif isinstance(event, SwapEvent):
            self.swaps.append(event)
        elif isinstance(event, RemoteConnect):
            self.connection = event
        elif isinstance(event, Notice):
            self.notices.append(event)
        elif isinstance(event, TextChunk):
            self.pieces.append(event.text)
        elif isinstance(event, TurnDone):
            self.stats, self.error = event.stats, event.error
        return event

    def follow(self, events: Iterable[Event]) -> Iterator[Event]:
        """Each event of ``events``, kept here before it is handed on."""
        for event in events:
            yield self.add(event)

    @classmethod
    def collect(cls, events: Iterable[Event]) -> Transcript:
        """Run a whole turn and keep it (the non-streaming form)."""
        transcript = cls()
        for _ in transcript.follow(events):
            pass
        return transcript

    @property
    def text(self) -> str:
        """The answer so far."""
        return "".join(self.pieces)

    @property
    def done(self) -> bool:
        return self.stats is not None

    @property
    def failed(self) -> bool:
        return self.stats is not None and self.stats.status == "error"

    @property
    def served_by(self) -> str | None:
        """The expert that serves (or served) the turn: the routed one, or the one a notice says stands in."""
        if self.stats is not None:
            return self.stats.expert
        stand_ins = [n.expert for n in self.notices if n.expert]
        if stand_ins:
            return stand_ins[-1]
        return self.decision.expert if self.decision is not None else None
