"""The audit trail: a bounded queue, the local append-only file and the syslog collector.

:meth:`AuditTrail.emit` never blocks and never raises: a full queue drops the
message (counted). A writer thread renders the XML, appends each message as
one line to the local file and fsyncs once per batch; a message is *written* (counted in
``sidecar_audit_records_written_total``) only after that fsync. It is then
handed to a sender thread, which retries a collector that is down for
``audit.syslog.retry_seconds`` before dropping (and counting) the message.
Stopping writes everything queued to the file and gives the collector a few
seconds. Why and how: docs/design/audit.md.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sidecar.audit.messages import Event, Source, render
from sidecar.audit.syslog import SyslogSender
from sidecar.metrics import AuditFigures

logger = logging.getLogger(__name__)

_BATCH = 256
_WARN_EVERY = 60.0  # seconds between repeated warnings of one kind


#: One audit message before rendering: the event and who reports it.
Item = tuple[Event, Source]


class Sink(Protocol):
    """Where audit messages go (rendered to XML off the caller's thread)."""

    def emit(self, event: Event, source: Source) -> None:
        """Take one message; never blocks, never raises."""


class Getter(Protocol):
    """A queue messages arrive on from other processes (``multiprocessing.Queue``)."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item; raises :class:`queue.Empty` after ``timeout``."""


class _Warner:
    """Logs one kind of warning at most once a minute (a dead collector is not a log flood)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -_WARN_EVERY) >= _WARN_EVERY:
            self._last[kind] = now
            logger.warning(msg, *args)


class AuditTrail:
    """Records audit messages in a local file and sends them to a syslog collector.

    Parameters
    ----------
    path
        The local append-only file (created 0600, its directory 0700); ``None``: none.
    framer
        Turns the XML into one RFC 5424 message (:func:`sidecar.audit.syslog.frame`).
    sender
        The collector; ``None``: the file only.
    fsync
        fsync the file after each batch.
    queue_size
        Most messages waiting (for the file, and again for the collector).
    retry_seconds
        How long a message is retried while the collector is down.
    """

    def __init__(self, path: Path | None, framer: Callable[[bytes], bytes], *,
                 sender: SyslogSender | None = None, fsync: bool = True,
                 queue_size: int = 10000, retry_seconds: float = 300.0) -> None:
        self.path = path
        self._framer = framer
        self._sender = sender
        self._fsync = fsync
        self._retry = retry_seconds
        self._queue: queue.Queue[Item | None] = queue.Queue(maxsize=queue_size)
        self._outbox: deque[tuple[float, bytes]] = deque()
        self._outbox_max = queue_size
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._warn = _Warner()
        self._fd = -1
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._written = self._file_errors = self._sent = self._send_failures = 0
        self._dropped: dict[str, int] = {"queue_full": 0, "expired": 0, "at_stop": 0}
        self._started = False

    # ----------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Open the file and start the threads."""
        if self._started:
            return
        self._started = True
        if self.path is not None:
            self._open()
        self._spawn(self._write_loop, "audit-writer")
        if self._sender is not None:
            self._spawn(self._send_loop, "audit-sender")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _open(self) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        except OSError as exc:
            self._file_errors += 1
            logger.error("cannot open the audit file %s: %s", self.path, exc.strerror)

    def relay(self, source: Getter) -> None:
        """Take the messages other processes put on ``source`` (until :meth:`stop`)."""

        def loop() -> None:
            while True:
                try:
                    item = source.get(timeout=0.2)
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                except (EOFError, OSError):
                    return
                if isinstance(item, tuple) and len(item) == 2:
                    self.emit(*item)

        self._spawn(loop, "audit-relay")

    def stop(self, timeout: float = 5.0) -> None:
        """Write everything queued, give the collector up to ``timeout`` s, close the file."""
        if not self._started:
            return
        self._closing.set()
        relays = [t for t in self._threads if t.name == "audit-relay"]
        for t in relays:
            t.join(timeout)
        self._queue.put(None)  # blocks only while the writer catches up
        for t in self._threads:
            if t.name == "audit-writer":
                t.join()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.name == "audit-sender":
                t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = len(self._outbox)
            self._outbox.clear()
            self._dropped["at_stop"] += left
        if left:
            logger.warning("%d audit message(s) not delivered to the syslog collector at stop "
                           "(they are in the audit file)", left)
        if self._sender is not None:
            self._sender.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._threads.clear()
        self._started = False

    # ----------------------------------------------------------- emitting
    def emit(self, event: Event, source: Source) -> None:
        """Queue one message; drops and counts it when the queue is full."""
        try:
            self._queue.put_nowait((event, source))
        except queue.Full:
            with self._lock:
                self._dropped["queue_full"] += 1
            self._warn("full", "audit queue full: message dropped (see "
                       "sidecar_audit_messages_dropped_total)")

    # ----------------------------------------------------------- threads
    def _write_loop(self) -> None:
        done = False
        while not done:
            item = self._queue.get()
            batch: list[Item] = []
            while True:
                if item is None:
                    done = True
                else:
                    batch.append(item)
                if done or len(batch) >= _BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._write(batch)
                except Exception:  # noqa: BLE001 - the writer must outlive a bad batch
                    logger.exception("audit writer: %d message(s) lost", len(batch))
                    with self._lock:
                        self._file_errors += 1

    def _reopen_if_moved(self) -> None:
        """Reopen the file when it was renamed or removed (log rotation), or never opened."""
        if self.path is None:
            return
        try:
            moved = self._fd < 0 or os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            moved = True
        except OSError:
            return
        if moved:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                logger.info("audit file %s was moved: writing a new one", self.path)
            self._open()

    def _write(self, batch: list[Item]) -> None:
        self._reopen_if_moved()
        records = []
        for event, source in batch:
            try:
                records.append(self._framer(render(event, source)))
            except Exception:  # noqa: BLE001 - a bad message must not stop the trail
                logger.exception("cannot render the audit message %s", event.event_id.meaning)
        if self._fd >= 0 and records:
            ok = 0
            try:
                for rec in records:
                    os.write(self._fd, rec + b"\n")  # one write per line: whole lines
                    ok += 1
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                with self._lock:
                    self._file_errors += 1
                self._warn("file", "cannot write the audit file %s: %s", self.path, exc.strerror)
            else:
                with self._lock:
                    self._written += ok
        elif self.path is not None and records:
            with self._lock:
                self._file_errors += 1
            self._warn("file", "the audit file %s is not open; messages go to syslog only",
                       self.path)
        if self._sender is None:
            return
        now = time.monotonic()
        with self._cond:
            for rec in records:
                if len(self._outbox) >= self._outbox_max:
                    self._outbox.popleft()
                    self._dropped["queue_full"] += 1
                self._outbox.append((now, rec))
            self._cond.notify()

    def _send_loop(self) -> None:
        assert self._sender is not None
        backoff = 0.1
        while True:
            with self._cond:
                while not self._outbox and not self._closing.is_set():
                    self._cond.wait(1.0)
                if not self._outbox:
                    return
                queued_at, rec = self._outbox[0]
            try:
                self._sender.send(rec)
            except OSError as exc:
                with self._cond:
                    self._send_failures += 1
                    now = time.monotonic()
                    while self._outbox and now - self._outbox[0][0] > self._retry:
                        self._outbox.popleft()
                        self._dropped["expired"] += 1
                self._warn("send", "cannot send audit messages to %s (%s); retrying for %g s",
                           self._sender.target, exc, self._retry)
                if self._closing.wait(backoff):
                    return
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            with self._cond:
                if self._outbox and self._outbox[0][1] is rec:
                    self._outbox.popleft()
                self._sent += 1

    # ----------------------------------------------------------- figures
    def figures(self) -> AuditFigures:
        """The counters now."""
        with self._lock, self._cond:
            return AuditFigures(
                written=self._written, file_errors=self._file_errors, sent=self._sent,
                send_failures=self._send_failures, dropped=dict(self._dropped),
                queue_depth=self._queue.qsize() + len(self._outbox),
                syslog=self._sender is not None,
            )


class ForwardingSink:
    """A receiver process's sink: puts messages on a queue the main process relays."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._warn = _Warner()

    def emit(self, event: Event, source: Source) -> None:
        """Hand one message to the main process; dropped (logged) when its queue is full."""
        try:
            self._target.put_nowait((event, source))
        except (queue.Full, OSError, ValueError) as exc:
            self._warn("forward", "audit message dropped: cannot hand it to the main "
                       "process (%s)", exc.__class__.__name__)


class NullSink:
    """Audit off: messages go nowhere."""

    def emit(self, event: Event, source: Source) -> None:
        """Discard the message."""
