"""Composition root: builds every part from the configuration, in order."""

from __future__ import annotations

import logging
from types import TracebackType

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from sidecar.config import Config
from sidecar.db.engine import make_engine, make_session_factory
from sidecar.db.migrate import upgrade
from sidecar.db.repository import Repository
from sidecar.dicom_scp.receivers import (
    ReceiverPool,
    effective_receivers,
    share_of_associations,
)
from sidecar.dicom_scp.server import DicomNode
from sidecar.dicom_scp.storage import InstanceStore

logger = logging.getLogger(__name__)


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


class Sidecar:
    """The running service: catalogue, storage, DICOM node and scheduled jobs.

    Start order: database (migrated) → storage → scheduler → DICOM node →
    extra receiver processes. Stop order is the reverse, so no association is
    served without storage.

    Parameters
    ----------
    config
        The configuration.
    receiver_processes
        Processes receiving associations, this one included; ``None`` uses
        ``dicom.receiver_processes`` (one per core by default). Tests use 1.
    log_level
        Logging level handed to receiver processes.
    """

    def __init__(
        self, config: Config, *, receiver_processes: int | None = 1, log_level: str = "INFO"
    ) -> None:
        self.config = config
        self.engine, self.repository = open_catalogue(config)
        self.store = InstanceStore(config, self.repository)
        n = effective_receivers(config) if receiver_processes is None else receiver_processes
        share = share_of_associations(config, n)
        self.node = DicomNode(config, self.store, reuse_port=n > 1, max_associations=share)
        self.pool = ReceiverPool(config, n - 1, share, log_level) if n > 1 else None
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(
            self.mark_stable,
            "interval",
            seconds=config.stability.check_interval,
            id="mark_stable",
            max_instances=1,
            coalesce=True,
        )
        self.address: tuple[str, int] | None = None

    def mark_stable(self) -> int:
        """Mark studies quiet for ``stability.stable_age`` seconds as stable."""
        n = self.repository.mark_stable_studies(self.config.stability.stable_age)
        if n:
            logger.info("%d stud%s became stable", n, "y" if n == 1 else "ies")
        return n

    def start(self) -> tuple[str, int]:
        """Start the scheduler and the DICOM node; returns the bound address."""
        self.scheduler.start()
        self.address = self.node.start()
        if self.pool is not None:
            self.pool.start()
        return self.address

    def stop(self) -> None:
        """Stop the receivers and the node, then the scheduler, then the database."""
        if self.pool is not None:
            self.pool.stop()
        self.node.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.engine.dispose()

    def __enter__(self) -> Sidecar:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
