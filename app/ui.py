"""The playground as one ``gr.Blocks``: a header with the status line and the admin panel, then one tab per
concern (chat, routing explorer, router, mapping, analytics).

What the app talks to, all reached from the engine it is given (``AppContext``): the engine (``CoE``) for turns,
routing decisions, feedback, the experts and their residency (``chat``, ``route``, ``feedback``,
``experts_info``, ``tiers.snapshot()``); the engine's ``RoutingService`` for what the Router, Mapping and
explorer tabs show and change (versions, threshold, mapping, embeddings); and the engine's store for the
Analytics tab and the review queue. It reaches into no private member of any of them."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.admin import AdminGate
from app.analytics_tab import AnalyticsTab
from app.api import PublicAPI
from app.chat_tab import ChatTab
from app.context import AppContext
from app.explorer_tab import ExplorerTab
from app.mapping_tab import MappingTab
from app.router_tab import RouterTab
from app.theme import CSS, gradio_theme
from coe_core.engine import CoE
from coe_core.routing.service import RoutingService


def status_line(coe: CoE, routing: RoutingService, problems: dict[str, str | None] | None = None) -> str:
    """One line: which experts are ready (or why not), where they execute, which router routes."""
    info = coe.experts_info()
    ready = [e["id"] for e in info["experts"] if e["available"] and e["bytes"]]
    parts = [
        f"**{len(ready)}/{len(info['experts'])} experts ready** ({', '.join(ready) or 'none'})",
        (
            "executes on **ZeroGPU** (a GPU slice attached per answer)"
            if coe.zero_gpu
            else f"executes on **{info['exec_tier']}**"
        ),
        f"profile **{info['profile']}**",
    ]
    try:
        version = routing.active_version()["id"]
        parts.append(f"router `{version}`" if version else "no router: default expert serves")
    except (ValueError, OSError, RuntimeError) as exc:
        parts.append(f"⚠️ no router ({exc})")
    for expert, problem in (problems or {}).items():
        if problem:
            parts.append(f"⚠️ {expert}: {problem}")
    notes: dict[str, list[str]] = {}  # e.g. GGUF experts on transformers because llama-cpp-python is missing
    for e in info["experts"]:
        if e.get("runtime_note"):
            notes.setdefault(e["runtime_note"], []).append(e["id"])
    parts += [f"⚠️ {', '.join(ids)}: {note}" for note, ids in notes.items()]
    return " · ".join(parts)


def build_app(coe: CoE, *, gate: AdminGate | None = None, problems: dict[str, str | None] | None = None) -> gr.Blocks:
    ctx = AppContext(coe=coe, gate=gate or AdminGate())
    with gr.Blocks(title=coe.config.name) as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(
                f"# {coe.config.name}\nA Composition of Experts: a router picks a category, the mapping "
                "picks one expert, the memory tiers swap it in, and it streams the answer.",
                elem_id="coe-header",
            )
        status = gr.Markdown(status_line(coe, ctx.routing, problems), elem_id="coe-status")
        ctx.admin_state = gr.State(False)
        with gr.Accordion("Admin", open=False):
            admin_md = gr.Markdown(ctx.gate.status_text(False))
            with gr.Row(equal_height=True, visible=not ctx.gate.open_mode):
                token = gr.Textbox(type="password", label="Admin token", scale=3)
                unlock = gr.Button("Unlock", scale=1)
        chat, explorer = ChatTab(ctx), ExplorerTab(ctx)
        router, mapping, analytics = RouterTab(ctx), MappingTab(ctx), AnalyticsTab(ctx)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat.build()
            with gr.Tab("Routing explorer", id="explorer"):
                explorer.build()
            with gr.Tab("Router", id="router") as router_tab:
                router.build()
            with gr.Tab("Mapping", id="mapping") as mapping_tab:
                mapping.build()
            with gr.Tab("Analytics", id="analytics") as analytics_tab:
                analytics.build()
        PublicAPI(ctx).register()  # first, so the public endpoints own their names (/route, /chat, /feedback)
        chat.wire(demo)
        explorer.wire(demo)
        router.wire(demo, router_tab)
        mapping.wire(demo, mapping_tab)
        analytics.wire(demo, analytics_tab)

        unlock_args: dict[str, Any] = {"api_visibility": "private"}
        unlock.click(ctx.gate.unlock, token, [ctx.admin_state, admin_md], **unlock_args).then(
            lambda: "", None, token, **unlock_args
        )
        token.submit(ctx.gate.unlock, token, [ctx.admin_state, admin_md], **unlock_args).then(
            lambda: "", None, token, **unlock_args
        )
        demo.load(lambda: status_line(coe, ctx.routing, problems), None, status, **unlock_args)
    # a bounded queue: one more job than this is refused ("queue is full"), not held; turns themselves then wait
    # in the engine's one queue (serve.*), like /v1 turns
    demo.queue(default_concurrency_limit=4, max_size=queue_size(coe))
    return demo


def queue_size(coe: CoE) -> int:
    """Jobs the playground's queue holds (running and waiting, every visitor's events together)."""
    serve = coe.config.serve
    return max(16, serve.max_running + serve.max_queue)


def launch_kwargs() -> dict[str, Any]:
    """What Gradio 6 takes at launch() (and mount_gradio_app) rather than Blocks(): the theme and CSS, and two
    modes pinned rather than left to the environment:

    - ``ssr_mode=False``: a Space sets ``GRADIO_SSR_MODE=true`` for Gradio apps, and server-side rendering puts a
      Node server in front of the page; mounted on our FastAPI app that is a second server between the proxy and
      the routes, which must stay ours (``/v1``, ``/healthz``, ``/readyz``). Client-side rendering serves the
      same page from the one uvicorn, and needs no Node 24 in the image.
    - ``mcp_server``: on whenever the ``mcp`` package is installed (``gradio[mcp]``; requirements.txt has it),
      so agents reach ``/route`` and ``/chat`` as MCP tools at ``/gradio_api/mcp/`` on the same port.
    """
    return {"theme": gradio_theme(), "css": CSS, "ssr_mode": False, "mcp_server": mcp_available()}


def mcp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mcp") is not None
