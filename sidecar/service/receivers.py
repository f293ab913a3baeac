"""Receiver processes that share the DICOM port (SO_REUSEPORT), supervised and restarted.

Why and how: docs/design/cli.md, "service/receivers.py".
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.synchronize
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import Any

from sidecar.archive.store import InstanceStore
from sidecar.audit import setup as audit_setup
from sidecar.audit.trail import ForwardingSink
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.dicom.logs import log_identifiers
from sidecar.dicom.node import DicomNode
from sidecar.dicom.similarity import SimilarityFind
from sidecar.logsetup import configure_logging
from sidecar.search.ipc import QueryClient

logger = logging.getLogger(__name__)

_READY_TIMEOUT = 60.0


def effective_receivers(config: Config) -> int:
    """Number of receiver processes (the main one included) for ``config``."""
    n = config.dicom.receiver_processes
    return max(1, n if n > 0 else (os.cpu_count() or 1))


def share_of_associations(config: Config, processes: int) -> int:
    """Each process's share of ``dicom.max_associations`` (at least 1)."""
    return max(1, -(-config.dicom.max_associations // processes))


def _receiver_main(
    config: Config,
    share: int,
    log_level: str,
    ready: mp.synchronize.Event,
    stop: mp.synchronize.Event,
    query_endpoint: tuple[str, bytes] | None,
    audit_queue: mp.Queue[Any] | None = None,
) -> None:  # pragma: no cover - runs in a child process (exercised by tests via serve)
    configure_logging(log_level)
    log_identifiers(log_level)
    terminated = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    engine, repo = open_catalogue(config, migrate=False)
    client = QueryClient(*query_endpoint) if query_endpoint is not None else None
    store = InstanceStore(config, repo)
    node = DicomNode(
        config, store, reuse_port=True, max_associations=share,
        similarity=SimilarityFind(
            client, engine, config.query,
            retrieve_ae_title=config.dicom.effective_retrieve_ae_title,
        ) if client is not None else None,
        examples=client,
        auditor=audit_setup.auditor(
            config, ForwardingSink(audit_queue) if audit_queue is not None else None),
    )
    node.start()
    ready.set()
    try:
        # Poll: a signal handler must not touch the multiprocessing Event the
        # main thread is blocked on.
        while not terminated.is_set() and not stop.wait(0.5):
            pass
    finally:
        node.stop()
        store.close()
        engine.dispose()


class ReceiverPool:
    """Start, supervise and stop the extra receiver processes.

    Parameters
    ----------
    config
        The configuration (pickled to each child).
    count
        Number of receiver processes.
    share
        Each process's maximum number of associations.
    log_level
        Logging level for the children.
    """

    def __init__(self, config: Config, count: int, share: int, log_level: str) -> None:
        self._config = config
        self._count = count
        self._share = share
        self._log_level = log_level
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._procs: list[BaseProcess] = []
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._query_endpoint: tuple[str, bytes] | None = None
        #: Audit messages of the children, relayed by the main process's audit trail.
        self.audit_queue: mp.Queue[Any] = self._ctx.Queue(maxsize=config.audit.queue_size)

    @property
    def count(self) -> int:
        """Number of receiver processes the pool keeps running."""
        return self._count

    def _spawn(self, index: int) -> BaseProcess:
        ready = self._ctx.Event()
        proc = self._ctx.Process(
            target=_receiver_main,
            args=(self._config, self._share, self._log_level, ready, self._stop,
                  self._query_endpoint, self.audit_queue),
            name=f"receiver-{index}",
            daemon=True,
        )
        proc.start()
        if not ready.wait(_READY_TIMEOUT):
            proc.terminate()
            raise RuntimeError(f"receiver process {index} did not start")
        return proc

    def start(self, query_endpoint: tuple[str, bytes] | None = None) -> None:
        """Start the children and wait until each one listens.

        ``query_endpoint`` (address, key) of the main process's query server:
        the children forward similarity queries and example images there.
        ``None``: they answer similarity queries 0xA900 (not available).
        """
        self._query_endpoint = query_endpoint
        for i in range(self._count):
            self._procs.append(self._spawn(i + 1))
        logger.info("%d receiver processes listening", self._count)
        self._supervisor = threading.Thread(
            target=self._supervise, name="receiver-supervisor", daemon=True
        )
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._closing.wait(1.0):
            for i, proc in enumerate(self._procs):
                if not proc.is_alive() and not self._closing.is_set():
                    logger.error(
                        "receiver process %s exited with code %s; restarting",
                        proc.name, proc.exitcode,
                    )
                    try:
                        self._procs[i] = self._spawn(i + 1)
                    except Exception:
                        logger.exception("could not restart receiver process %s", proc.name)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live children."""
        return [p.pid for p in self._procs if p.pid is not None and p.is_alive()]

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the children to finish their associations and exit."""
        self._closing.set()
        self._stop.set()
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                logger.warning(
                    "receiver %s did not stop in %.0f s; terminating", proc.name, timeout
                )
                proc.terminate()
                proc.join(5)
        self._procs.clear()
