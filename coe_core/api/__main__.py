"""Serve the OpenAI-compatible API alone, without the playground: ``python -m coe_core.api`` (or
``coe serve --no-ui``). Another CoE can use this one as a remote expert (``source: openai:http://HOST:PORT/v1``).
"""

from __future__ import annotations

import argparse
import sys

from coe_core.api.server import serve_api
from coe_core.config import add_config_options, with_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coe_core.api", description="Serve the CoE's /v1 API only.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    add_config_options(parser)
    args = parser.parse_args(argv)
    return with_config(args, lambda config: serve_api(config, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
