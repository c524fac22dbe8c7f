"""TurnLogger: writes turns on a background thread so logging never blocks token streaming.

A write that fails is retried with backoff; if it still fails, the record goes to a JSON-lines spool file
that is replayed on the next start. Each record carries a uid, so a retry or a replay stores a turn once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Self

from coe_core.store.errors import StoreError, TurnNotLoggedError
from coe_core.store.records import TurnRecord
from coe_core.store.store import Store

if TYPE_CHECKING:
    from coe_core.config import CoEConfig

log = logging.getLogger(__name__)

SPOOL_NAME = "unlogged_turns.jsonl"


def default_spool_path(cfg: CoEConfig) -> Path:
    return cfg.data_path / SPOOL_NAME


class TurnLogger:
    """Background writer of TurnRecords into a Store.

    ``submit`` returns at once with a Future of the interaction id; wait on it only after the stream ended.
    The future fails with TurnNotLoggedError when the turn went to the spool file instead of the database.
    """

    def __init__(
        self,
        store: Store,
        spool_path: str | Path,
        *,
        attempts: int = 5,
        backoff_s: float = 0.1,
        replay_on_start: bool = True,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.store = store
        self.spool_path = Path(spool_path)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._queue: queue.Queue[tuple[TurnRecord, Future[int]] | None] = queue.Queue()
        self._spool_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._closed = False
        self._replay_on_start = replay_on_start
        self._thread = threading.Thread(target=self._run, name="coe-turn-logger", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------------
    def submit(self, record: TurnRecord) -> Future[int]:
        record.validate()  # a record no retry could store fails here, in the caller, not later
        future: Future[int] = Future()
        with self._submit_lock:
            if self._closed:
                raise StoreError("the turn logger is closed: create a new TurnLogger to log more turns")
            self._queue.put((record, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Write everything submitted so far, then stop the thread."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def replay_spool(self) -> int:
        """Write the turns of the spool file into the store; return how many were stored.

        Stops at the first write that fails and keeps that turn and the rest in the spool (order kept).
        Lines that are not turn records go to ``<spool>.rejected`` with a warning, never silently away.
        """
        with self._spool_lock:
            if not self.spool_path.exists():
                return 0
            lines = [ln for ln in self.spool_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            replayed, keep, rejected = 0, [], []
            for n, line in enumerate(lines):
                try:
                    record = TurnRecord.from_json_dict(json.loads(line))
                    record.validate()
                except (ValueError, StoreError) as exc:
                    log.warning(
                        "spool %s line %d is not a turn record (%s); moved to %s.rejected",
                        self.spool_path,
                        n + 1,
                        exc,
                        self.spool_path.name,
                    )
                    rejected.append(line)
                    continue
                if record.status == "running":  # a start spooled by a process that is gone: it never ended here
                    record.status = "interrupted"
                try:
                    self.store.log_turn(record)
                    replayed += 1
                except Exception as exc:  # noqa: BLE001 - any failure: keep the rest for the next start
                    log.warning(
                        "replaying %s stopped: %s; %d turn(s) stay spooled", self.spool_path, exc, len(lines) - n
                    )
                    keep = lines[n:]
                    break
            if rejected:
                rejected_path = self.spool_path.with_name(self.spool_path.name + ".rejected")
                with rejected_path.open("a", encoding="utf-8") as f:
                    f.write("\n".join(rejected) + "\n")
            if keep:
                tmp = self.spool_path.with_name(self.spool_path.name + ".tmp")
                tmp.write_text("\n".join(keep) + "\n", encoding="utf-8")
                os.replace(tmp, self.spool_path)
            else:
                self.spool_path.unlink()
            if replayed:
                log.info("replayed %d spooled turn(s) from %s", replayed, self.spool_path)
            return replayed

    # -- worker -------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self._replay_on_start:
            try:
                self.replay_spool()
            except Exception:  # the spool stays for the next start; logging goes on
                log.exception("could not replay %s", self.spool_path)
        while True:
            job = self._queue.get()
            if job is None:
                return
            record, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._write(record))
            except BaseException as exc:  # noqa: BLE001 - the caller sees it through the future
                future.set_exception(exc)

    def _write(self, record: TurnRecord) -> int:
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return self.store.log_turn(record)
            except Exception as exc:  # noqa: BLE001 - any failure is retried, then spooled
                log.warning("logging turn %s failed (attempt %d of %d): %s", record.uid, attempt, self.attempts, exc)
                if attempt == self.attempts:
                    break
                time.sleep(delay)
                delay *= 2
        return self._spool(record)

    def _spool(self, record: TurnRecord) -> int:
        if not self.store.log_prompts:
            record = record.without_text()
        line = json.dumps(record.to_json_dict(), ensure_ascii=False)
        try:
            with self._spool_lock:
                self.spool_path.parent.mkdir(parents=True, exist_ok=True)
                with self.spool_path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            # last resort: the record itself goes to the log, so it can still be recovered by hand
            log.error("could not spool turn to %s (%s); the turn was: %s", self.spool_path, exc, line)
            raise TurnNotLoggedError(f"turn {record.uid} could not be logged or spooled: {exc}") from exc
        log.warning("turn %s could not be logged; saved to %s, replayed on next start", record.uid, self.spool_path)
        raise TurnNotLoggedError(
            f"turn {record.uid} could not be logged after {self.attempts} attempts; saved to "
            f"{self.spool_path} and replayed on next start",
            spool_path=str(self.spool_path),
        )
