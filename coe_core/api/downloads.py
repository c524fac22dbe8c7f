"""One-time downloads: a file the server wrote for one caller (an admin's export), fetched once by an
unguessable link and deleted after it was served (or after ``ttl_s`` if it never was).

Written instead of handing the file to Gradio: Gradio copies an output file into its cache, where it stays
downloadable by URL, without a session, until the cache is cleaned.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from pathlib import Path

#: where build_server serves them: GET {PREFIX}{token}
PREFIX = "/coe-download/"


class OneTimeDownloads:
    def __init__(self, ttl_s: float = 600.0) -> None:
        self.ttl_s = ttl_s
        #: set by build_server once the route exists (the app falls back to a Gradio file without it)
        self.served = False
        self._files: dict[str, tuple[Path, float]] = {}
        self._lock = threading.Lock()

    def offer(self, path: Path) -> str:
        """Register ``path`` for one download; returns the link's path."""
        self.sweep()
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._files[token] = (Path(path), time.monotonic() + self.ttl_s)
        return PREFIX + token

    def take(self, token: str) -> Path | None:
        """The file for ``token`` (once: the token is spent), or None when unknown, spent or expired."""
        with self._lock:
            found = self._files.pop(token, None)
        if found is None:
            return None
        path, expires = found
        if time.monotonic() > expires or not path.exists():
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return path

    def sweep(self) -> None:
        """Delete the files of links that expired unused."""
        now = time.monotonic()
        with self._lock:
            gone = [t for t, (_, expires) in self._files.items() if expires < now]
            paths = [self._files.pop(t)[0] for t in gone]
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()


DOWNLOADS = OneTimeDownloads()
