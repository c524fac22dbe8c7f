"""The ``coe`` command: one module per command group (experts, chat, bench, serve, routing, store), above the
engine; ``main`` builds the parser from them. Shared option handling lives in ``common`` (and ``--config`` /
``--data-dir`` in ``coe_core.config``)."""

from coe_core.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
