"""The scheduled export of the log into a Hub dataset, up to the commits it would make (no network here: the
HfApi's two network calls are replaced by recorders; everything else is huggingface_hub's CommitScheduler)."""

from __future__ import annotations

import json
import time

import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl

from coe_core.engine import CoE
from coe_core.store.hub_export import LogExport, hub_scheduler


class RecordingApi(HfApi):
    def __init__(self) -> None:
        super().__init__(token="hf_offline")
        self.repos: list[dict] = []
        self.commits: list[dict[str, list[dict]]] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with op.as_file() as f:
                files[op.path_in_repo] = f.read().decode()
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return None


@pytest.fixture
def coe(tiny_config):
    engine = CoE(tiny_config(), routing=None, store="auto", gpu=False, progress=False)
    yield engine
    engine.close()


def turn(engine, prompt: str) -> int:
    *_, done = engine.chat(prompt, temperature=0, max_new_tokens=4)
    return done.stats.interaction_id


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_the_scheduler_commits_new_turns_and_late_feedback_once(coe, tmp_path):
    first, second = turn(coe, "write a python function"), turn(coe, "what is the capital of france")
    api = RecordingApi()
    scheduler = hub_scheduler(coe.store, tmp_path / "hub-export", "me/coe-log", every=24 * 60, hf_api=api)
    try:
        deadline = time.monotonic() + 30
        while not api.commits and time.monotonic() < deadline:  # the scheduler's first run starts at once
            time.sleep(0.1)
        assert api.repos == [{"repo_id": "me/coe-log", "private": True, "repo_type": "dataset", "exist_ok": True}]
        commit = api.commits[0]
        assert commit["repo_id"] == "me/coe-log" and commit["repo_type"] == "dataset"
        (turns_path,) = [p for p in commit["files"] if p.startswith("turns/")]
        assert set(commit["files"]) == {"README.md", turns_path}  # the watermark file stays local
        assert "config_name: turns" in commit["files"]["README.md"]
        exported = rows(commit["files"][turns_path])
        assert [r["id"] for r in exported] == [first, second]
        assert exported[0]["prompt"] == "write a python function" and exported[0]["response"]
        assert {"category", "expert", "swaps", "ttft_s", "tokens_per_s", "feedback"} <= set(exported[0])

        coe.feedback(first, "dislike")  # feedback on a turn already exported ...
        third = turn(coe, "solve 2x + 3 = 7")
        coe.feedback(third, "like")  # ... and on one exported with it in its row
        scheduler.trigger().result()
        commit = api.commits[1]
        assert "README.md" not in commit["files"] and not any(p == turns_path for p in commit["files"])
        new_turns = [rows(t) for p, t in commit["files"].items() if p.startswith("turns/")]
        late = [rows(t) for p, t in commit["files"].items() if p.startswith("feedback/")]
        assert [[r["id"] for r in new_turns[0]]] == [[third]] and new_turns[0][0]["feedback"]["kind"] == "like"
        assert [(f["interaction_id"], f["kind"]) for f in late[0]] == [(first, "dislike")]

        scheduler.trigger().result()
        assert len(api.commits) == 2  # nothing new: no empty commit
    finally:
        scheduler.stop()


def test_a_restart_with_the_same_folder_does_not_export_twice(coe, tmp_path):
    turn(coe, "write a python function")
    assert LogExport(coe.store, tmp_path).run().turns == 1
    again = LogExport(coe.store, tmp_path)
    assert again.run().turns == 0
    turn(coe, "once upon a time")
    done = again.run()
    assert done.turns == 1 and len(done.files) == 1
    exported = [rows(p.read_text()) for p in sorted((tmp_path / "turns").glob("*.jsonl"))]
    assert [len(r) for r in exported] == [1, 1] and exported[0][0]["id"] != exported[1][0]["id"]
