"""Start the playground: ``python -m app`` (or ``coe serve``, or ``python app/__main__.py`` on a Space).

Before the server starts, the engine materialises and verifies the experts and loads (on a fresh data
directory: trains) the router, printing its progress; the UI's status line then says what is ready.
Defaults: 127.0.0.1:7860, no share link (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` change the
defaults, as on a Hugging Face Space).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file (a Space's app_file): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coe_core.hf_spaces import on_zero_gpu  # noqa: E402

if on_zero_gpu():  # ZeroGPU: `spaces` patches torch and must come before anything touches CUDA (ZeroGPU docs)
    import spaces  # noqa: E402, F401

from coe_core.config import CoEConfig, add_config_options, with_config  # noqa: E402


def _say(message: str) -> None:
    print(f"[coe] {message}", flush=True)


def serve(config: CoEConfig, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> int:
    """Prepare the engine, build the app, serve until interrupted. Returns an exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from app.ui import build_app, launch_kwargs
    from coe_core.api.server import build_server, cannot_serve
    from coe_core.api.server import serve as serve_both
    from coe_core.engine import CoE
    from coe_core.hf_spaces import space_notes, storage_warnings
    from coe_core.store.hub_export import start_from_env

    start = time.perf_counter()
    _say(f"{config.name}: profile {config.profile}, data directory {config.data_path}")
    for note in space_notes(config.database_url):
        _say(note)
    for warning in storage_warnings(config.data_path, config.database_url):
        _say(f"WARNING: {warning}")
    _say(
        "preparing: materialising and verifying experts, loading the router "
        "(the first start also converts the experts and trains the router: a minute or more)"
    )
    coe = CoE(config, progress=True)
    export = None
    try:
        export = start_from_env(coe.store, config.data_path, say=_say)
        problems = coe.prepare()
        for expert, problem in problems.items():
            _say(f"  {expert}: {'ready' if problem is None else 'UNAVAILABLE: ' + problem}")
        if coe.zero_gpu:
            from coe_core.experts.zero_gpu import announce_gpu_functions

            _say(announce_gpu_functions())
        if all(problems.values()):
            _say("no expert is available: the app starts, but chat will fail until one is (see the reasons above)")
        _say(f"ready in {time.perf_counter() - start:.1f} s; starting the app on http://{host}:{port}")
        demo = build_app(coe, problems=problems)
        try:
            if share:  # a share link tunnels Gradio's own server only: the /v1 API is not served then
                _say("--share: serving the playground alone (the OpenAI-compatible /v1 API needs no --share)")
                demo.launch(server_name=host, server_port=port, share=True, **launch_kwargs())
            else:  # one port: the playground at /, the OpenAI-compatible API at /v1, probes at /healthz /readyz
                _say(f"OpenAI-compatible API on http://{host}:{port}/v1 (model 'coe' or an expert id)")
                _say(
                    f"MCP server on http://{host}:{port}/gradio_api/mcp/ (tools route, chat, feedback)"
                    if launch_kwargs()["mcp_server"]
                    else "no MCP server: the mcp package is missing (pip install 'gradio[mcp]')"
                )
                serve_both(build_server(coe, demo, **launch_kwargs()), host=host, port=port)
        except OSError as exc:
            return cannot_serve(host, port, exc)
    except KeyboardInterrupt:
        pass
    finally:
        if export is not None:  # commit what the log gained since the last scheduled commit
            with contextlib.suppress(Exception):
                export.trigger().result(timeout=60)
            export.stop()
        coe.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Start the CoE Playground (Gradio).")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="interface to listen on (default 127.0.0.1; 0.0.0.0 to serve your network)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    add_config_options(parser)
    args = parser.parse_args(argv)
    return with_config(args, lambda config: serve(config, host=args.host, port=args.port, share=args.share))


if __name__ == "__main__":
    sys.exit(main())
