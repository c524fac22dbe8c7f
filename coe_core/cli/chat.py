"""``coe chat``: answer one prompt in the terminal, streaming, with the route and swaps on stderr."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterable
from typing import Any

from coe_core.cli.common import add_command, gb, print_json
from coe_core.config import CoEConfig
from coe_core.errors import error_message
from coe_core.events import Event, Notice, Queued, RemoteConnect, RouteDecision, SwapEvent, TextChunk, Transcript


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "chat", cmd_chat, json_output=True, help="answer one prompt (streams to the terminal)")
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--expert", help="force this expert")
    p.add_argument("--category", help="force this category")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--no-router", action="store_true", help="skip the router (default expert or --expert)")


def cmd_chat(args: argparse.Namespace, config: CoEConfig) -> int:
    from coe_core.engine import CoE

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    overrides = {"expert": args.expert, "category": args.category}
    coe = CoE(config, routing=None if args.no_router else "auto")
    cancel = threading.Event()
    try:
        out = collect_turn(
            coe.chat(
                prompt,
                overrides,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                cancel=cancel,
                client="cli",
            ),
            echo=not args.json,
        )
    except KeyboardInterrupt:
        cancel.set()
        print("\n[cancelled]", file=sys.stderr)
        return 130
    finally:
        coe.close()
    if args.json:
        print_json(out)
    else:
        print()
        ttft = f"{out['ttft_s']:.2f}s" if out.get("ttft_s") is not None else "-"
        print(
            f"[done] {out.get('status')} expert={out.get('expert')} ttft={ttft} "
            f"tokens={out.get('new_tokens')} ({out.get('tokens_per_s', 0):.1f} tok/s) "
            f"interaction={out.get('interaction_id')}",
            file=sys.stderr,
        )
    if out.get("status") == "error":
        print(f"error: {out.get('error')}", file=sys.stderr)
        return 1
    return 0


def collect_turn(events: Iterable[Event], *, echo: bool) -> dict[str, Any]:
    """The chat command's one event loop: the engine's ``Transcript`` gathers the turn; this turns it into the
    ``coe chat --json`` shape and, with ``echo``, streams the answer to stdout and the route, queue, swaps,
    connection and notices to stderr as they come."""
    turn = Transcript()
    for event in turn.follow(events):
        if not echo:
            continue
        if isinstance(event, RouteDecision):
            print(f"[route] {event.explanation or event.reason}", file=sys.stderr)
        elif isinstance(event, SwapEvent):
            print(
                f"[swap] {event.expert} {event.src}->{event.dst} {gb(event.bytes)} in "
                f"{event.seconds:.3f}s ({event.gbps:.1f} GB/s)",
                file=sys.stderr,
            )
        elif isinstance(event, RemoteConnect):
            print(
                f"[connect] {event.expert} first byte {event.first_byte_s:.2f}s (connect {event.connect_s:.2f}s, "
                f"headers {event.headers_s:.2f}s, {event.attempts} attempt(s))",
                file=sys.stderr,
            )
        elif isinstance(event, Queued):
            print(f"[queue] {event.message}", file=sys.stderr)
        elif isinstance(event, Notice):
            print(f"[note] {event.message}", file=sys.stderr)
        elif isinstance(event, TextChunk):
            print(event.text, end="", flush=True)
    out: dict[str, Any] = {
        "response": turn.text,
        "expert": turn.served_by,
        "swaps": [swap.to_dict() for swap in turn.swaps],
        "connection": turn.connection.to_dict() if turn.connection else None,
        "notices": [notice.message for notice in turn.notices],
    }
    if turn.decision is not None:
        decision = turn.decision.to_dict()
        out["route"] = {
            k: decision[k]
            for k in ("category", "probabilities", "confidence", "fallback", "expert", "reason", "latency_ms")
        }
    if turn.stats is not None:
        s = turn.stats
        out.update(
            response=s.response,
            status=s.status,
            error=error_message(turn.error) if turn.error is not None else s.error,
            ttft_s=s.ttft_s,
            total_s=s.total_s,
            prompt_tokens=s.prompt_tokens,
            new_tokens=s.new_tokens,
            tokens_per_s=s.tokens_per_s,
            truncated=s.truncated,
            interaction_id=s.interaction_id,
            queue_s=round(s.queue_s, 3),
        )
    return out
