"""Similarity queries from receiver processes to the main process.

With ``dicom.receiver_processes`` > 1 every association is served by a child
process, but the index, the embedder and the example images live in the main
process (one copy, kept current by the worker). A child's C-FIND similarity
branch and its example AE title therefore use :class:`QueryClient`, which
sends the request to the main process's :class:`QueryServer` and returns its
answer: the same two methods as :class:`sidecar.search.front.QueryService`
(:class:`sidecar.search.front.SimilarityBackend`).

Transport: ``multiprocessing.connection`` over a Unix socket in a private
directory (mode 0700), authenticated with a random key that the main process
hands to its children (never on a command line). Messages are pickled tuples:

* ``("search", SimilarityRequest, Requester)`` → ``("ok", SearchResult)``
* ``("example", bytes, Requester)`` → ``("ok", ExampleInfo)``
* failures → ``("error", kind, message, state)`` with the kinds of
  each error's ``wire_kind`` (:mod:`sidecar.errors`); the client raises the same
  :class:`sidecar.errors.SearchError` subclass.

Each client thread keeps one connection (pynetdicom runs one thread per
association) and reconnects once when it breaks; the server runs one thread
per connection.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from sidecar.errors import IndexUnavailable, NotEmbedded, SearchError
from sidecar.search.front import (
    ExampleInfo,
    QueryService,
    Requester,
    SimilarityRequest,
    error_from_kind,
    error_kind,
)
from sidecar.search.types import SearchResult

logger = logging.getLogger(__name__)

#: Seconds a client waits for an answer before giving up (the query fails 0xA700).
ANSWER_TIMEOUT = 60.0


class QueryServer:
    """Answers :class:`QueryClient` requests with a :class:`QueryService` (main process).

    Parameters
    ----------
    service
        The process's query service.
    """

    def __init__(self, service: QueryService) -> None:
        self._service = service
        self._dir = Path(tempfile.mkdtemp(prefix="sidecar-query-"))
        os.chmod(self._dir, 0o700)
        self.address = str(self._dir / "query.sock")
        self.authkey = secrets.token_bytes(32)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._closing = threading.Event()
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="query-server", daemon=True)

    def start(self) -> None:
        """Accept connections in a background thread."""
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                logger.warning("query server: a connection failed authentication or broke")
                continue
            except Exception:  # noqa: BLE001 - e.g. AuthenticationError: keep serving
                logger.warning("query server: a connection was refused", exc_info=True)
                continue
            if self._closing.is_set():
                conn.close()
                return
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="query-conn",
                             daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return
                conn.send(self._answer(message))
        except (OSError, ValueError):
            return  # the client went away mid-answer
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _answer(self, message: Any) -> tuple[Any, ...]:
        try:
            op, payload, requester = message
            if op == "search" and isinstance(payload, SimilarityRequest):
                return ("ok", self._service.search(payload, requester))
            if op == "example" and isinstance(payload, bytes):
                return ("ok", self._service.add_example(payload, requester))
            return ("error", "error", f"unknown request {op!r}", "")
        except SearchError as exc:
            state = exc.state if isinstance(exc, NotEmbedded) else ""
            return ("error", error_kind(exc), str(exc), state)
        except Exception as exc:  # noqa: BLE001 - answer the child, never die
            logger.exception("query server: unexpected error")
            return ("error", "error", f"internal error: {exc.__class__.__name__}", "")

    def close(self) -> None:
        """Stop accepting, close every connection and remove the socket."""
        if self._closing.is_set():
            return
        self._closing.set()
        try:  # wake the blocking accept()
            Client(self.address, family="AF_UNIX", authkey=self.authkey).close()
        except Exception:  # noqa: BLE001 - already closed
            pass
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class QueryClient:
    """The similarity backend of a receiver process: forwards to the main process.

    Parameters
    ----------
    address, authkey
        Of the main process's :class:`QueryServer`.
    timeout
        Seconds to wait for an answer.
    """

    def __init__(self, address: str, authkey: bytes, timeout: float = ANSWER_TIMEOUT) -> None:
        self._address = address
        self._authkey = authkey
        self._timeout = timeout
        self._local = threading.local()

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = Client(self._address, family="AF_UNIX", authkey=self._authkey)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn: Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _call(self, message: tuple[Any, ...]) -> Any:
        for attempt in (1, 2):
            try:
                conn = self._connection()
                conn.send(message)
                if not conn.poll(self._timeout):
                    self._drop()
                    raise IndexUnavailable(
                        f"similarity service did not answer within {self._timeout:.0f} s"
                    )
                answer = conn.recv()
                break
            except (EOFError, OSError) as exc:
                self._drop()
                if attempt == 2:
                    raise IndexUnavailable(
                        f"similarity service unreachable ({exc.__class__.__name__})"
                    ) from exc
        if answer[0] == "ok":
            return answer[1]
        _, kind, text, state = answer
        err = error_from_kind(kind, text)
        if isinstance(err, NotEmbedded):
            err.state = state or err.state
        raise err

    def search(self, request: SimilarityRequest, requester: Requester) -> SearchResult:
        """Answer a query in the main process."""
        result = self._call(("search", request, requester))
        if not isinstance(result, SearchResult):
            raise IndexUnavailable("similarity service gave an unexpected answer")
        return result

    def add_example(self, data: bytes, requester: Requester) -> ExampleInfo:
        """Embed and keep an example image in the main process."""
        info = self._call(("example", data, requester))
        if not isinstance(info, ExampleInfo):
            raise IndexUnavailable("similarity service gave an unexpected answer")
        return info

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop()


__all__ = ["ANSWER_TIMEOUT", "QueryClient", "QueryServer"]
