"""A Hugging Face Space rehearsal on this machine: the README front matter, then the app started the way a Space
starts it, every door probed on its one port, then a restart with the same data dir.

Run through ``scripts/spaces_rehearsal.sh`` (which can first build a clean virtual environment from
requirements.txt alone, as the Space builder does). Prints one ``[rehearsal]`` line per check and a JSON summary
(``--json FILE``); exits 1 on the first failed check. What it cannot rehearse here: the Space's build image,
its proxy, ZeroGPU, storage buckets, network access to the Hub (the app runs with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: the environment a Space sets for a Gradio app (the runtime's variables; Spaces docs, "Spaces Overview" and
#: "Gradio Spaces"): SYSTEM and SPACE_ID identify it, Gradio listens on 0.0.0.0:7860 behind the proxy
SPACE_ENV = {
    "SYSTEM": "spaces",
    "SPACE_ID": "rehearsal/coe-playground",
    "SPACE_AUTHOR_NAME": "rehearsal",
    "SPACE_REPO_NAME": "coe-playground",
    "SPACE_HOST": "rehearsal-coe-playground.hf.space",
    "GRADIO_SERVER_NAME": "0.0.0.0",
    "GRADIO_SERVER_PORT": "7860",
    "PYTHONUNBUFFERED": "1",
}


class Failed(Exception):
    pass


def say(message: str) -> None:
    print(f"[rehearsal] {message}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)
    say(f"ok: {message}")


# -- front matter ---------------------------------------------------------------------------------------------
def hub_repo_ids(profile: str = "hub") -> list[str]:
    from coe_core.config import load_config

    config = load_config(REPO / "spaces.yaml", env=False, profile=profile)
    return [e.source.removeprefix("hf:").split("@")[0] for e in config.experts.values() if e.source.startswith("hf:")]


def check_front_matter(readme: Path) -> dict:
    """The README's YAML block, parsed by huggingface_hub's card parser, against what is installed here."""
    import gradio
    from huggingface_hub import SpaceCard

    data = SpaceCard.load(readme).data.to_dict()
    check(data.get("sdk") == "gradio", "front matter: sdk is gradio")
    check(
        str(data.get("sdk_version")) == gradio.__version__,
        f"front matter: sdk_version {data.get('sdk_version')} is the installed gradio {gradio.__version__}",
    )
    python = str(data.get("python_version", ""))
    check(bool(re.fullmatch(r"3\.\d+(\.\d+)?", python)), f"front matter: python_version {python!r} is set")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not running.startswith(python) and not python.startswith(running):
        say(f"note: the Space will run Python {python}, this rehearsal runs {running}")
    check((REPO / str(data.get("app_file", ""))).is_file(), f"front matter: app_file {data.get('app_file')} exists")
    check(len(str(data.get("short_description", ""))) <= 60, "front matter: short_description fits 60 characters")
    hub = hub_repo_ids()
    preload = [str(p).split()[0] for p in data.get("preload_from_hub") or []]
    check(sorted(preload) == sorted(hub), f"front matter: preload_from_hub = the hub profile's {len(hub)} experts")
    models = set(data.get("models") or [])
    check(set(hub) <= models, "front matter: models lists every hub expert")
    return data


# -- the app on one port ----------------------------------------------------------------------------------------
def http(method: str, url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, bytes, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", "Accept": "*/*"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


class App:
    def __init__(self, python: str, data_dir: Path, port: int, log: Path) -> None:
        env = {
            **os.environ,
            **SPACE_ENV,
            "GRADIO_SERVER_PORT": str(port),
            "COE_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        for var in (
            "COE_CONFIG",
            "COE_PROFILE",
            "COE_DATABASE_URL",
            "COE_API_KEY",
            "COE_ADMIN_TOKEN",
            "GRADIO_SSR_MODE",
            "GRADIO_MCP_SERVER",
            "SPACES_ZERO_GPU",
        ):
            env.pop(var, None)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.start = time.perf_counter()
        # a Space runs the app_file as a script from the repository root
        self.proc = subprocess.Popen(
            [python, "app/__main__.py"],
            cwd=REPO,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"the app exited with {self.proc.returncode}; its output: {self.log}\n{self.tail()}")
            try:
                if http("GET", self.url + "/healthz", timeout=5)[0] == 200:
                    return time.perf_counter() - self.start
            except OSError:
                pass
            time.sleep(0.5)
        raise Failed(f"the app did not answer /healthz within {timeout:.0f} s; its output: {self.log}\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # what a Space does on restart: a signal, then a kill
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def mcp_tools(url: str) -> dict[str, str]:
    status, body, _ = http("GET", url + "/gradio_api/mcp/schema", timeout=30)
    check(status == 200, "MCP: /gradio_api/mcp/schema answers")
    schema = json.loads(body)
    tools = schema if isinstance(schema, list) else schema.get("tools", [])
    # on a Space, Gradio prefixes each tool with the Space's name (coe_playground_route)
    return {short_name(t["name"]): t.get("description") or "" for t in tools}


def short_name(tool: str) -> str:
    for name in ("route", "chat", "feedback"):
        if tool == name or tool.endswith("_" + name):
            return name
    return tool


def mcp_list_tools(url: str) -> list[str]:
    """An MCP client's first two requests over streamable HTTP: initialize, then tools/list."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}

    def post(payload: dict, session: str | None) -> tuple[dict | None, str | None]:
        req = urllib.request.Request(
            url + "/gradio_api/mcp/",
            data=json.dumps(payload).encode(),
            method="POST",
            headers={**headers, **({"mcp-session-id": session} if session else {})},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            session = resp.headers.get("mcp-session-id") or session
            text = resp.read().decode()
        for line in text.splitlines():  # SSE framing or plain JSON
            line = line.removeprefix("data:").strip()
            if line.startswith("{"):
                return json.loads(line), session
        return None, session

    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "coe-rehearsal", "version": "1"},
        },
    }
    _, session = post(init, None)
    post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    listed, _ = post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    return [short_name(t["name"]) for t in (listed or {}).get("result", {}).get("tools", [])]


