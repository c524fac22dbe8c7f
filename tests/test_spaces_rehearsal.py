"""The Spaces rehearsal (scripts/spaces_rehearsal.sh) end to end, with the Python installed here: the README
front matter, the app started as a Space starts it, every door on its one port (playground, /v1, /healthz,
/readyz, the MCP server, gradio_client), and a restart that keeps the log and the router version.

Skipped when a prerequisite is missing (the mcp package, the packaged experts). The clean-venv build from
requirements.txt (--clean-venv) is not run here: it compiles llama-cpp-python (minutes)."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess

import pytest

from tests.conftest import REPO, SHARED_EXPERTS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_space_rehearsal_passes(tmp_path, request):
    if importlib.util.find_spec("mcp") is None:
        pytest.skip("the mcp package is missing: pip install -e '.[spaces]'")
    if not any(SHARED_EXPERTS.glob("*/*/manifest.json")):
        pytest.skip(f"no materialised experts in {SHARED_EXPERTS} (run any slow test first)")
    seed_router_dir = request.getfixturevalue("seed_router_dir")  # only once the skips are decided
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "spaces_rehearsal.sh"),
            "--port",
            str(_free_port()),
            "--data-dir",
            str(tmp_path / "data"),
            "--experts-from",
            str(SHARED_EXPERTS),
            "--router-from",
            str(seed_router_dir),
            "--chat-tokens",
            "8",
            "--timeout",
            "300",
            "--json",
            str(summary),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads(summary.read_text())
    assert proc.returncode == 0 and result["ok"], proc.stdout[-3000:] + proc.stderr[-2000:]
    assert result["first"]["router_version"] == result["second"]["router_version"]
    assert result["first"]["chat"]["new_tokens"] >= 1
    log = (tmp_path / "data.app.log").read_text()
    assert "on Hugging Face Space rehearsal/coe-playground" in log  # the start-up note a Space prints
    assert "COE_HUB_EXPORT_REPO" in log and "MCP server on http://0.0.0.0:" in log
