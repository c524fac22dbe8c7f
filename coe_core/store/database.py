"""Engine creation: any SQLAlchemy URL; SQLite gets WAL, foreign keys, a busy timeout and real locking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from coe_core.store.errors import StoreError

#: how long a SQLite writer waits for another writer's lock before giving up
BUSY_TIMEOUT_MS = 15_000
#: execution option of the engine used for writing units of work (see _sqlite_begin)
WRITE_OPTION = "coe_write"


def safe_url(url: str | URL) -> str:
    """The URL as text without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as exc:
        raise StoreError(
            f"store URL {url!r} is not a SQLAlchemy URL ({exc}); set COE_DATABASE_URL or store.url to e.g. "
            "sqlite:///path/to/coe.sqlite3 or postgresql+psycopg://user@host/dbname"
        ) from None


def create_store_engine(url: str) -> Engine:
    parsed = parse_url(url)
    kwargs: dict[str, Any] = {}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        database = parsed.database or ""
        if database in ("", ":memory:"):
            # one shared connection, or every pooled connection would see its own empty database
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        elif not database.startswith("file:"):
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {})["timeout"] = BUSY_TIMEOUT_MS / 1000
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreError(
            f"store URL {safe_url(parsed)} needs a database driver that is not installed ({exc}); "
            "install it (e.g. pip install psycopg[binary]) or use a sqlite:/// URL"
        ) from None
    if is_sqlite:
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's implicit BEGIN is deferred and
        # comes too late for BEGIN IMMEDIATE); see the SQLAlchemy "pysqlite serializable" recipe.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Any) -> None:
        # A write that starts as a deferred (read) transaction fails at once with SQLITE_BUSY when another
        # writer commits first, whatever the busy timeout. BEGIN IMMEDIATE takes the write lock up front, so
        # concurrent writers wait their turn instead; reads keep a plain BEGIN and never block writers (WAL).
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def writer_engine(engine: Engine) -> Engine:
    """The same engine (same pool) marked for writing units of work."""
    return engine.execution_options(**{WRITE_OPTION: True})
