"""Opening the catalogue: the process's engine (schema upgraded) and repository.

Not in ``engine.py``: the repository imports ``engine.write_transaction``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine

from sidecar.config import Config
from sidecar.db.engine import make_engine, make_session_factory
from sidecar.db.migrate import upgrade
from sidecar.db.repository import Repository


def open_catalogue(config: Config, *, migrate: bool = True) -> tuple[Engine, Repository]:
    """The process's engine (schema upgraded to head unless told not to) and repository."""
    engine = make_engine(
        config.database_url,
        busy_timeout_ms=config.database.busy_timeout_ms,
        echo=config.database.echo,
    )
    if migrate:
        upgrade(engine)
    return engine, Repository(make_session_factory(engine))


@contextmanager
def catalogue(config: Config, *, migrate: bool = True) -> Iterator[tuple[Engine, Repository]]:
    """:func:`open_catalogue` for a block; the engine is disposed of on leaving it."""
    engine, repo = open_catalogue(config, migrate=migrate)
    try:
        yield engine, repo
    finally:
        engine.dispose()


def ping(engine: Engine) -> None:
    """Raise unless the database answers a trivial query."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
