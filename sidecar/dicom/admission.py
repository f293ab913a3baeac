"""Which connections hold an association slot, and how long a silent or stalled one may wait.

pynetdicom counts every connection, even one that has not sent its A-ASSOCIATE-RQ, against
``AE.maximum_associations``; a connection that stalls in the middle of a PDU blocks its
thread in ``recv`` with no timeout at all. So a handful of half-open connections shut a
node out for good (measured: 4 half A-ASSOCIATE-RQs held a 4-slot node for minutes).
Here ``dicom.max_associations`` counts associations that were requested and admitted;
up to :data:`PENDING_ALLOWANCE` more connections may be waiting for their request, and
every accepted socket gets a timeout: ``acse_timeout`` until the association is
established (a stalled request PDU is dropped then), ``network_timeout`` afterwards.
Refusals are logged at WARNING. The rules are in docs/conformance.md.
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from typing import Any, Final

logger = logging.getLogger(__name__)

PENDING_ALLOWANCE: Final = 16
"""Connections beyond ``max_associations`` that may wait for their A-ASSOCIATE-RQ."""
LOCAL_LIMIT_EXCEEDED: Final = (0x02, 0x03, 0x02)
"""A-ASSOCIATE-RJ result, source, reason: rejected-transient, presentation, local limit."""


def _socket(assoc: Any) -> socket.socket | None:
    transport = assoc.dul.socket
    sock = getattr(transport, "socket", None) if transport is not None else None
    return sock if isinstance(sock, socket.socket) else None


class Admission:
    """Association slots of one process's node."""

    def __init__(self, max_associations: int, acse_timeout: float, network_timeout: float,
                 *, tcp_nodelay: bool = True) -> None:
        self.max_associations = max_associations
        self._acse_timeout = acse_timeout
        self._network_timeout = network_timeout
        self._tcp_nodelay = tcp_nodelay
        self._admitted: weakref.WeakSet[Any] = weakref.WeakSet()
        self._refused_by_us: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    @property
    def connection_limit(self) -> int:
        """What pynetdicom's own count (every connection) may reach."""
        return self.max_associations + PENDING_ALLOWANCE

    def opened(self, assoc: Any) -> None:
        """A connection was accepted: TCP_NODELAY, and the ACSE timeout on its socket."""
        sock = _socket(assoc)
        if sock is None:
            return
        try:
            if self._tcp_nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._acse_timeout)
        except OSError as exc:  # pragma: no cover - platform specific
            logger.debug("could not set socket options: %s", exc)

    def admit(self, assoc: Any) -> bool:
        """Take a slot for a requested association; ``False``: refuse it (none free)."""
        with self._lock:
            if len(self._admitted) >= self.max_associations:
                self._refused_by_us.add(assoc)
                return False
            self._admitted.add(assoc)
            return True

    def established(self, assoc: Any) -> None:
        """From now on a PDU may stall for ``network_timeout`` before the connection goes."""
        sock = _socket(assoc)
        if sock is not None:
            try:
                sock.settimeout(self._network_timeout)
            except OSError:  # pragma: no cover - closed meanwhile
                pass

    def closed(self, assoc: Any) -> None:
        """The connection is gone: its slot is free."""
        with self._lock:
            self._admitted.discard(assoc)

    def rejected(self, assoc: Any) -> None:
        """pynetdicom refused an association; log the ones it refused by itself."""
        with self._lock:
            ours = assoc in self._refused_by_us
        if not ours:
            logger.warning(
                "association from %s@%s refused: %d connections open, %d allowed "
                "(dicom.max_associations %d + %d waiting for their request)",
                str(assoc.requestor.ae_title).strip(), assoc.requestor.address,
                self.connection_limit + 1, self.connection_limit, self.max_associations,
                PENDING_ALLOWANCE,
            )

    def in_use(self) -> int:
        """Admitted associations now."""
        with self._lock:
            return len(self._admitted)
