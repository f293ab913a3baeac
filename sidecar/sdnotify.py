"""systemd's readiness protocol (``sd_notify``) for ``sidecar serve`` under ``Type=notify``.

When systemd starts the service it sets ``NOTIFY_SOCKET`` to a datagram socket
(a path, or an abstract name starting with ``@``). ``READY=1`` tells it the
DICOM port accepts associations, so ``systemctl start`` returns only then and
units ordered after this one start on a working node; ``STOPPING=1`` says a
stop has begun. Without ``NOTIFY_SOCKET`` (a terminal, a container) nothing is
sent. The protocol is one ``sendto`` (systemd's ``sd_notify(3)``); no library.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to systemd; returns whether it was sent.

    A failure is logged at WARNING and otherwise ignored: the service works
    without it, only systemd's view of it is late.
    """
    address = os.environ.get(ENV, "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        logger.warning("%s=%r is neither a path nor an abstract socket name", ENV, address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        logger.warning("could not notify systemd (%s): %s", ENV, exc)
        return False
    return True