def probe(url: str, chat_tokens: int) -> dict:
    out: dict = {}
    status, body, _ = http("GET", url + "/", timeout=60)
    check(status == 200 and b"gradio" in body.lower(), "playground: / serves the Gradio page")
    status, body, _ = http("GET", url + "/healthz")
    check(status == 200 and json.loads(body)["status"] == "ok", "probes: /healthz is ok")
    status, body, _ = http("GET", url + "/readyz")
    ready = json.loads(body)
    check(status == 200 and ready["ready"], f"probes: /readyz is ready ({', '.join(ready['available_experts'])})")
    status, body, _ = http("GET", url + "/v1/models")
    check(status == 200 and any(m["id"] == "coe" for m in json.loads(body)["data"]), "API: /v1/models lists coe")
    status, body, _ = http("POST", url + "/v1/route", {"messages": [{"role": "user", "content": "Solve 2x+3=7"}]})
    route = json.loads(body)
    check(
        status == 200 and route.get("category"),
        f"API: /v1/route routes ({route.get('category')} -> {route.get('expert')})",
    )
    out["router_version"] = route.get("router_version")
    tools = mcp_tools(url)
    check({"route", "chat"} <= set(tools), f"MCP: the schema lists route and chat ({', '.join(sorted(tools))})")
    check(all(len(tools[t]) >= 40 for t in ("route", "chat")), "MCP: route and chat carry real descriptions")
    say(f"MCP chat tool: {tools['chat'][:160]}...")
    listed = mcp_list_tools(url)
    check({"route", "chat"} <= set(listed), "MCP: an MCP client's tools/list on /gradio_api/mcp/ sees them")
    from gradio_client import Client

    client = Client(url + "/", verbose=False)
    decision = client.predict("Write a haiku about the sea", api_name="/route")
    check(isinstance(decision, dict) and decision.get("expert"), f"gradio_client: /route -> {decision.get('expert')}")
    body = {
        "model": "coe",
        "max_tokens": chat_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}],
    }
    t0 = time.perf_counter()
    status, raw, _ = http("POST", url + "/v1/chat/completions", body)
    reply = json.loads(raw)
    check(status == 200 and reply["choices"][0]["message"]["content"], "API: /v1/chat/completions answers")
    stats = reply.get("coe", {}).get("stats", {}) or reply.get("coe", {})
    out["chat"] = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "expert": reply.get("coe", {}).get("expert"),
        "new_tokens": reply.get("usage", {}).get("completion_tokens"),
        "tokens_per_s": stats.get("tokens_per_s"),
        "ttft_s": stats.get("ttft_s"),
    }
    say(f"chat turn: {out['chat']}")
    return out


