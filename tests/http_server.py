"""Serve an ASGI app on a free 127.0.0.1 port for a test: uvicorn in a thread, or a subprocess."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` at ``url`` (http://127.0.0.1:PORT) until the block ends."""

    def __init__(self, app, *, startup_timeout: float = 60.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0, path: str = "/readyz") -> None:
    """Poll ``url + path`` until it answers 200 (bounded); fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server process exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url}{path} was not ready within {timeout:g} s")


def start_process(args: list[str], log_path, cwd) -> subprocess.Popen:
    """Start ``python ARGS`` with a clean COE_* environment (offline), its output going to ``log_path``."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("COE_")} | {"HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def smollm2_data_dir(base, repo, shared_experts, router_dir):
    """A spaces.yaml with only the packaged SmolLM2 and a data dir whose disk tier is the shared one and whose
    router is ``router_dir`` (copied): a server process starts in seconds. Returns (config path, data dir)."""
    import shutil

    import yaml

    data = base / "data"
    data.mkdir(parents=True)
    shared_experts.mkdir(parents=True, exist_ok=True)
    (data / "experts").symlink_to(shared_experts, target_is_directory=True)
    shutil.copytree(router_dir, data / "router")
    raw = yaml.safe_load((repo / "spaces.yaml").read_text())
    offline = raw["profiles"]["offline"]
    offline["experts"] = {"smollm2-135m": offline["experts"]["smollm2-135m"]}
    offline["scores"] = str(repo / offline["scores"])
    raw["router"]["seed_data"] = [str(repo / p) for p in raw["router"]["seed_data"]]
    raw["router"]["dev_data"] = [str(repo / p) for p in raw["router"]["dev_data"]]
    raw["profiles"] = {"offline": offline}
    config = base / "spaces.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, data
