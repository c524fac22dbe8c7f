"""Serve the OpenAI-compatible API alone, without the playground: ``python -m coe_core.api`` (or
``coe serve --no-ui``). Another CoE can use this one as a remote expert (``source: openai:http://HOST:PORT/v1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from coe_core.config import load_config
from coe_core.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coe_core.api", description="Serve the CoE's /v1 API only.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", help="path of spaces.yaml (default: ./spaces.yaml or $COE_CONFIG)")
    parser.add_argument("--data-dir", help="data directory (overrides spaces.yaml and $COE_DATA_DIR)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, **({"data_dir": args.data_dir} if args.data_dir else {}))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return serve_api(config, args.host, args.port)


def serve_api(config, host: str, port: int) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from coe_core.api.server import build_server, serve
    from coe_core.engine import CoE

    start = time.perf_counter()
    coe = CoE(config, progress=True)
    try:
        for expert, problem in coe.prepare().items():
            print(f"[coe] {expert}: {'ready' if problem is None else 'UNAVAILABLE: ' + problem}", flush=True)
        print(f"[coe] ready in {time.perf_counter() - start:.1f} s; API on http://{host}:{port}/v1", flush=True)
        serve(build_server(coe), host, port)
    except OSError as exc:
        print(f"error: cannot serve on {host}:{port}: {exc}. Pick another port with --port.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        coe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
