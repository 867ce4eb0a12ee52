"""The job database connection: SQLite (embedded, the default) or PostgreSQL (shared by replicas).

Plain SQL through the two drivers' DB-API connections rather than an ORM: the
store is one table and a dozen statements, and the only differences between
the two are the placeholder style and three column types, kept here. Every
statement is written with `?` placeholders; PostgreSQL gets `%s`.
Both connections run in autocommit mode: each statement is its own
transaction, and the store's updates that must not race are conditional
(`WHERE status = 'queued'`), so they need no explicit locking. The one
exception is `transaction()`, for the schema's migrations at start: several
statements that stand or fall together, under a lock no other replica's
migrations can pass (`BEGIN IMMEDIATE` on SQLite, an advisory transaction lock
on PostgreSQL).

Blocking: the callers run it in threads. One connection per database, used by
one thread at a time (the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

Dialect = Literal["sqlite", "postgresql"]
Row = dict[str, Any]

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


class Database:
    """One connection, SQLite or PostgreSQL, with `?` placeholders for both."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect: Dialect = "postgresql" if url.startswith(POSTGRES_PREFIXES) else "sqlite"
        if self.dialect == "sqlite" and not url.startswith(SQLITE_PREFIX):
            raise ValueError(f"not a sqlite:/// or postgresql:// URL: {url.split(':', 1)[0]}:")
        self._lock = threading.Lock()
        self._connection: Any = None
        self._file_lock: Any = None
        self._connect()

    @classmethod
    def sqlite_file(cls, path: Path) -> Database:
        return cls(SQLITE_PREFIX + str(path))

    def claim_sqlite_file(self) -> bool:
        """Takes the embedded database for this process alone (a lock beside the file, held
        until the process ends, a SIGKILL included); False when another process holds it.

        One service per file: it takes every job left `running` there as interrupted,
        so a second service on the same file (replicas on a shared volume) would run
        the first one's jobs a second time.
        """
        if self.dialect != "sqlite":
            return True
        path = Path(self.url.removeprefix(SQLITE_PREFIX))
        lock = (path.parent / f"{path.name}.lock").open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return False
        self._file_lock = lock
        return True

    @property
    def embedded(self) -> bool:
        """True for SQLite: one service owns the file, so no other replica runs its jobs."""
        return self.dialect == "sqlite"

    def _connect(self) -> None:
        if self.dialect == "sqlite":
            path = Path(self.url.removeprefix(SQLITE_PREFIX))
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            # First: a second service starting beside this one waits for its lock.
            connection.execute("PRAGMA busy_timeout=10000")
            # WAL: readers (GET of a job) never wait for the runner's writes.
            connection.execute("PRAGMA journal_mode=WAL")
            self._connection = connection
            return
        # Only where PostgreSQL is used: the SQLite default needs no driver.
        import psycopg
        from psycopg.rows import dict_row

        self._connection = psycopg.connect(self.url, autocommit=True, row_factory=dict_row)

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Runs one statement; the number of rows it changed."""
        with self._lock:
            cursor = self._run(statement, params)
            return int(cursor.rowcount)

    def fetch_all(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            cursor = self._run(statement, params)
            return [dict(row) for row in cursor.fetchall()]

    def fetch_one(self, statement: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.fetch_all(statement, params)
        return rows[0] if rows else None

    @contextlib.contextmanager
    def transaction(self, lock_key: int) -> Iterator[Transaction]:
        """One transaction, committed when the block ends (rolled back if it raises), that
        no other `transaction(lock_key)` on the same database runs beside: SQLite's
        `BEGIN IMMEDIATE` takes the file's write lock at once; PostgreSQL's
        `pg_advisory_xact_lock(lock_key)` is held until the commit. Both wait for the
        other holder (SQLite up to its busy timeout)."""
        with self._lock:
            if self.dialect == "postgresql":
                if self._connection.closed:
                    self._connect()
                with self._connection.transaction():
                    self._connection.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
                    yield Transaction(self)
                return
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self)
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def _run(self, statement: str, params: Sequence[Any]) -> Any:
        if self.dialect == "postgresql" and self._connection.closed:
            # The server restarted or dropped us: one new connection, then the statement.
            self._connect()
        return self._connection.execute(self._sql(statement), tuple(params))

    def close(self) -> None:
        with self._lock:
            self._connection.close()
            if self._file_lock is not None:
                self._file_lock.close()  # and with it the claim on the file
                self._file_lock = None


class Transaction:
    """The statements of one `Database.transaction()`, on its connection (lock held)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        return int(self._db._run(statement, params).rowcount)

    def fetch_all(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        return [dict(row) for row in self._db._run(statement, params).fetchall()]

    def fetch_one(self, statement: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.fetch_all(statement, params)
        return rows[0] if rows else None
