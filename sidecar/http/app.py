"""The HTTP API: similarity search, health and Prometheus metrics (FastAPI on uvicorn).

Off by default (``http.enabled``); when on it listens on loopback unless
``http.allow_remote``. Bearer tokens and the scope of each route:
``sidecar.http.auth`` (``http.auth``, ``http.metrics_auth``); HTTPS and
client certificates: ``sidecar.http.tls`` (``http.tls``).

Routes, answers, error kinds and logging: docs/http-api.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import threading
import time
import zipfile
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from io import BytesIO
from typing import Annotated, Any, Final

import uvicorn
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydicom import dcmread
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from sidecar.audit.events import Auditor
from sidecar.config import HttpConfig
from sidecar.errors import BadQuery, NotEmbedded, SearchError, SidecarError
from sidecar.http.auth import Access, SecurityEventHandler, log_security_event
from sidecar.http.clients import audit_keys as _audit_keys
from sidecar.http.clients import requester as _requester
from sidecar.http.sessions import Sessions
from sidecar.http.tls import server_context
from sidecar.http.tokens import TokenStore
from sidecar.metrics import CONTENT_TYPE, Metrics
from sidecar.search.front import QueryService, Requester, SimilarityRequest
from sidecar.search.types import Level, Reference, SearchFilters, SearchResult

logger = logging.getLogger(__name__)

#: Content types accepted for the body of ``POST /v1/search`` (besides none at all):
#: form-urlencoded is what curl ``--data-binary`` and urllib send by default.
DICOM_CONTENT_TYPES: Final = frozenset(
    {"application/dicom", "application/octet-stream", "application/x-www-form-urlencoded"}
)
_FILTER_PARAMS: Final = frozenset(
    {"k", "level", "include_same_patient", "modality", "study_date", "body_part"}
)
_SIMILAR_PARAMS: Final = _FILTER_PARAMS | {"instance", "series", "study"}
_ROUTES_HINT: Final = (
    "the API has GET /v1/similar, POST /v1/search, GET /healthz and GET /metrics"
)
#: A body refused before it was read is still read and dropped, up to this many bytes...
DRAIN_BYTES: Final = 256 * 1024 * 1024
#: ... and for at most this many seconds, so that the client gets the answer (see ``_Guard``).
DRAIN_SECONDS: Final = 10.0
_STARTUP_TIMEOUT: Final = 15.0
_GRACEFUL_SHUTDOWN: Final = 5


class HttpServerError(SidecarError):
    """The HTTP API could not start (address in use, not permitted, start-up failed)."""


class _BodyError(Exception):
    """A POST body refused before any query: status, kind and message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        self.status = status
        self.kind = kind
        super().__init__(message)


