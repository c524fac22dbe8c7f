"""Who may change the system (retrain, promote, apply a mapping, change the threshold) and who may see
other people's prompts (recent turns of every session, export, the review queue of anonymous feedback).

When ``COE_ADMIN_TOKEN`` is set, those need the token, entered once per browser session (kept in that
session's ``gr.State``, compared in constant time). Every handler checks it itself: a private Gradio event
is hidden from the API docs, not uncallable (``POST /gradio_api/queue/join`` with its ``fn_index`` runs it).
Without a token the app runs in open demo mode and says so: the actions are open, other people's prompts
are not (they need a configured token). Chat and routing are open to everyone either way.
"""

from __future__ import annotations

import hmac
import os

import gradio as gr

ENV_VAR = "COE_ADMIN_TOKEN"


class AdminGate:
    def __init__(self, token: str | None = None) -> None:
        token = os.environ.get(ENV_VAR) if token is None else token
        self._token = token.strip() if token and token.strip() else None

    @property
    def open_mode(self) -> bool:
        """No token configured: anyone may change the system (a local demo)."""
        return self._token is None

    def check(self, candidate: str | None) -> bool:
        if self._token is None:
            return True
        if not candidate:
            return False
        return hmac.compare_digest(candidate.strip().encode(), self._token.encode())

    def status_text(self, unlocked: bool) -> str:
        if self.open_mode:
            return (
                f"**Open demo mode**: `{ENV_VAR}` is not set, so anyone with this page may retrain or "
                "change the mapping. Other people's prompts (recent turns, export, review of anonymous "
                "feedback) need the token. Set it to protect the actions too."
            )
        if unlocked:
            return "**Admin unlocked** for this browser session."
        return (
            f"**Locked**: changing the system needs the admin token (`{ENV_VAR}`). "
            "Chat and routing stay open to everyone."
        )

    def require(self, unlocked: bool, action: str) -> None:
        """Raise a user-facing error (a modal, not a traceback) when this session may not ``action``."""
        if self.open_mode or unlocked is True:
            return
        raise gr.Error(
            f"{action} needs the admin token: enter it in the Admin panel at the top of the page.",
            title="Admin token needed",
        )

    def sees_private(self, unlocked: bool) -> bool:
        """May this session see other people's prompts? Only an unlocked session of a configured token:
        open demo mode opens the actions, not the log's text."""
        return not self.open_mode and unlocked is True

    def require_private(self, unlocked: bool, action: str) -> None:
        if self.sees_private(unlocked):
            return
        if self.open_mode:
            raise gr.Error(
                f"{action} shows other people's prompts, so it needs an admin token even in open demo "
                f"mode: set {ENV_VAR} and unlock (or use `coe export` on the server).",
                title="Admin token needed",
            )
        self.require(False, action)

    def unlock(self, candidate: str) -> tuple[bool, str]:
        """(unlocked, message) for a token typed into the admin box."""
        if self.open_mode:
            return True, self.status_text(True)
        if self.check(candidate):
            return True, self.status_text(True)
        gr.Warning("That is not the admin token.")
        return False, self.status_text(False)
