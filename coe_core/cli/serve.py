"""``coe serve``: the playground and the OpenAI-compatible API on one port, or (``--no-ui``) the API alone."""

from __future__ import annotations

import argparse

from coe_core.cli.common import add_command
from coe_core.config import CoEConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "serve",
        cmd_serve,
        help="start the playground and the OpenAI-compatible /v1 API on one port (same as python -m app)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also a public gradio.live link (playground only)")
    p.add_argument("--no-ui", action="store_true", help="serve the /v1 API and probes only (python -m coe_core.api)")


def cmd_serve(args: argparse.Namespace, config: CoEConfig) -> int:
    if args.no_ui:
        from coe_core.api.server import serve_api

        return serve_api(config, args.host, args.port)
    # The command line sits above the engine and beside the app (DESIGN.md's floors), so it may use the app;
    # it imports it here, in the one command that serves it, and nowhere at import time: `coe chat` and the
    # other commands then never load Gradio (seconds), and importing coe_core never pulls in the UI.
    from app.__main__ import serve

    return serve(config, host=args.host, port=args.port, share=args.share)
