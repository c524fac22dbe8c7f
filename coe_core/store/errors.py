"""Errors of the interaction store; each message says what to do. ``StoreError``, their root, lives in
``coe_core/errors.py`` with the engine's other errors."""

from __future__ import annotations

from coe_core.errors import InvalidRequest, StoreError

__all__ = ["InteractionNotFound", "InvalidStoreRequest", "SchemaVersionError", "StoreError", "TurnNotLoggedError"]


class InvalidStoreRequest(StoreError, InvalidRequest):
    """The caller asked the store for something wrong (a bad feedback kind or category, a bad limit or export
    format): the caller's fault, unlike a database that failed."""


class InteractionNotFound(InvalidStoreRequest):
    """No such turn in the log, or not one the caller made (feedback is bound to the session that made it)."""


class SchemaVersionError(StoreError):
    """The database was written by a newer (or unknown) version of CoE Playground."""


class TurnNotLoggedError(StoreError):
    """A turn could not be written after retries; it was saved to the spool file for replay."""

    def __init__(self, message: str, spool_path: str | None = None) -> None:
        super().__init__(message)
        self.spool_path = spool_path
