"""The ``coe`` parser and its entry point: the shared options, one ``register`` per command group, and the
one place that turns a user's error into a message and an exit code (2: bad input or config, 1: failure)."""

from __future__ import annotations

import argparse
import sys

from coe_core.cli import bench, chat, experts, routing, serve, store
from coe_core.config import add_config_options, with_config
from coe_core.errors import CoEError, ConfigError, InvalidRequest, error_message

#: the command groups, in the order ``coe --help`` lists them
COMMAND_GROUPS = (experts, chat, bench, serve, routing, store)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coe", description="CoE Playground: a Composition of Experts.")
    add_config_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # with_config says what is wrong with the config (ConfigError); the rest is said here
        return with_config(args, lambda config: int(args.func(args, config) or 0))
    # ValueError / KeyError: routing's training-data checks and argument parsers still raise them for bad input
    except (InvalidRequest, ConfigError, ValueError, KeyError, FileNotFoundError) as exc:  # the user can fix it
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    except (CoEError, RuntimeError) as exc:  # unavailable, busy, the store failed
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 1
