"""`coe export`, `coe stats`, `coe feedback` and `coe review`: the interaction log from the command line.

``register(subparsers)`` adds the commands; each sets ``func`` to a function ``(args, config) -> exit
code``. Errors print one line to stderr and return 2.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from coe_core.cli.common import add_command, print_json
from coe_core.store.errors import StoreError
from coe_core.store.export import FORMATS
from coe_core.store.models import FEEDBACK_KINDS
from coe_core.store.store import Store

if TYPE_CHECKING:
    from coe_core.config import CoEConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "export",
        cmd_export,
        help="export the interaction log: one line per turn with its latest feedback",
        description="Export every logged turn (route, expert, swaps, timings, answer, latest feedback).",
    )
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="jsonl (default) or csv")
    p.add_argument(
        "--since",
        metavar="DATE",
        help="only turns started at or after this UTC date or time (2025-01-31, 2025-01-31T12:00)",
    )
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")

    add_command(
        subparsers,
        "stats",
        cmd_stats,
        json_output=True,
        help="summary of the interaction log (traffic, fallback, TTFT, swaps)",
    )

    p = add_command(
        subparsers,
        "feedback",
        cmd_feedback,
        help="record feedback on a logged turn",
        description="Record feedback on a turn; the latest feedback of a turn counts, 'retracted' clears it.",
    )
    p.add_argument("id", type=int, help="interaction id (shown after each turn, and in coe export)")
    p.add_argument("kind", metavar="KIND", help=f"one of {', '.join(FEEDBACK_KINDS)}")
    p.add_argument("--category", help="with wrong_category: the category the prompt should have gone to")
    p.add_argument("--comment", help="free text")

    p = add_command(
        subparsers,
        "review",
        cmd_review,
        help="list, accept or reject visitors' feedback waiting for review",
        description="Visitors' likes and corrections train the router only once accepted (the app's Router tab "
        "does the same with the admin token). Without options: list what waits.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--accept", metavar="ID", type=int, nargs="+", help="feedback ids to accept as labels")
    which.add_argument("--reject", metavar="ID", type=int, nargs="+", help="feedback ids to reject")


def _fail(command: str, message: str) -> int:
    print(f"coe {command}: error: {message}", file=sys.stderr)
    return 2


def parse_since(text: str) -> datetime:
    """An ISO date or date-time; without a timezone it is UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        hint = "write e.g. 2025-01-31 or 2025-01-31T12:00"
        raise StoreError(f"--since {text!r} is not a date: {hint}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def cmd_export(args: argparse.Namespace, config: CoEConfig) -> int:
    try:
        since = parse_since(args.since) if args.since else None
        with Store.from_config(config) as store:
            if args.out:
                with open(args.out, "w", encoding="utf-8", newline="") as out:
                    count = store.export(args.format, out, since)
                print(f"exported {count} turn(s) to {args.out}", file=sys.stderr)
            else:
                count = store.export(args.format, sys.stdout, since)
    except StoreError as exc:
        return _fail("export", str(exc))
    except OSError as exc:
        return _fail("export", f"cannot write {args.out}: {exc.strerror or exc}")
    return 0


def format_stats(stats: dict[str, Any]) -> str:
    def dist(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"

    def secs(value: float | None) -> str:
        return f"{value:.3f} s" if value is not None else "-"

    fb = stats["feedback"]
    lines = [
        f"turns:        {stats['turns']}  ({dist(stats.get('by_status', {}))})",
        f"by category:  {dist(stats['by_category'])}",
        f"by expert:    {dist(stats['by_expert'])}",
        f"fallback:     {stats['fallback_rate']:.1%}",
        f"TTFT:         p50 {secs(stats['ttft_p50_s'])}, p95 {secs(stats['ttft_p95_s'])}",
        f"feedback:     like {fb['like']}, dislike {fb['dislike']}, wrong_category {fb['wrong_category']} "
        f"(corrected {fb.get('corrected', 0)}); {stats.get('feedback_pending_review', 0)} waiting for review",
    ]
    swaps = stats["swaps"]
    lines.append(
        "swaps:        "
        + ("; ".join(f"{pair} {s['count']}x mean {s['mean_s']:.3f} s" for pair, s in swaps.items()) or "-")
    )
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace, config: CoEConfig) -> int:
    try:
        with Store.from_config(config) as store:
            stats = store.stats()
    except StoreError as exc:
        return _fail("stats", str(exc))
    if args.json:
        print_json(stats)
    else:
        print(format_stats(stats))
    return 0


def cmd_feedback(args: argparse.Namespace, config: CoEConfig) -> int:
    try:
        with Store.from_config(config) as store:
            feedback_id = store.add_feedback(
                args.id, args.kind, args.category, args.comment, categories=list(config.all_categories)
            )
    except StoreError as exc:
        return _fail("feedback", str(exc))
    what = f"{args.kind} -> {args.category}" if args.category else args.kind
    print(f"feedback {feedback_id} recorded on interaction {args.id}: {what}")
    return 0


def cmd_review(args: argparse.Namespace, config: CoEConfig) -> int:
    try:
        with Store.from_config(config) as store:
            if args.accept or args.reject:
                n = store.review_feedback(args.accept or args.reject, accept=bool(args.accept))
                print(f"{n} feedback {'accepted' if args.accept else 'rejected'}")
                return 0
            pending = store.pending_feedback(1000)
    except StoreError as exc:
        return _fail("review", str(exc))
    for p in pending:
        label = f"{p['kind']} -> {p['corrected_category']}" if p["corrected_category"] else p["kind"]
        prompt = " ".join((p["prompt"] or "").split())[:80]
        print(f"{p['id']}\tturn {p['interaction_id']}\t{p['category']}\t{label}\t{prompt}")
    print(f"{len(pending)} waiting; accept with: coe review --accept ID ...", file=sys.stderr)
    return 0
