"""The metadata database's engine, migrations and transactions.

- `sqlite:///path` (the embedded default, under `cache_dir`) runs in WAL mode with a busy timeout,
  so the ingress replicas and model actors of one node share it; `postgresql+psycopg://...` is for
  deployments whose processes span nodes. `sqlite://` (in memory) is for tests.
- `migrate()` brings the schema to alembic's head. Every process calls it at start; a lock (a
  file lock on SQLite, an advisory lock on PostgreSQL) keeps two processes from migrating at once.
- NOTE: calls are synchronous; async code runs them in a thread (`asyncio.to_thread`).
- A method that only reads uses `reading()`: on SQLite `transaction()` takes the one write lock
  that every process shares, so a read there queues behind (and holds up) every writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x7468696E6B6572  # "thinker": the advisory lock id migrations hold


def default_url(cache_dir: str) -> str:
    """The embedded database: a SQLite file under the cache dir."""
    return f"sqlite:///{Path(cache_dir).expanduser() / 'thinker.sqlite3'}"


class Database:
    """One process's handle on the metadata database (an engine and its sessions)."""

    def __init__(self, url: str):
        self.url: URL = make_url(url)
        self.engine = _engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = sessionmaker(self.engine.execution_options(thinker_read_only=True), expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits at the end of the block (or rolls back on an exception)."""
        with self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only: on SQLite it does not take the write lock (`transaction` does),
        so frequent polls do not queue behind, or hold up, writers."""
        with self._readers.begin() as session:
            yield session

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (idempotent; safe from many processes)."""
        from alembic import command
        from alembic.config import Config

        with self._migration_lock(), self.engine.begin() as connection:
            if self.dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_MIGRATION_LOCK})
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        path = self.url.database if self.dialect == "sqlite" else None
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.migrate-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    if not url.database or url.database == ":memory:":  # one shared connection, or each sees its own database
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        if not os.path.exists(url.database):
            Path(url.database).touch(mode=0o600)  # the key hashes are nobody else's business either

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite's own BEGIN is off: `_begin` sends ours
        cursor = dbapi_connection.cursor()
        if url.database and url.database != ":memory:":
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        # NOTE: IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
        # writes fails at once with "database is locked" when another process wrote in between,
        # instead of waiting out the busy timeout.
        read_only = connection.get_execution_options().get("thinker_read_only", False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
