"""What the command groups of ``coe`` share, written once: a subcommand with its ``--json`` switch, JSON output,
notes on stderr, sizes. (``--config``/``--data-dir`` live in ``coe_core.config``: ``python -m app`` and
``python -m coe_core.api`` take them too.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    func: Callable[..., int],
    *,
    json_output: bool = False,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand whose handler is ``func(args, config) -> exit code``; ``json_output`` adds ``--json``
    (print the JSON shape other tools read instead of text). ``kwargs`` go to ``add_parser`` (help, ...)."""
    parser = subparsers.add_parser(name, **kwargs)
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON (the shape other tools read)")
    parser.set_defaults(func=func)
    return parser


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def say(message: str) -> None:
    """A progress line or note on stderr (stdout stays the command's output)."""
    print(message, file=sys.stderr, flush=True)


def gb(n: float | None) -> str:
    """Bytes as ``1.23 GB``; ``-`` when unknown."""
    return f"{n / 1e9:.2f} GB" if n else "-"
