"""A scheduled export of the log into a Hub dataset repo: the way a Space keeps its traffic when its disk is
ephemeral and SQLite must not live on a mounted bucket.

``LogExport`` appends what the log gained since its last run to JSON-lines files in a local folder: turns (the
``coe export`` row shape, with the feedback known then) and feedback given afterwards, each run a new pair of
files, so the folder only grows. ``HubLogScheduler`` is huggingface_hub's ``CommitScheduler`` with
``push_to_hub`` preceded by that export, as the huggingface_hub upload guide ("Scheduled uploads") suggests for
data that is not already files. It commits every ``every`` minutes from a background thread, and once more at
exit. Watermarks (last exported turn and feedback ids) are kept in the folder, so a restart with the same data
dir does not export twice; with an ephemeral disk a restart starts a new series of files and skips nothing,
since the SQLite log starts empty too.

Set ``COE_HUB_EXPORT_REPO=user/coe-log`` (a dataset repo; created private if missing) and a write token in the
Space secret ``HF_TOKEN``; ``COE_HUB_EXPORT_EVERY`` sets the minutes (default 10). Offline, this is tested up
to the commit it would make (tests/test_hub_export.py).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from coe_core.store.models import Feedback, Interaction
from coe_core.store.selects import feedback_dict, interaction_dict, iso, turns_with_feedback

log = logging.getLogger(__name__)

STATE_FILE = ".export-state.json"
CARD = """---
configs:
  - config_name: turns
    data_files: "turns/*.jsonl"
  - config_name: feedback
    data_files: "feedback/*.jsonl"
---
# CoE Playground interaction log

Exported every few minutes by the CoE Playground (`coe_core/store/hub_export.py`). `turns/`: one row per turn
(prompt and response unless the Space runs with `store.log_prompts: false`; route, expert, swaps, timings, the
feedback known at export time). `feedback/`: feedback given after its turn was exported (the latest row of a turn
wins; `retracted` clears it).
"""


@dataclass
class ExportRun:
    turns: int
    feedback: int
    files: list[str]


class LogExport:
    """Writes the log's new turns and feedback under ``folder`` as JSON lines (append-only files)."""

    def __init__(self, store: Any, folder: str | Path) -> None:
        self.store = store
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.series = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        self.runs = 0
        state = self._read_state()
        self.last_turn, self.last_feedback = state.get("last_turn", 0), state.get("last_feedback", 0)
        readme = self.folder / "README.md"
        if not readme.exists():
            readme.write_text(CARD, encoding="utf-8")

    def _read_state(self) -> dict[str, int]:
        try:
            return json.loads((self.folder / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"last_turn": self.last_turn, "last_feedback": self.last_feedback}))
        tmp.replace(self.folder / STATE_FILE)

    def run(self) -> ExportRun:
        """Export what is new since the last run; returns counts and the files written (relative paths)."""
        with self.store.read_session() as session:
            # read first: feedback arriving while we export is picked up by the next run (at worst twice; the
            # latest row of a turn wins), never lost
            newest_feedback = session.execute(select(Feedback.id).order_by(Feedback.id.desc()).limit(1)).scalar()
            turns = [
                interaction_dict(row, conv, fb)
                for row, conv, fb in session.execute(turns_with_feedback().where(Interaction.id > self.last_turn))
            ]
            # feedback on turns exported earlier (feedback on a turn exported now is already in its row)
            late = (
                session.execute(
                    select(Feedback)
                    .where(
                        Feedback.id > self.last_feedback,
                        Feedback.id <= (newest_feedback or 0),
                        Feedback.interaction_id <= self.last_turn,
                    )
                    .order_by(Feedback.id)
                )
                .scalars()
                .all()
            )
            feedback = [
                {
                    **(
                        feedback_dict(fb)
                        or {"id": fb.id, "interaction_id": fb.interaction_id, "created_at": iso(fb.created_at)}
                    ),
                    "kind": fb.kind,
                }
                for fb in late
            ]
        files = []
        self.runs += 1
        for name, rows in (("turns", turns), ("feedback", feedback)):
            if rows:
                path = self.folder / name / f"{self.series}-{self.runs:05d}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                with tmp.open("w", encoding="utf-8") as out:
                    for row in rows:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                tmp.replace(path)  # whole files only: the scheduler never sees a half-written one
                files.append(path.relative_to(self.folder).as_posix())
        if turns:
            self.last_turn = max(t["id"] for t in turns)
        self.last_feedback = max(self.last_feedback, newest_feedback or 0)
        self._write_state()
        return ExportRun(len(turns), len(feedback), files)


def hub_scheduler(
    store: Any,
    folder: str | Path,
    repo_id: str,
    *,
    every: float = 10,
    private: bool = True,
    token: str | None = None,
    hf_api: Any = None,
) -> Any:
    """A started ``CommitScheduler`` that exports the log before each commit (creates the dataset repo)."""
    from huggingface_hub import CommitScheduler

    class HubLogScheduler(CommitScheduler):
        def push_to_hub(self):  # runs in the scheduler's thread, every ``every`` minutes and at exit
            with self.lock:
                done = self.export.run()
            if done.files:
                log.info("hub export: %d turns, %d feedback -> %s", done.turns, done.feedback, self.repo_id)
            return super().push_to_hub()

    HubLogScheduler.export = LogExport(store, folder)
    return HubLogScheduler(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=folder,
        every=every,
        private=private,
        token=token,
        hf_api=hf_api,
        allow_patterns=["README.md", "turns/*.jsonl", "feedback/*.jsonl"],
    )


def start_from_env(store: Any, data_dir: Path, say=print) -> Any | None:
    """``COE_HUB_EXPORT_REPO`` set: start the scheduled export (folder ``<data_dir>/hub-export``)."""
    repo_id = os.environ.get("COE_HUB_EXPORT_REPO", "").strip()
    if not repo_id or store is None:
        return None
    every = float(os.environ.get("COE_HUB_EXPORT_EVERY", "10"))
    try:
        scheduler = hub_scheduler(
            store, data_dir / "hub-export", repo_id, every=every, token=os.environ.get("HF_TOKEN") or None
        )
    except Exception as exc:  # no network, no token, no write access: say so, serve anyway
        say(
            f"WARNING: the log cannot be exported to the Hub dataset {repo_id}: {exc}. The app serves; "
            "the log stays in the data dir only (set HF_TOKEN to a token with write access)."
        )
        return None
    say(f"the log is exported to the Hub dataset {repo_id} every {every:g} min (turns/ and feedback/ JSONL)")
    return scheduler
