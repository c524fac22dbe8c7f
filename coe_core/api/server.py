"""One FastAPI app on one port: the OpenAI-compatible API (``/v1``), health probes and the Gradio playground.

``build_server(coe, blocks)`` mounts the Gradio Blocks at ``/`` after the API routes, so ``/v1/...``,
``/healthz`` and ``/readyz`` are answered by the API and everything else by the playground.
``COE_API_KEY`` (when set) guards every ``/v1`` route; the playground keeps its own admin gate.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from coe_core.api import downloads
from coe_core.api.errors import error_body, install_error_handlers
from coe_core.api.guards import ApiGuard
from coe_core.api.openai_api import build_v1_routes
from coe_core.config import CoEConfig
from coe_core.engine import CoE


def build_server(coe: CoE, blocks: Any | None = None, *, api_key: str | None = None, **mount_kwargs: Any) -> FastAPI:
    """The API for ``coe`` and, when ``blocks`` is given, the Gradio app at ``/`` (``mount_kwargs`` go to
    ``gr.mount_gradio_app``, e.g. theme and css). ``api_key`` defaults to ``$COE_API_KEY``; empty: no key."""
    api_key = (api_key if api_key is not None else os.environ.get("COE_API_KEY")) or None
    app = FastAPI(title=f"{coe.config.name} API", docs_url="/v1/docs", openapi_url="/v1/openapi.json", redoc_url=None)
    app.state.coe = coe
    install_error_handlers(app)
    app.add_middleware(ApiGuard, api_key=api_key, max_body_bytes=coe.config.api.max_body_bytes)
    # who the API's callers are, for the log and feedback: the key's holders (trusted), or anonymous callers
    # of an open API, whose likes and corrections wait for an admin's review
    identity = "api:key" if api_key else "api:anonymous"
    app.include_router(build_v1_routes(coe, identity=identity, trusted=api_key is not None))

    @app.get(downloads.PREFIX + "{token}", include_in_schema=False)
    async def one_time_download(token: str) -> Any:
        """An admin's export, once: the link is spent and the file deleted when it has been sent."""
        path = downloads.DOWNLOADS.take(token)
        if path is None:
            return JSONResponse(
                error_body(404, "this download link is unknown, used or expired: export again", code="not_found"),
                status_code=404,
            )
        return FileResponse(path, filename=path.name, background=BackgroundTask(path.unlink, missing_ok=True))

    downloads.DOWNLOADS.served = True

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: the router is loaded and at least one expert is available (503 otherwise, with why)."""
        r = coe.readiness()
        body = {
            "ready": r.ready,
            "router": r.router_state,
            "available_experts": r.available_experts,
            "unavailable": r.unavailable,
        }
        return JSONResponse(body, status_code=200 if r.ready else 503)

    if blocks is not None:
        import gradio as gr

        app = gr.mount_gradio_app(app, blocks, path="/", **mount_kwargs)
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve until interrupted (uvicorn). Raises OSError when the address cannot be bound (uvicorn alone
    would log it and exit)."""
    import signal
    import socket
    import threading

    import uvicorn

    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it stopped on once it has shut down; SIGTERM's default action would then
        # end the process on the spot, skipping the caller's clean-up (the store's close: the SQLite WAL and
        # SHM files stayed behind). As SystemExit it unwinds through every ``finally``.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()


def serve_api(config: CoEConfig, host: str = "127.0.0.1", port: int = 8000) -> int:
    """The API alone (``python -m coe_core.api``, ``coe serve --no-ui``): prepare the engine, say what is ready,
    serve until interrupted. Returns an exit code (1: the address cannot be bound)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    coe = CoE(config, progress=True)
    try:
        for expert, problem in coe.prepare().items():
            print(f"[coe] {expert}: {'ready' if problem is None else 'UNAVAILABLE: ' + problem}", flush=True)
        print(f"[coe] ready in {time.perf_counter() - start:.1f} s; API on http://{host}:{port}/v1", flush=True)
        serve(build_server(coe), host, port)
    except OSError as exc:
        return cannot_serve(host, port, exc)
    except KeyboardInterrupt:
        pass
    finally:
        coe.close()
    return 0


def cannot_serve(host: str, port: int, exc: OSError) -> int:
    """An address that cannot be bound: one line that says what to do, and exit code 1."""
    print(f"error: cannot serve on {host}:{port}: {exc}. Pick another port with --port.", file=sys.stderr)
    return 1


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)
