"""Chat tab: streaming multi-turn chat with the routing shown live beside it.

Per browser session (``gr.State``): the session id the engine logs, the cancel flag of the running
turn, and which chat messages belong to which logged turn (for feedback). Nothing of one user's
turn lives in a global.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from app import plots
from app.chat_messages import (
    connection_message,
    engine_messages,
    escape_html,
    notice_message,
    queued_message,
    resident_message,
    routing_message,
    stats_line,
    swap_message,
)
from app.context import AppContext
from app.errors import ENGINE_ERRORS, user_message
from coe_core.events import Notice, Queued, RemoteConnect, RouteDecision, SwapEvent, TextChunk, Transcript, TurnDone
from coe_core.tiers.snapshot import TierSnapshot

AUTO = "auto"
FEEDBACK_WRONG = "Wrong category"


def generation_concurrency(coe) -> int:
    """Chat jobs Gradio lets into the engine at once: the running turns and a share of the engine's queue
    (``serve.*``), so a visitor waits in the one queue every door shares and sees "waiting: ..." there; capped at
    32 (each waiting job holds one of Gradio's worker threads)."""
    serve = coe.config.serve
    return max(2, min(serve.max_running + serve.max_queue, 32))


@dataclass
class TurnRef:
    """Which chat messages belong to a logged turn."""

    interaction_id: int | None
    first_index: int
    last_index: int
    prompt: str
    category: str


@dataclass
class ChatSession:
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancel: threading.Event = field(default_factory=threading.Event)
    turns: list[TurnRef] = field(default_factory=list)

    def turn_at(self, index: int) -> TurnRef | None:
        for turn in self.turns:
            if turn.first_index <= index <= turn.last_index:
                return turn
        return None

    def by_id(self, interaction_id: int) -> TurnRef | None:
        return next((t for t in self.turns if t.interaction_id == interaction_id), None)


def turn_choices(session: ChatSession) -> list[tuple[str, int]]:
    """(label, interaction id) of this session's logged turns, newest first."""
    out = []
    for t in reversed(session.turns):
        if t.interaction_id is None:
            continue
        prompt = " ".join(t.prompt.split())
        prompt = prompt if len(prompt) <= 48 else prompt[:47] + "…"
        out.append((f"#{t.interaction_id} · {t.category} · {prompt}", t.interaction_id))
    return out


def residency_summary(snapshot: TierSnapshot, remote: Sequence[str] = ()) -> str:
    """One line per expert: where it is (``remote`` for the ``remote`` experts, which have no tiers)."""
    parts = []
    for eid, e in snapshot.experts.items():
        busy = " ▶ generating" if e.pinned else ""
        reason = f" ({e.unavailable})" if e.unavailable else ""
        parts.append(f"`{eid}` on {e.runtime.replace('_', '.')}: **{e.state}**{busy}{reason}")
    parts += [f"`{eid}`: **remote**" for eid in remote]
    return " · ".join(parts) + "  \n_Each row is one tier; the dashed line is its budget when it is in view._"


class ChatTab:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.coe = ctx.coe
        limits = self.coe.config.limits
        self.default_tokens = min(limits.max_new_tokens, limits.max_new_tokens_cap)

    # -- layout ----------------------------------------------------------------------------------------
    def build(self) -> None:
        ctx, limits = self.ctx, self.coe.config.limits
        self.session = gr.State(None)
        self.pending = gr.State("")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=340):
                self.chatbot = gr.Chatbot(
                    elem_id="coe-chatbot",
                    label="Chat",
                    show_label=False,
                    height=500,
                    buttons=["copy"],
                    feedback_options=("Like", "Dislike", FEEDBACK_WRONG),
                    placeholder="Ask anything: the router picks a category, the mapping picks an expert, "
                    "and you see each step here.",
                )
                with gr.Row(equal_height=True):
                    self.prompt = gr.Textbox(
                        placeholder="Type a prompt and press Enter",
                        show_label=False,
                        scale=6,
                        lines=1,
                        max_lines=8,
                        elem_id="coe-prompt",
                        autofocus=True,
                    )
                    self.send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="coe-send")
                    self.stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="coe-stop")
                with gr.Row():
                    self.new_chat = gr.Button("New chat", size="sm", variant="secondary")
                with gr.Accordion("Controls", open=False):
                    with gr.Row():
                        self.force_category = gr.Dropdown(
                            [("auto (router decides)", AUTO)] + [(c, c) for c in ctx.all_categories],
                            value=AUTO,
                            label="Force category",
                            info="off by default: the router decides",
                        )
                        self.force_expert = gr.Dropdown(
                            [("auto (mapping decides)", AUTO)] + [(e, e) for e in ctx.experts],
                            value=AUTO,
                            label="Force expert",
                            info="off by default: the mapping decides",
                        )
                    with gr.Row():
                        self.max_tokens = gr.Slider(
                            1,
                            limits.max_new_tokens_cap,
                            value=self.default_tokens,
                            step=1,
                            label="Max new tokens (tokens)",
                            elem_id="coe-max-tokens",
                        )
                        self.temperature = gr.Slider(
                            0.0, 2.0, value=limits.temperature, step=0.05, label="Temperature (0 = greedy)"
                        )
                with gr.Accordion("Wrong category? Correct the router", open=False) as self.correct_box:
                    gr.Markdown(
                        "Pick the answer and the category it should have had; the router learns "
                        "from corrections at its next retrain. 👍/👎 on each answer are stored too."
                    )
                    with gr.Row():
                        self.correct_turn = gr.Dropdown([], label="Answer", scale=2)
                        self.correct_category = gr.Dropdown(ctx.all_categories, label="Correct category", scale=1)
                    self.correct_send = gr.Button("Send correction", size="sm")
            with gr.Column(scale=2, min_width=300):
                self.decision_md = gr.Markdown("Routing appears here when you send a prompt.", elem_id="coe-decision")
                self.prob_plot = gr.Plot(
                    plots.probabilities_figure({}, ctx.colors),
                    label="Category probabilities",
                    elem_id="coe-prob-plot",
                    elem_classes=["coe-plot"],
                    show_label=False,
                )
                self.residency_plot = gr.Plot(
                    label="Tier residency (live)",
                    elem_id="coe-residency-plot",
                    elem_classes=["coe-plot"],
                    show_label=False,
                )
                self.residency_md = gr.Markdown(elem_classes=["coe-stats"])
                self.timeline_plot = gr.Plot(
                    plots.timeline_figure([]),
                    label="This turn's timeline",
                    elem_id="coe-timeline-plot",
                    elem_classes=["coe-plot"],
                    show_label=False,
                )
                self.turn_md = gr.Markdown(elem_classes=["coe-stats"], elem_id="coe-turn-stats")
        self.timer = gr.Timer(1.0, active=False)

    # -- events ----------------------------------------------------------------------------------------
    def wire(self, demo: gr.Blocks) -> None:
        private: dict[str, Any] = {"api_visibility": "private"}
        demo.load(self.new_session, None, self.session, **private)
        demo.load(self.residency, None, [self.residency_plot, self.residency_md], **private)
        turn_inputs = [
            self.pending,
            self.chatbot,
            self.session,
            self.force_category,
            self.force_expert,
            self.max_tokens,
            self.temperature,
        ]
        turn_outputs = [
            self.chatbot,
            self.prob_plot,
            self.timeline_plot,
            self.decision_md,
            self.turn_md,
            self.correct_turn,
            self.session,
        ]
        for trigger in (self.prompt.submit, self.send.click):
            (
                trigger(
                    self.start_turn,
                    [self.prompt, self.session],
                    [self.prompt, self.pending, self.session, self.timer, self.send],
                    queue=False,
                    **private,
                )
                .then(
                    self.respond,
                    turn_inputs,
                    turn_outputs,
                    concurrency_limit=generation_concurrency(self.coe),
                    concurrency_id="generation",
                    show_progress="hidden",
                    **private,
                )
                .then(
                    self.end_turn,
                    None,
                    [self.prompt, self.timer, self.send, self.residency_plot, self.residency_md],
                    **private,
                )
            )
        self.stop.click(self.stop_turn, self.session, None, queue=False, **private)
        self.timer.tick(
            self.residency, None, [self.residency_plot, self.residency_md], show_progress="hidden", **private
        )
        self.chatbot.like(
            self.on_feedback, [self.session, self.ctx.admin_state], [self.correct_turn, self.correct_box], **private
        )
        self.correct_send.click(
            self.on_correction,
            [self.session, self.correct_turn, self.correct_category, self.ctx.admin_state],
            None,
            **private,
        )
        self.new_chat.click(
            self.clear,
            self.session,
            [self.chatbot, self.session, self.correct_turn, self.decision_md, self.turn_md],
            queue=False,
            **private,
        )

    # -- handlers --------------------------------------------------------------------------------------
    def new_session(self, request: gr.Request | None = None) -> ChatSession:
        sid = getattr(request, "session_hash", None) if request is not None else None
        return ChatSession(session_id=sid or uuid.uuid4().hex)

    def residency(self) -> tuple[Any, str]:
        snap = self.coe.tiers.snapshot()
        return plots.residency_figure(snap), residency_summary(snap, self.coe.catalog.remote_ids())

    def start_turn(self, prompt: str, session: ChatSession | None) -> tuple[Any, ...]:
        session = session or self.new_session()
        session.cancel = threading.Event()  # a fresh flag per turn; Stop sets it
        if not (prompt or "").strip():
            gr.Warning("Type a prompt first.")
            return gr.update(), "", session, gr.Timer(active=False), gr.update()
        return (
            gr.update(value="", interactive=False),
            prompt,
            session,
            gr.Timer(active=True),
            gr.update(interactive=False),
        )

    def end_turn(self) -> tuple[Any, ...]:
        fig, md = self.residency()
        return gr.update(interactive=True), gr.Timer(active=False), gr.update(interactive=True), fig, md

    def stop_turn(self, session: ChatSession | None) -> None:
        if session is not None:
            session.cancel.set()

    def clear(self, session: ChatSession | None) -> tuple[Any, ...]:
        session = session or self.new_session()
        session.turns.clear()
        return [], session, gr.update(choices=[], value=None), "Routing appears here when you send a prompt.", ""

    def respond(
        self,
        prompt: str,
        history: list[dict] | None,
        session: ChatSession | None,
        force_category: str,
        force_expert: str,
        max_new_tokens: float,
        temperature: float,
    ) -> Iterator[dict]:
        """One turn: stream the engine's events into the chat and the plots beside it."""
        if not (prompt or "").strip():
            return
        session = session or self.new_session()
        history = list(history or [])
        messages = engine_messages(history, prompt)
        overrides = {k: v for k, v in (("category", force_category), ("expert", force_expert)) if v and v != AUTO}
        history.append({"role": "user", "content": escape_html(prompt)})
        first_index = len(history)
        # every door's turns wait in the engine's one queue (serve.*); beyond serve.max_queue it says busy
        yield from self._respond(
            prompt, history, messages, session, overrides, first_index, max_new_tokens, temperature
        )

    def _respond(
        self,
        prompt: str,
        history: list[dict],
        messages: list[dict],
        session: ChatSession,
        overrides: dict,
        first_index: int,
        max_new_tokens: float,
        temperature: float,
    ) -> Iterator[dict]:
        route_id = f"route-{uuid.uuid4().hex[:8]}"
        events = self.coe.chat(
            messages,
            overrides or None,
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            cancel=session.cancel,
            client="app",
            session_id=session.session_id,
        )
        turn = Transcript()
        route_msg: dict | None = None
        answer: dict | None = None
        queued_msg: dict | None = None
        with contextlib.closing(events):
            try:
                for event in turn.follow(events):
                    if queued_msg is not None and not isinstance(event, Queued):
                        queued_msg["metadata"]["status"] = "done"
                    if isinstance(event, RouteDecision):
                        route_msg = routing_message(event, route_id)
                        history.append(route_msg)
                        yield {
                            self.chatbot: history,
                            self.decision_md: f"**{event.explanation}**",
                            self.prob_plot: plots.probabilities_figure(
                                event.probabilities,
                                self.ctx.colors,
                                threshold=event.threshold,
                                chosen=event.category,
                                fallback=event.fallback,
                            ),
                            self.timeline_plot: plots.timeline_figure([]),
                            self.turn_md: "routing done; making the expert resident…",
                        }
                    elif isinstance(event, SwapEvent):
                        history.append(swap_message(event, route_id))
                        yield {self.chatbot: history}
                    elif isinstance(event, RemoteConnect):
                        history.append(connection_message(event, route_id))
                        yield {self.chatbot: history}
                    elif isinstance(event, Queued):
                        if queued_msg is None:
                            queued_msg = queued_message(event, route_id)
                            history.append(queued_msg)
                        else:  # one line, updated as the turn moves up
                            queued_msg["content"] = escape_html(event.message)
                        yield {self.chatbot: history, self.turn_md: f"⏳ {escape_html(event.message)}"}
                    elif isinstance(event, Notice):
                        history.append(notice_message(event, route_id))
                        yield {self.chatbot: history}
                    elif isinstance(event, TextChunk):
                        if answer is None:
                            answer = self._start_answer(history, route_msg, turn, route_id)
                        answer["content"] = escape_html(turn.text)  # the expert's text, shown escaped
                        yield {self.chatbot: history}
                    elif isinstance(event, TurnDone):
                        yield self._finish(turn, history, route_msg, answer, session, prompt, first_index)
            except ENGINE_ERRORS as exc:
                # a request the engine refused before anything ran (empty prompt, too long, bad override,
                # busy...): say so, keep the conversation as it was
                yield self._refused(exc, history, route_msg, first_index)

    def _refused(self, exc: Exception, history: list[dict], route_msg: dict | None, first_index: int) -> dict:
        """The one place the chat maps an engine error: a toast, and a line in the chat and the stats."""
        gr.Warning(user_message(exc))
        said = escape_html(f"⚠️ {user_message(exc)}")
        if route_msg is None:
            history = history[: first_index - 1]
        else:
            history.append({"role": "assistant", "content": said})
        return {self.chatbot: history, self.turn_md: said}

    def _start_answer(self, history: list[dict], route_msg: dict | None, turn: Transcript, route_id: str) -> dict:
        if route_msg is not None:
            if not turn.swaps and turn.connection is None and turn.served_by is not None:
                history.append(resident_message(turn.served_by, self.coe.tiers.exec_tier, route_id))
            route_msg["metadata"]["status"] = "done"
        answer = {"role": "assistant", "content": ""}
        history.append(answer)
        return answer

    def _finish(
        self,
        turn: Transcript,
        history: list[dict],
        route_msg: dict | None,
        answer: dict | None,
        session: ChatSession,
        prompt: str,
        first_index: int,
    ) -> dict:
        stats = turn.stats
        if route_msg is not None:
            route_msg["metadata"]["status"] = "done"
            if stats.timeline:
                route_msg["metadata"]["duration"] = round(max(end for _, _, end in stats.timeline[:2]), 2)
        if answer is None:
            answer = {"role": "assistant", "content": ""}
            history.append(answer)
        if stats.status == "cancelled":
            answer["content"] += "\n\n_(stopped)_" if answer["content"] else "_(stopped before the first token)_"
        elif stats.status == "error":
            why = user_message(turn.error) if turn.error is not None else stats.error
            answer["content"] += escape_html(f"\n\n⚠️ {stats.expert} failed: {why}. Other experts keep serving.")
        elif not answer["content"].strip():
            answer["content"] = "_(the expert returned no text)_"
        session.turns.append(
            TurnRef(
                stats.interaction_id,
                first_index,
                len(history) - 1,
                prompt,
                turn.decision.category if turn.decision else "?",
            )
        )
        if stats.interaction_id is None:
            gr.Warning("This turn could not be logged yet, so it cannot take feedback.")
        timeline = plots.timeline_figure(
            stats.timeline,
            [s.to_dict() for s in turn.swaps],
            connection=turn.connection.to_dict() if turn.connection else None,
            tokens_per_s=stats.tokens_per_s,
            new_tokens=stats.new_tokens,
        )
        choices = turn_choices(session)
        return {
            self.chatbot: history,
            self.timeline_plot: timeline,
            self.turn_md: stats_line(stats),
            self.correct_turn: gr.update(choices=choices, value=choices[0][1] if choices else None),
            self.session: session,
        }

    # -- feedback --------------------------------------------------------------------------------------
    def _store_feedback(
        self, session: ChatSession, unlocked: bool, interaction_id: int, kind: str, corrected: str | None = None
    ) -> bool:
        """Only on this session's own turns (checked again in the store), rate-limited per session; a visitor's
        like or correction waits for an admin's review before it trains the router, an admin's counts."""
        try:
            self.coe.feedback(
                interaction_id, kind, corrected, owner=session.session_id, trusted=self.ctx.gate.sees_private(unlocked)
            )
        except ENGINE_ERRORS as exc:
            gr.Warning(f"Feedback not stored: {user_message(exc)}")
            return False
        return True

    def on_feedback(self, session: ChatSession | None, unlocked: bool, data: gr.LikeData) -> tuple[Any, Any]:
        index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
        turn = session.turn_at(int(index)) if session else None
        if turn is None or turn.interaction_id is None:
            gr.Warning("That message is not a logged answer, so feedback cannot be stored for it.")
            return gr.update(), gr.update()
        liked = data.liked
        if liked is True:
            kind, text = "like", "👍 stored"
        elif liked is False:
            kind, text = "dislike", "👎 stored"
        elif liked == FEEDBACK_WRONG:
            kind, text = "wrong_category", "Marked as wrong category: pick the right one below"
        else:  # un-voting sends an empty value
            kind, text = "retracted", "Feedback retracted"
        if self._store_feedback(session, unlocked, turn.interaction_id, kind):
            gr.Info(f"{text} (turn #{turn.interaction_id}).")
        if kind == "wrong_category":
            return gr.update(choices=turn_choices(session), value=turn.interaction_id), gr.Accordion(open=True)
        return gr.update(), gr.update()

    def on_correction(
        self, session: ChatSession | None, interaction_id: int | None, category: str | None, unlocked: bool = False
    ) -> None:
        if interaction_id is None:
            gr.Warning("Pick the answer to correct first (send a prompt if there is none).")
            return
        if not category:
            gr.Warning("Pick the category the prompt should have had.")
            return
        if session is None or session.by_id(int(interaction_id)) is None:
            gr.Warning("You can only correct answers from this chat.")
            return
        if self._store_feedback(session, unlocked, int(interaction_id), "wrong_category", category):
            when = (
                "It counts at the router's next retrain."
                if self.ctx.gate.sees_private(unlocked)
                else "It counts at the router's next retrain once an admin has accepted it."
            )
            gr.Info(f"Correction stored: turn #{interaction_id} should be {category}. {when}")