# --------------------------------------------------------------------- errors
def error_response(
    status: int, kind: str, message: str, *, headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The JSON error answer ``{"error": {"kind": ..., "message": ..., **extra}}``.

    Parameters
    ----------
    status
        HTTP status code.
    kind
        Short machine-readable error kind.
    message
        What went wrong, for a person.
    headers
        Extra response headers (e.g. ``Allow``).
    **extra
        More fields of the error object (JSON-ready).

    Returns
    -------
    JSONResponse
        The answer.
    """
    body = {"error": {"kind": kind, "message": message, **extra}}
    return JSONResponse(body, status_code=status, headers=headers)


def _search_error_response(exc: SearchError) -> JSONResponse:
    status, kind = exc.http_status, exc.wire_kind
    if status == 500:  # a SearchError of no known kind: nothing to tell the client
        logger.error("HTTP API: search failed with an error of no known kind: %s", exc)
        return error_response(500, "internal", "internal error (see the sidecar's log)")
    if isinstance(exc, NotEmbedded):
        return error_response(status, kind, str(exc), state=exc.state, counts=dict(exc.counts))
    return error_response(status, kind, str(exc))


def _validation_message(exc: RequestValidationError) -> str:
    parts: list[str] = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where = loc[0] if loc else "request"
        name = ".".join(loc[1:]) if len(loc) > 1 else ""
        what = f"{where} parameter {name!r}" if name else where
        parts.append(f"{what}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _on_search_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SearchError)  # registered for SearchError only
    return _search_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # registered for it only
    return error_response(400, "bad_query", _validation_message(exc))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)  # registered for it only
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 404:
        return error_response(404, "not_found",
                              f"no route {request.url.path}: {_ROUTES_HINT}", headers=headers)
    if exc.status_code == 405:
        return error_response(
            405, "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}", headers=headers,
        )
    return error_response(exc.status_code, "http_error", str(exc.detail), headers=headers)


async def _on_body_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _BodyError)  # registered for it only
    return error_response(exc.status, exc.kind, str(exc))


def _has_body(scope: Scope) -> bool:
    headers = {k.lower(): v for k, v in scope.get("headers", [])}
    length = headers.get(b"content-length", b"").strip()
    return (length.isdigit() and int(length) > 0) or b"transfer-encoding" in headers


async def _drain(receive: Receive) -> None:
    """Read and drop what is left of a request body (within the drain budget)."""
    drained = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while drained <= DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


class _Guard:
    """Outermost own middleware: bare 500s, "lingering" answers, DEBUG request log.

    * Errors with a handler (search errors, validation, HTTP exceptions) never
      get here. Anything else is logged with ``logger.exception`` and
      answered ``{"error": {"kind": "internal", ...}}`` without detail; it is
      not raised further, so uvicorn does not log it a second time.
    * An answer given before the request body was read to its end (413, 415,
      a parameter error on ``POST /v1/search``) is sent only once the rest of
      the body has been read and dropped (at most :data:`DRAIN_BYTES` more,
      for at most :data:`DRAIN_SECONDS`): uvicorn closes such a connection,
      and a client still sending would see a reset instead of the answer
      (the "lingering close" of other web servers). A client that waits for
      ``100 Continue`` and was sent nothing yet is answered at once.
    * Each request is logged at DEBUG: method, path (never the query
      string), status and duration.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        pending = _has_body(scope)  # body bytes the client may still be sending
        expects_continue = any(k.lower() == b"expect" and v.lower() == b"100-continue"
                               for k, v in scope.get("headers", []))
        asked = False

        async def tracked_receive() -> Message:
            nonlocal pending, asked
            asked = True
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                pending = False
            return message

        async def watch(message: Message) -> None:
            nonlocal status, pending
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if pending and (asked or not expects_continue):
                    await _drain(receive)
                pending = False
            await send(message)

        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        try:
            await self.app(scope, tracked_receive, watch)
        except Exception:
            logger.exception("HTTP API: unexpected error answering %s %s", method, path)
            if status == 0:
                response = error_response(500, "internal",
                                          "internal error (see the sidecar's log)")
                await response(scope, tracked_receive, watch)
        finally:
            logger.debug("HTTP %s %s -> %d (%.1f ms)", method, path, status,
                         (time.perf_counter() - start) * 1000.0)


# ---------------------------------------------------------------- parameters
def _reject_unknown(request: Request, known: frozenset[str]) -> None:
    unknown = sorted(set(request.query_params.keys()) - known)
    if unknown:
        raise BadQuery(
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; known: {', '.join(sorted(known))}"
        )


def _filters(modality: Sequence[str], study_date: str, body_part: str) -> SearchFilters:
    return SearchFilters(modalities=tuple(modality), study_date=study_date, body_part=body_part)


def _single_param(request: Request, names: Sequence[str]) -> None:
    for name in names:
        if len(request.query_params.getlist(name)) > 1:
            raise BadQuery(f"query parameter {name!r} is given more than once")


K = Annotated[int | None, Query(ge=1, description="Most hits (default query.default_k).")]
LevelParam = Annotated[Level, Query(description="Rank level: study, series or image.")]
SamePatient = Annotated[bool, Query(description="Keep the other studies of the patient.")]
Modality = Annotated[list[str], Query(description="Any of these modalities (repeat, or CT\\MR).")]
StudyDate = Annotated[str, Query(description="StudyDate: YYYYMMDD, A-B, A- or -B.")]
BodyPart = Annotated[str, Query(description="BodyPartExamined, * and ? wildcards.")]


# ----------------------------------------------------------------------- body
def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or :class:`_BodyError` 413 as soon as it exceeds ``limit`` bytes.

    A declared Content-Length over the limit is refused before reading; the
    rest of a refused body is dropped by :class:`_Guard` before the answer.
    """
    too_large = _BodyError(
        413, "payload_too_large",
        f"the DICOM file is larger than the limit of {limit // (1024 * 1024)} MiB "
        "(http.max_upload_mb)",
    )
    declared = request.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:  # h11 has checked its syntax
        raise too_large
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_dicom(body: bytes) -> Dataset:
    """The body as a dataset (every element decoded), or :class:`_BodyError` 400."""
    if not body:
        raise _BodyError(400, "not_dicom",
                         "the request body is empty: send one DICOM file as the body")
    try:
        ds = dcmread(BytesIO(body), force=True)
        for _ in ds:  # decode every element now: a broken file fails here, not later
            pass
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, the body is not DICOM
        raise _BodyError(400, "not_dicom",
                         f"the request body cannot be read as DICOM: {exc}") from exc
    if not any(tag in ds for tag in ("SOPClassUID", "SOPInstanceUID", "PixelData")):
        raise _BodyError(
            400, "not_dicom",
            "the request body is not a DICOM file (no SOP Class UID, SOP Instance UID or "
            "Pixel Data)",
        )
    return ds


ZIP_CONTENT_TYPES: Final = frozenset({"application/zip", "application/x-zip-compressed"})


def _parse_zip(body: bytes, limit: int) -> list[Dataset]:
    """Every DICOM file of a zip archive (a whole series as the query); others are skipped."""
    try:
        archive = zipfile.ZipFile(BytesIO(body))
        members = [m for m in archive.infolist() if not m.is_dir()]
        if sum(m.file_size for m in members) > 8 * limit:
            raise _BodyError(413, "payload_too_large", "the zip archive expands to more than "
                             "8 times http.max_upload_mb")
        found = []
        for member in members:
            try:
                found.append(_parse_dicom(archive.read(member)))
            except _BodyError:
                continue
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise _BodyError(400, "not_zip", f"the request body cannot be read as zip: {exc}") from exc
    if not found:
        raise _BodyError(400, "not_dicom", "the zip archive holds no DICOM file")
    return found


# ------------------------------------------------------------------------ app
def create_app(
    query: QueryService,
    metrics: Metrics,
    health: Callable[[], dict[str, Any]],
    *,
    max_upload_mb: int = 64,
    tokens: TokenStore | None = None,
    http_config: HttpConfig | None = None,
    on_security_event: SecurityEventHandler = log_security_event,
    auditor: Auditor | None = None,
    routers: Sequence[APIRouter] = (),
    sessions: Sessions | None = None,
) -> FastAPI:
    """The FastAPI application of the HTTP API (see the module notes for the routes).

    Parameters
    ----------
    query
        Answers (and audits, and measures) every similarity query.
    metrics
        Rendered by ``GET /metrics``.
    health
        Called by ``GET /healthz`` (in a worker thread): returns a dict with
        at least ``"ok": bool``; every other key is a JSON-ready detail (for
        instance ``{"ok": True, "dicom": "listening", "worker": "running",
        "index_vectors": 1234}``) copied into the answer beside
        ``"status"``. A health callable that raises counts as unhealthy.
    max_upload_mb
        Largest body of ``POST /v1/search``, in MiB (``http.max_upload_mb``).
    tokens
        The catalogue's bearer tokens: with them, each route asks what
        ``http_config`` says (:class:`~sidecar.http.auth.Access`); without,
        nothing is asked (tests of the routes themselves).
    http_config
        The ``http`` section (``auth``, ``metrics_auth``, ``bind_address``).
    on_security_event
        Called for every refused token or missing scope: ``(kind, token_name,
        remote, path)``; the default logs a WARNING.
    routers
        More routes served beside the API (the page: ``sidecar.http.ui``).
    sessions
        The page's sign-in sessions (``sidecar.http.sessions``), honoured under ``/ui``.

    Returns
    -------
    FastAPI
        The application, ready for :class:`HttpServer` (or any ASGI server).
    """
    limit = max_upload_mb * 1024 * 1024
    app = FastAPI(
        title="pacs-sidecar",
        summary="Similarity search beside a PACS",
        docs_url=None,  # the Swagger UI loads its scripts from a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.add_exception_handler(SearchError, _on_search_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(_BodyError, _on_body_error)
    if tokens is not None:  # inside _Guard: a refused body is still drained there
        app.add_middleware(Access, config=http_config or HttpConfig.model_validate({}),
                           tokens=tokens, on_security_event=on_security_event, sessions=sessions)
    app.add_middleware(_Guard)

    def answer(request: SimilarityRequest, requester: Requester, path: str) -> JSONResponse:
        try:
            result: SearchResult = query.search(request, requester)
        except SearchError as exc:
            if auditor is not None:
                auditor.http_query(requester.name, requester.address, _audit_keys(request),
                                   results=0, ok=False, path=path, description=str(exc))
            raise
        if auditor is not None:
            auditor.http_query(requester.name, requester.address, _audit_keys(request),
                               results=len(result.hits), path=path)
        return JSONResponse(result.to_dict())

    @app.get("/v1/similar", summary="Studies, series or images similar to an archived one")
    def similar(
        request: Request,
        instance: Annotated[str | None, Query(description="SOP Instance UID.")] = None,
        series: Annotated[str | None, Query(description="Series Instance UID.")] = None,
        study: Annotated[str | None, Query(description="Study Instance UID.")] = None,
        k: K = None,
        level: LevelParam = "study",
        include_same_patient: SamePatient = False,
        modality: Modality = [],  # noqa: B006 - FastAPI copies defaults
        study_date: StudyDate = "",
        body_part: BodyPart = "",
    ) -> JSONResponse:
        """Query by an archived instance, series or study (exactly one)."""
        _reject_unknown(request, _SIMILAR_PARAMS)
        _single_param(request, ("instance", "series", "study", "k", "level", "study_date",
                                "body_part", "include_same_patient"))
        reference = Reference(sop_instance_uid=instance, series_instance_uid=series,
                              study_instance_uid=study)
        return answer(
            SimilarityRequest(reference, k=k, level=level,
                              include_same_patient=include_same_patient,
                              filters=_filters(modality, study_date, body_part)),
            _requester(request), "/v1/similar",
        )

    @app.post("/v1/search", summary="Studies, series or images similar to a DICOM file")
    async def search_by_image(
        request: Request,
        k: K = None,
        level: LevelParam = "study",
        include_same_patient: SamePatient = False,
        modality: Modality = [],  # noqa: B006 - FastAPI copies defaults
        study_date: StudyDate = "",
        body_part: BodyPart = "",
    ) -> JSONResponse:
        """Query by one DICOM file, or a zip of a series, sent as the raw request body."""
        _reject_unknown(request, _FILTER_PARAMS)
        _single_param(request, ("k", "level", "study_date", "body_part",
                                "include_same_patient"))
        ctype = _content_type(request)
        if ctype and ctype not in DICOM_CONTENT_TYPES | ZIP_CONTENT_TYPES:
            raise _BodyError(415, "unsupported_media_type", f"Content-Type {ctype} is not "
                             "accepted: send one DICOM file (application/dicom) or a zip of a "
                             "series' files (application/zip) as the raw body, no multipart form")
        body = await _read_body(request, limit)
        filters = _filters(modality, study_date, body_part)
        requester = _requester(request)

        def run() -> JSONResponse:
            datasets = (_parse_zip(body, limit) if ctype in ZIP_CONTENT_TYPES
                        else [_parse_dicom(body)])
            return answer(
                SimilarityRequest(Reference.images(datasets), k=k, level=level,
                                  include_same_patient=include_same_patient, filters=filters),
                requester, "/v1/search",
            )

        return await run_in_threadpool(run)

    @app.get("/healthz", summary="Health of the sidecar")
    def healthz() -> JSONResponse:
        """200 when the health callable says ok, else 503."""
        try:
            details = dict(health())
            ok = bool(details.pop("ok", False))
            report: dict[str, Any] = jsonable_encoder(details)
        except Exception:  # noqa: BLE001 - a failing check means unhealthy, not a 500
            logger.exception("HTTP API: the health check failed")
            report, ok = {"error": "the health check failed (see the sidecar's log)"}, False
        body = {"status": "ok" if ok else "unhealthy", **report}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    def prometheus() -> Response:
        """The Prometheus text exposition."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    for router in routers:
        app.include_router(router)
    return app


# --------------------------------------------------------------------- server
class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol with its access log off for good.

    uvicorn logs the request line (query string and its UIDs included) at
    INFO whenever the ``uvicorn.access`` logger has a handler anywhere up its
    chain, whatever ``access_log=False`` did to it at start-up; requests are
    logged by :class:`_Guard` at DEBUG instead.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.access_log = False


class _Server(uvicorn.Server):
    """A uvicorn server that never touches signal handlers (``sidecar serve`` owns them)."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections
    # only when the listening socket says it is TCP; without it every
    # keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HttpServerError(
            f"the HTTP API cannot listen on {host}:{port}: {exc.strerror or exc} "
            "(http.bind_address, http.port)"
        ) from exc
    sock.setblocking(False)
    return sock


class HttpServer:
    """The HTTP API served by uvicorn in a daemon thread.

    The listening socket is bound in :meth:`start` itself, so an address in
    use is reported there at once. uvicorn runs with its own event loop in
    the thread, without signal handlers, logging configuration or access log
    (see the module notes). Client addresses are taken from
    ``X-Forwarded-For`` only when the connection comes from loopback (a
    local reverse proxy).

    Parameters
    ----------
    config
        The ``http`` section (``bind_address`` and ``port``; port 0 picks a free port;
        ``tls``: HTTPS, its files loaded here).
    app
        The ASGI application (:func:`create_app`).

    Raises
    ------
    ConfigError
        ``http.tls`` is on and one of its files is missing or unusable.
    """

    def __init__(self, config: HttpConfig, app: ASGIApp) -> None:
        self._config = config
        self._app = app
        self._tls = server_context(config.tls) if config.tls.enabled else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.address: tuple[str, int] | None = None

    def start(self) -> tuple[str, int]:
        """Listen and serve; returns the bound ``(host, port)`` once requests are accepted.

        Raises
        ------
        HttpServerError
            The address cannot be bound (in use, not permitted), or the server
            did not start within 15 s, or it is already running.
        """
        if self._thread is not None:
            raise HttpServerError("the HTTP API is already running")
        cfg = self._config
        sock = _bind(cfg.bind_address, cfg.port)
        host, port = sock.getsockname()[:2]
        uv_config = uvicorn.Config(
            self._app,
            host=host,
            port=port,
            loop="asyncio",
            http=_H11Protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1,::1",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN,
            ssl_context_factory=self._ssl_context if self._tls is not None else None,
        )
        server = _Server(uv_config)
        self._server = server
        self._failure = None
        thread = threading.Thread(target=self._run, args=(server, sock), name="sidecar-http",
                                  daemon=True)
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                thread.join(timeout=_GRACEFUL_SHUTDOWN + 2)
                self._thread = self._server = None
                sock.close()
                why = f": {self._failure}" if self._failure is not None else ""
                raise HttpServerError(f"the HTTP API did not start on {host}:{port}{why}")
            time.sleep(0.01)
        self.address = (str(host), int(port))
        logger.info("HTTP API listening on %s://%s:%d", self.scheme, *self._url_parts(host, port))
        return self.address

    @property
    def scheme(self) -> str:
        """``https`` with ``http.tls``, else ``http``."""
        return "https" if self._tls is not None else "http"

    def _ssl_context(self, _config: uvicorn.Config,
                     _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        assert self._tls is not None  # only handed to uvicorn with TLS on
        return self._tls

    @staticmethod
    def _url_parts(host: str, port: int) -> tuple[str, int]:
        return (f"[{host}]" if ":" in host else host), port

    def _run(self, server: _Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - SystemExit on start-up failure too
            self._failure = exc
            logger.error("HTTP API server stopped with an error: %r", exc)

    @property
    def running(self) -> bool:
        """Whether the server thread is serving."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, let requests in progress finish (up to 5 s), join the thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=_GRACEFUL_SHUTDOWN + 5)
        if thread.is_alive():
            logger.warning("HTTP API did not stop in time: closing its connections")
            server.force_exit = True
            thread.join(timeout=5)
        self._server = self._thread = None
        logger.info("HTTP API stopped")


__all__ = [
    "DICOM_CONTENT_TYPES",
    "HttpServer",
    "HttpServerError",
    "create_app",
    "error_response",
]
