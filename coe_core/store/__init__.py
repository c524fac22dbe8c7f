"""The interaction log: SQLAlchemy models, the Store API, the background TurnLogger, `coe` subcommands."""

from coe_core.store.errors import SchemaVersionError, StoreError, TurnNotLoggedError
from coe_core.store.records import TurnRecord
from coe_core.store.store import Store
from coe_core.store.writer import TurnLogger, default_spool_path

__all__ = [
    "SchemaVersionError",
    "Store",
    "StoreError",
    "TurnLogger",
    "TurnNotLoggedError",
    "TurnRecord",
    "default_spool_path",
]