def logged_turns(python: str, data_dir: Path) -> int:
    env = {**os.environ, "COE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [python, "-m", "coe_core.cli", "stats", "--json"], cwd=REPO, env=env, check=True, capture_output=True, text=True
    ).stdout
    return int(json.loads(out)["turns"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the app (a clean venv's)")
    parser.add_argument("--port", type=int, default=7860, help="the Space's port (default 7860)")
    parser.add_argument("--data-dir", help="fresh data dir (default: a new temporary folder, removed at the end)")
    parser.add_argument(
        "--experts-from",
        help="reuse materialised experts from this folder (symlinked as "
        "<data_dir>/experts): skips the first start's conversion, not its router training",
    )
    parser.add_argument(
        "--router-from",
        help="start from a trained router folder (copied as <data_dir>/router): "
        "skips the first start's router training (for the test)",
    )
    parser.add_argument("--chat-tokens", type=int, default=64, help="max_tokens of the timed chat turn")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the first start")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)

    summary: dict = {"python": args.python, "port": args.port}
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="coe-space-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    check(not any(data_dir.iterdir()), f"data dir {data_dir} is fresh")
    if args.experts_from:
        (data_dir / "experts").symlink_to(Path(args.experts_from).resolve(), target_is_directory=True)
    if args.router_from:
        shutil.copytree(args.router_from, data_dir / "router")
    log = data_dir.parent / f"{data_dir.name}.app.log"
    app = None
    try:
        summary["front_matter"] = check_front_matter(REPO / "README.md")
        app = App(args.python, data_dir, args.port, log)
        summary["first_start_s"] = round(app.wait_ready(args.timeout), 1)
        say(
            f"first start: /healthz answered after {summary['first_start_s']} s "
            f"({'experts reused' if args.experts_from else 'experts converted'}, "
            f"{'router copied' if args.router_from else 'router trained'})"
        )
        summary["first"] = probe(app.url, args.chat_tokens)
        app.stop()
        turns = logged_turns(args.python, data_dir)
        check(turns >= 1, f"log: {turns} turn(s) logged in {data_dir}")
        app = App(args.python, data_dir, args.port, log)
        summary["restart_s"] = round(app.wait_ready(args.timeout), 1)
        say(f"restart: /healthz answered after {summary['restart_s']} s")
        summary["second"] = probe(app.url, args.chat_tokens)
        app.stop()
        check(logged_turns(args.python, data_dir) == turns + 1, "restart: the log kept its turns (one more now)")
        check(
            summary["second"]["router_version"] == summary["first"]["router_version"],
            f"restart: the router version is kept ({summary['first']['router_version']})",
        )
        summary["ok"] = True
    except Failed as exc:
        say(f"FAILED: {exc}")
        summary["ok"], summary["failed"] = False, str(exc)
    finally:
        if app is not None:
            app.stop()
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
        if not args.data_dir and summary.get("ok"):
            shutil.rmtree(data_dir, ignore_errors=True)
            log.unlink(missing_ok=True)
    say("all checks passed" if summary.get("ok") else f"app output: {log}")
    return 0 if summary.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
