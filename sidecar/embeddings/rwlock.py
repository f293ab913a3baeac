"""A writer-preferring readers-writer lock (the vector index's one lock)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ReadWriteLock:
    """A writer-preferring readers-writer lock (not re-entrant).

    Many readers may hold it together; a writer holds it alone. Once a writer
    waits, new readers wait too, so a stream of readers cannot starve writers.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self, timeout: float | None = None) -> bool:
        """Take a shared hold; ``False`` when ``timeout`` (seconds) ran out."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: not self._writer and self._waiting_writers == 0, timeout
            )
            if ok:
                self._readers += 1
            return ok

    def release_read(self) -> None:
        """Give back a shared hold."""
        with self._cond:
            if self._readers <= 0:
                raise RuntimeError("release_read without a read hold")
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self, timeout: float | None = None) -> bool:
        """Take the exclusive hold; ``False`` when ``timeout`` (seconds) ran out."""
        with self._cond:
            self._waiting_writers += 1
            ok = False
            try:
                ok = self._cond.wait_for(lambda: not self._writer and self._readers == 0, timeout)
                if ok:
                    self._writer = True
            finally:
                self._waiting_writers -= 1
                if not ok:
                    self._cond.notify_all()  # readers held back by this writer may go
            return ok

    def release_write(self) -> None:
        """Give back the exclusive hold."""
        with self._cond:
            if not self._writer:
                raise RuntimeError("release_write without the write hold")
            self._writer = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared for the ``with`` block."""
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively for the ``with`` block."""
        self.acquire_write()
        try:
            yield
        finally:
            self.release_write()

    def state(self) -> tuple[int, bool, int]:
        """``(readers, writer held, writers waiting)``, for tests and diagnostics."""
        with self._cond:
            return self._readers, self._writer, self._waiting_writers
