"""Errors of the interaction store; each message says what to do."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A user-fixable problem with the interaction store (bad id, bad URL, bad feedback kind...)."""


class InteractionNotFound(StoreError):
    """No such turn in the log, or not one the caller made (feedback is bound to the session that made it)."""


class SchemaVersionError(StoreError):
    """The database was written by a newer (or unknown) version of CoE Playground."""


class TurnNotLoggedError(StoreError):
    """A turn could not be written after retries; it was saved to the spool file for replay."""

    def __init__(self, message: str, spool_path: str | None = None) -> None:
        super().__init__(message)
        self.spool_path = spool_path
