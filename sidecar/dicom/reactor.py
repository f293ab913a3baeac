"""pynetdicom's reactors wake on work instead of sleeping a fixed millisecond.

pynetdicom 3.0.4 runs two polling loops per association. The DUL thread
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever a
pass found nothing to do, and the acceptor's association thread
(``Association._run_reactor``) sleeps 1 ms before every look at its DIMSE queue.
On one association that is up to three such sleeps per C-STORE (the next
dataset's first PDU, the decoded message, the response to send). Measured with
``bench/ingest.py --profile`` (one association, 0.5 MB CT): from the handler's
return to the next request's first PDU took 1.7-1.9 ms median before, 0.8-1.1 ms
after.

:func:`install` keeps both loops as they are and only makes those two sleeps
wake early: the DUL thread waits in ``select`` on its socket and on a pipe that
``send_pdu`` writes to (a primitive to send), and the association thread waits
on its DIMSE queue's condition. Nothing else changes: the same timeout when
idle (so the same CPU use), the same order of checks, the same state machine.
Only the sleeps called from those two loops are affected (the caller's code
object is compared); every other sleep in pynetdicom sleeps as written.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import Any

import pynetdicom.association as _association
import pynetdicom.dul as _dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

_DUL_LOOP = DULServiceProvider.run_reactor.__code__
_ASSOC_LOOP = Association._run_reactor.__code__  # noqa: SLF001 - see the module notes
_original_run = DULServiceProvider.run_reactor
_original_send = DULServiceProvider.send_pdu


def _dul_wait(dul: Any, seconds: float) -> None:
    """Sleep up to ``seconds``; return as soon as the socket or the wake pipe is readable."""
    wake = getattr(dul, "_sidecar_wake", None)
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if wake is None or sock is None:
        time.sleep(seconds)
        return
    try:
        ready, _, _ = select.select([sock, wake[0]], [], [], seconds)
    except (OSError, ValueError):  # the socket closed meanwhile: the loop notices
        return
    if wake[0] in ready:
        try:
            os.read(wake[0], 4096)
        except (BlockingIOError, OSError):
            pass


def _assoc_wait(assoc: Any, seconds: float) -> None:
    """Sleep up to ``seconds``; return as soon as a DIMSE message is queued.

    Only for an acceptor, whose reactor thread is the queue's one consumer. A
    requestor's messages are taken by the thread that sent the request
    (``get_msg(block=True)``, waiting on the same condition): a ``notify`` that
    woke this loop instead would leave that thread asleep until its DIMSE timeout,
    so a requestor sleeps as written, and the wake-up is passed on whenever a
    message is there (another waiter may want it).
    """
    q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if q is None or not getattr(assoc, "is_acceptor", False):
        time.sleep(seconds)
        return
    with q.not_empty:
        if not q._qsize():  # noqa: SLF001 - the condition's own lock is held
            q.not_empty.wait(seconds)
        if q._qsize():  # noqa: SLF001
            q.not_empty.notify()


class _Clock:
    """The ``time`` module as pynetdicom's DUL and association modules see it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        caller = sys._getframe(1).f_code  # noqa: SLF001 - which loop is asking
        if caller is _DUL_LOOP:
            _dul_wait(threading.current_thread(), seconds)
        elif caller is _ASSOC_LOOP:
            _assoc_wait(threading.current_thread(), seconds)
        else:
            time.sleep(seconds)


#: Guards every wake pipe's write against its close (a closed descriptor's number may be
#: reused at once by another file).
_WAKE_LOCK = threading.Lock()


def _run_reactor(self: DULServiceProvider) -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    self._sidecar_wake = (r, w)  # type: ignore[attr-defined]
    try:
        _original_run(self)
    finally:
        with _WAKE_LOCK:
            self._sidecar_wake = None  # type: ignore[attr-defined]
            os.close(r)
            os.close(w)


def _send_pdu(self: DULServiceProvider, primitive: Any) -> None:
    _original_send(self, primitive)
    with _WAKE_LOCK:
        wake = getattr(self, "_sidecar_wake", None)
        if wake is not None:
            try:
                os.write(wake[1], b"\0")
            except OSError:  # full: already signalled
                pass


def install() -> None:
    """Make this process's pynetdicom reactors wake on work (idempotent)."""
    if DULServiceProvider.run_reactor is _run_reactor:
        return
    clock = _Clock()
    _dul.time = clock  # type: ignore[attr-defined,assignment]
    _association.time = clock  # type: ignore[attr-defined,assignment]
    DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]


__all__ = ["install"]
