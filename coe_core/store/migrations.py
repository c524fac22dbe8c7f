"""Schema versions: a fresh database is created from the models, an older one is upgraded step by step.

``schema_info`` holds one row with the version. On open, :func:`ensure_schema`
- creates every table and stamps :data:`SCHEMA_VERSION` when the database has none of ours;
- runs each step of :data:`MIGRATIONS` newer than the stored version, in order, in one transaction;
- refuses a database whose version is newer than this code knows (an older release must not write into
  a layout it does not understand).

To change the schema: change the models, append a ``Migration`` that brings a database of the previous
version to the same layout (the test compares an upgraded database with a fresh one), and the version
follows from the list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import JSON, Column, Connection, Engine, Float, String, cast, column, inspect, select, table, update
from sqlalchemy.schema import CreateColumn

from coe_core.events import RemoteConnect
from coe_core.store.errors import SchemaVersionError, StoreError
from coe_core.store.models import STATUS_CHECK, Base, SchemaInfo, utcnow

#: the version of the first released layout (the models as of the first store commit)
BASE_VERSION = 1
#: the status CHECK constraint of versions 1 and 2 (running and interrupted came with version 3)
V1_STATUS_CHECK = "status IN ('ok', 'cancelled', 'error')"


@dataclass(frozen=True)
class Migration:
    #: the version a database has after this step
    version: int
    description: str
    apply: Callable[[Connection], None]


def add_column(conn: Connection, table: str, column: Column) -> None:
    """ALTER TABLE ... ADD COLUMN compiled for the connection's dialect (names are ours, not user input)."""
    preparer = conn.dialect.identifier_preparer
    ddl = CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {preparer.quote(table)} ADD COLUMN {ddl}")


def replace_status_check(conn: Connection, old: str, new: str) -> None:
    """Replace the ``interactions.status`` CHECK constraint ``old`` by ``new`` (the tests also use it to build an
    older layout). SQLite cannot alter a CHECK constraint: rewriting the table's schema text is the procedure
    SQLite documents for a change every stored row still satisfies (lang_altertable §7)."""
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("ALTER TABLE interactions DROP CONSTRAINT ck_interactions_status")
        conn.exec_driver_sql(f"ALTER TABLE interactions ADD CONSTRAINT ck_interactions_status CHECK ({new})")
        return
    sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'interactions'").scalar()
    if sql and old in sql:
        version = conn.exec_driver_sql("PRAGMA schema_version").scalar()
        conn.exec_driver_sql("PRAGMA writable_schema = ON")
        conn.exec_driver_sql(
            "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'interactions'", (sql.replace(old, new),)
        )
        conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
        conn.exec_driver_sql("PRAGMA writable_schema = OFF")


def _v2_route_timing(conn: Connection) -> None:
    add_column(conn, "interactions", Column("route_latency_ms", Float))
    add_column(conn, "interactions", Column("route_threshold", Float))


def _v3_running_turns_and_review(conn: Connection) -> None:
    replace_status_check(conn, V1_STATUS_CHECK, STATUS_CHECK)  # running and interrupted turns
    add_column(conn, "feedback", Column("review", String(16)))
    add_column(conn, "feedback", Column("author", String(128)))
    conn.exec_driver_sql("UPDATE feedback SET review = 'accepted'")  # what older releases stored counted


def _v4_queue_wait(conn: Connection) -> None:
    add_column(conn, "interactions", Column("queue_s", Float))


def _v5_remote_connection(conn: Connection) -> None:
    add_column(conn, "interactions", Column("remote_connection", JSON))
    # older releases logged a remote expert's connection as a swap from tier "remote" (with cumulative
    # phase times): move it to its own column, so that swap counts and swap times are loads only
    rows = table("interactions", column("id"), column("swaps", JSON), column("remote_connection", JSON))
    for turn_id, swaps in conn.execute(
        select(rows.c.id, rows.c.swaps).where(cast(rows.c.swaps, String).like('%"remote"%'))
    ).all():
        remote = [s for s in swaps or [] if isinstance(s, dict) and s.get("src") == "remote"]
        if not remote:
            continue
        phases = remote[-1].get("phases") or {}
        connection = RemoteConnect(
            str(remote[-1].get("expert", "")),
            # a phase logged as null reads as 0 s (one odd row must not stop the store from opening)
            float(phases.get("connect") or 0.0),
            float(phases.get("headers") or 0.0),
            float(phases.get("first_byte") or remote[-1].get("seconds") or 0.0),
            started_at=remote[-1].get("started_at"),
        )
        conn.execute(
            update(rows)
            .where(rows.c.id == turn_id)
            .values(swaps=[s for s in swaps if s not in remote], remote_connection=connection.to_dict())
        )


MIGRATIONS: list[Migration] = [
    Migration(2, "interactions: route_latency_ms and route_threshold", _v2_route_timing),
    Migration(
        3,
        "interactions: running and interrupted turns; feedback: review state and author",
        _v3_running_turns_and_review,
    ),
    Migration(4, "interactions: queue_s (seconds waited in the serving queue)", _v4_queue_wait),
    Migration(
        5,
        "interactions: remote_connection (a remote expert's connection, no longer logged as a swap)",
        _v5_remote_connection,
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else BASE_VERSION

_OUR_TABLES = {"conversations", "interactions", "feedback", "router_versions"}


def ensure_schema(engine: Engine, where: str) -> int:
    """Create or upgrade the schema; return the version. ``engine`` should be the writer engine."""
    with engine.begin() as conn:
        tables = set(inspect(conn).get_table_names())
        if "schema_info" not in tables:
            if tables & _OUR_TABLES:
                raise SchemaVersionError(
                    f"the database at {where} has CoE tables ({', '.join(sorted(tables & _OUR_TABLES))}) "
                    "but no schema_info table, so its layout is unknown: point COE_DATABASE_URL / store.url "
                    "at a new database file, or move this one away"
                )
            Base.metadata.create_all(conn)
            stamp = SchemaInfo.__table__.insert().values(id=1, version=SCHEMA_VERSION, updated_at=utcnow())
            conn.execute(stamp)
            return SCHEMA_VERSION
        version = conn.execute(select(SchemaInfo.version).where(SchemaInfo.id == 1)).scalar()
        if version is None:
            raise StoreError(
                f"the database at {where} has an empty schema_info table: restore it from a backup or "
                "point COE_DATABASE_URL / store.url at a new database"
            )
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database at {where} has schema version {version}, newer than the {SCHEMA_VERSION} this "
                "CoE Playground understands (it was written by a newer release): upgrade coe-playground, "
                "or point COE_DATABASE_URL / store.url at another database"
            )
        for step in MIGRATIONS:
            if step.version > version:
                step.apply(conn)
                conn.execute(
                    SchemaInfo.__table__.update()
                    .where(SchemaInfo.id == 1)
                    .values(version=step.version, updated_at=utcnow())
                )
                version = step.version
        return version
