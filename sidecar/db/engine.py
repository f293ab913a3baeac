"""Engine and session factory: one engine per process.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL``, so a
committed row survives power loss, a busy timeout, and foreign keys on.
PostgreSQL is used by URL unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

#: Execution option that marks a connection's transactions as writes.
WRITE_OPTION = "sidecar_write"
#: Execution option of a connection that runs one SELECT and nothing else (SQLite: no BEGIN).
SINGLE_READ_OPTION = "sidecar_single_read"


def make_engine(url: str, *, busy_timeout_ms: int = 10000, echo: bool = False) -> Engine:
    """Create the process's engine.

    Parameters
    ----------
    url
        SQLAlchemy URL; for SQLite the parent directory is created.
    busy_timeout_ms
        SQLite busy timeout.
    echo
        Log SQL statements.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": busy_timeout_ms / 1000.0, "check_same_thread": False}
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # We issue BEGIN ourselves (below), so the driver must not.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # A write transaction takes the write lock up front: a deferred one
            # that reads first and writes later can fail with SQLITE_BUSY
            # (no busy-wait) when another writer commits in between.
            options = conn.get_execution_options()
            if options.get(SINGLE_READ_OPTION, False):
                return  # one SELECT is atomic by itself: no BEGIN ... ROLLBACK around it
            immediate = options.get(WRITE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    else:
        kwargs["pool_pre_ping"] = True
        engine = create_engine(url, **kwargs)
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine`` (objects stay usable after commit)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A short write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on exit."""
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
        yield conn
