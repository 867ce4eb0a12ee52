"""The job database's schema: numbered migrations, applied at start, once, in one transaction.

`MIGRATIONS` is the whole history of the schema, oldest first; a database is at
version N when migrations 1..N have run on it, recorded one row each in
`image_jobs_migrations`. At start `migrate()` takes a lock no other replica's
`migrate()` can pass (`BEGIN IMMEDIATE` on SQLite, `pg_advisory_xact_lock` on
PostgreSQL, both taken before the version is read), reads the version, runs
the migrations above it and records them, and commits: every step or none, and
two replicas starting at once run each migration once (the second finds the
first's work done). A database at a version above the code's (written by a
newer release) is refused with `SchemaTooNew`: the service stops at start
rather than read columns it does not know or lose what it cannot write.

Migration 1 is the table as the first release created it, word for word
(`CREATE TABLE IF NOT EXISTS`): that release kept no version, so a database it
wrote reads as version 0, migration 1 finds its table and indexes already
there and changes nothing, and the migrations after it upgrade it like any
other. Never edit a released migration: add the next one.

Why a small runner of our own rather than Alembic or yoyo-migrations: the
store is one table and plain SQL through the two drivers' DB-API connections
(database.py), with no ORM. Alembic runs on SQLAlchemy's engine and
connections, a second way to connect (and a large dependency) for two
statements. yoyo is plain SQL too, but it opens connections of its own from a
URL through its own backends, runs each migration in a transaction of its own,
and keeps replicas apart with a lock table of its own rather than one
transaction under the database's lock. What is needed is a list of numbered
SQL steps and one history table, run through the store's own connection with
its `?` placeholders, all in one transaction: the code below, tested on both
databases (tests/unit/api/jobs/test_migrations.py).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .database import POSTGRES_PREFIXES, SQLITE_PREFIX, Database, Dialect, Transaction

# Any constant will do, as long as it is the same in every replica (and not another
# application's advisory lock on the same database): "sdxl" "jobs" in ASCII.
MIGRATION_LOCK = 0x7364786C_6A6F6273
HISTORY_TABLE = "image_jobs_migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    # The statements for a dialect, run in order.
    statements: Callable[[Dialect], list[str]]


class SchemaTooNew(RuntimeError):
    """The database was written by a newer release than this code."""

    @staticmethod
    def describe(version: int, latest: int) -> str:
        return (
            f"the image job database is at schema version {version}, newer than this "
            f"release's {latest}: it was written by a newer release of the service. Run "
            "that release (or a newer one) on it, or give this one a database of its own "
            "(SDXL_JOBS_DATABASE_URL); a database is never downgraded."
        )


_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {"real": "REAL", "blob": "BLOB"},
    "postgresql": {"real": "DOUBLE PRECISION", "blob": "BYTEA"},
}

# Migration 1: the first release's schema, exactly as its store.py wrote it.
_V1_COLUMNS = """
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    expires_at {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    images_done INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,
    base_url TEXT NOT NULL,
    image {blob},
    mask {blob},
    webhook_url TEXT,
    metadata TEXT,
    result TEXT,
    error TEXT,
    runner_token TEXT,
    lease_until {real},
    webhook_state TEXT,
    webhook_attempts TEXT NOT NULL DEFAULT '[]'
"""
_V1_TABLE: dict[Dialect, str] = {
    "sqlite": "CREATE TABLE IF NOT EXISTS image_jobs ("
    "seq INTEGER PRIMARY KEY AUTOINCREMENT," + _V1_COLUMNS.format(real="REAL", blob="BLOB") + ")",
    "postgresql": "CREATE TABLE IF NOT EXISTS image_jobs ("
    "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    + _V1_COLUMNS.format(real="DOUBLE PRECISION", blob="BYTEA")
    + ")",
}
_V1_INDEXES = [
    "CREATE INDEX IF NOT EXISTS image_jobs_status ON image_jobs (status, seq)",
    "CREATE INDEX IF NOT EXISTS image_jobs_owner ON image_jobs (owner, seq)",
]

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the image_jobs table", lambda d: [_V1_TABLE[d], *_V1_INDEXES]),
    Migration(
        2,
        "not_before: the earliest time a queued job's next attempt may start",
        lambda d: [
            f"ALTER TABLE image_jobs ADD COLUMN not_before {_TYPES[d]['real']} NOT NULL DEFAULT 0"
        ],
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def _history_table(dialect: Dialect) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (version INTEGER PRIMARY KEY, "
        f"name TEXT NOT NULL, applied_at {_TYPES[dialect]['real']} NOT NULL)"
    )


def schema_version(tx: Transaction) -> int:
    row = tx.fetch_one(f"SELECT MAX(version) AS version FROM {HISTORY_TABLE}")
    return int(row["version"]) if row and row["version"] is not None else 0


def migrate(
    db: Database,
    migrations: tuple[Migration, ...] = MIGRATIONS,
    clock: Callable[[], float] = time.time,
) -> list[int]:
    """Brings the database to the last of `migrations`; the versions it applied (none when
    it was there already). SchemaTooNew when the database is past them."""
    latest = migrations[-1].version if migrations else 0
    with db.transaction(MIGRATION_LOCK) as tx:
        tx.execute(_history_table(db.dialect))
        version = schema_version(tx)
        if version > latest:
            raise SchemaTooNew(SchemaTooNew.describe(version, latest))
        applied = []
        for migration in migrations:
            if migration.version <= version:
                continue
            for statement in migration.statements(db.dialect):
                tx.execute(statement)
            tx.execute(
                f"INSERT INTO {HISTORY_TABLE} (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, clock()),
            )
            applied.append(migration.version)
        return applied


def stored_version(url: str) -> int | None:
    """The schema version of the database at `url`, read only (nothing created or locked);
    None when there is none to read yet, or the database cannot be reached now."""
    try:
        if url.startswith(POSTGRES_PREFIXES):
            import psycopg

            with psycopg.connect(url, connect_timeout=10) as connection:
                row = connection.execute(f"SELECT MAX(version) FROM {HISTORY_TABLE}").fetchone()
        else:
            path = Path(url.removeprefix(SQLITE_PREFIX))
            if not path.is_file():
                return None
            with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
                row = db.execute(f"SELECT MAX(version) FROM {HISTORY_TABLE}").fetchone()
    except Exception:
        return None  # no history table yet (version 0), or not reachable: the store says so
    return None if row is None or row[0] is None else int(row[0])
