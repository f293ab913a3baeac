"""The page for radiologists: find a study, see its similar studies and why they matched.

Server-rendered Jinja2 templates (autoescape on: every DICOM value is text), one small
CSS and one small script served from the package (no CDN, no build step); routes
under ``/ui/`` (docs/http-api.md). Every route hangs off one :class:`fastapi.APIRouter`
made by :func:`create_ui_router`, whose ``dependencies`` apply to all of them (the
place where authentication plugs in). Similarity queries go through the same
:class:`~sidecar.search.front.QueryService` as HTTP and C-FIND (audited alike).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from pydicom import dcmread
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from sidecar.audit.events import Auditor
from sidecar.config import Config
from sidecar.db.types import Engine
from sidecar.db.ui_queries import SliceRef, StudyDetail, UiQueries
from sidecar.errors import BadQuery, NotEmbedded, SearchError
from sidecar.http.clients import audit_keys
from sidecar.http.clients import requester as requester_of
from sidecar.http.sessions import Sessions
from sidecar.http.signin import add_signin_routes
from sidecar.http.thumbnails import Thumb, Thumbnails
from sidecar.search.caches import spread
from sidecar.search.front import QueryService, Requester, SimilarityRequest
from sidecar.search.readonly import EmbeddingParts
from sidecar.search.types import (
    LEVELS,
    Hit,
    Level,
    Reference,
    SearchFilters,
    SearchResult,
    clean_uid,
)

logger = logging.getLogger(__name__)

_HERE: Final = Path(__file__).parent
KEY_SLICES: Final = 6
"""Thumbnails shown of the study itself (evenly spread over its embedded slices)."""
STATIC: Final = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
#: The page loads nothing from elsewhere and runs no inline script.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
THUMB_CACHE_CONTROL: Final = "private, max-age=86400"
STATIC_CACHE_CONTROL: Final = "private, max-age=3600"


@dataclass(frozen=True)
class Picture:
    """One thumbnail on a page: its URL (or "" when it cannot be rendered), window, alt text."""

    url: str
    window: str
    alt: str


@dataclass(frozen=True)
class Options:
    """The page's filters, checked (from the query string)."""

    k: int
    level: Level
    same_patient: bool
    modality: str
    date_from: str
    date_to: str
    body_part: str

    def request(self, reference: Reference) -> SimilarityRequest:
        dates = f"{self.date_from}-{self.date_to}" if self.date_from or self.date_to else ""
        return SimilarityRequest(
            reference, k=self.k, level=self.level, include_same_patient=self.same_patient,
            filters=SearchFilters(modalities=(self.modality,) if self.modality else (),
                                  study_date=dates, body_part=self.body_part),
        )

    def query_string(self) -> str:
        params: dict[str, str] = {"k": str(self.k), "level": self.level}
        if self.same_patient:
            params["same_patient"] = "1"
        for name in ("modality", "date_from", "date_to", "body_part"):
            if value := getattr(self, name):
                params[name] = value
        return urlencode(params)


def _date(value: str, name: str) -> str:
    text = value.strip().replace("-", "")
    if text and (len(text) != 8 or not text.isdigit()):
        raise BadQuery(f"{name} {value!r} is not a date YYYYMMDD")
    if text:
        try:
            SearchFilters(study_date=text).catalogue()
        except BadQuery as exc:
            raise BadQuery(f"{name} {value!r} is not a date YYYYMMDD") from exc
    return text


def options(request: Request, default_k: int, max_k: int) -> Options:
    """The filters of a page request; :class:`BadQuery` names a bad one."""
    q = request.query_params
    raw_k = q.get("k", "").strip() or str(default_k)
    if not raw_k.isdigit() or not 1 <= int(raw_k) <= max_k:
        raise BadQuery(f"top-K {raw_k!r} must be a number from 1 to {max_k}")
    level = q.get("level", "study").strip() or "study"
    if level not in LEVELS:
        raise BadQuery(f"level {level!r} must be one of {', '.join(LEVELS)}")
    checked: Level = "study" if level == "study" else "series" if level == "series" else "image"
    date_from = _date(q.get("date_from", ""), "date from")
    date_to = _date(q.get("date_to", ""), "date to")
    if date_from and date_to and date_from > date_to:
        raise BadQuery(f"the date range {date_from}-{date_to} ends before it starts")
    modality = q.get("modality", "").strip().upper()
    body_part = q.get("body_part", "").strip()
    opts = Options(int(raw_k), checked, q.get("same_patient", "") in ("1", "on", "true"),
                   modality, date_from, date_to, body_part)
    opts.request(Reference.study("1.2")).filters.catalogue()  # checks modality, body part
    return opts


def _display_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value


class Pages:
    """What the routes share: templates, catalogue reads, thumbnails, the query front."""

    def __init__(self, config: Config, engine: Engine, query: QueryService,
                 embedding: EmbeddingParts | None, auditor: Auditor | None = None, *,
                 signed: bool = False) -> None:
        self.cfg = config
        self.signed = signed  # sign-in sessions: the header offers "Sign out"
        self.query = query
        self.auditor = auditor
        self.embedding = embedding
        self.uiq = UiQueries(engine)
        self.thumbs = Thumbnails(config, self.uiq, self.shape)
        self.env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True,
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters["date"] = _display_date
        self.static = {name: (_HERE / "static" / name).read_bytes() for name in STATIC}
        self.static_etags = {n: hashlib.sha256(b).hexdigest()[:16] for n, b in self.static.items()}

    def shape(self) -> tuple[int, int]:
        """The serving embedder's (input size, channels); the configured size without one."""
        embedder = self.embedding.embedder if self.embedding is not None else None
        if embedder is not None:
            return int(embedder.input_size), int(embedder.channels)
        return self.cfg.embedding.input_size, 1

    def model_id(self) -> str | None:
        return self.embedding.serving.model_id if self.embedding is not None else None

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(
            static=self.static_etags, retrieve_ae=self.cfg.dicom.effective_retrieve_ae_title,
            **{"signed": self.signed, **context})
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def problem(self, status: int, title: str, message: str) -> HTMLResponse:
        return self.render("problem.html", status, title=title, message=message)

    def viewer(self, study_uid: str) -> str:
        template = self.cfg.ui.viewer_url
        return template.format(study=study_uid) if template else ""

    def pictures(self, wanted: Sequence[tuple[str, int, str]]) -> dict[tuple[str, int], Picture]:
        """Thumbnails of (SOP Instance UID, frame, alt text), rendered and cached as needed."""
        files = self.uiq.instance_files(sop for sop, _, _ in wanted)
        out: dict[tuple[str, int], Picture] = {}
        for sop, frame, alt in wanted:
            if (sop, frame) in out:
                continue
            thumb: Thumb | None = self.thumbs.get(sop, frame, files=files)
            out[(sop, frame)] = Picture(
                f"/ui/thumbnails/{sop}/{frame}.png" if thumb else "",
                thumb.window if thumb else "", alt)
        return out

    def hits_context(self, result: SearchResult | None, error: str,
                     example: bool = False) -> dict[str, Any]:
        hits: Sequence[Hit] = result.hits if result is not None else ()
        wanted: list[tuple[str, int, str]] = []
        for hit in hits:
            if hit.match is None:
                continue
            m = hit.match
            wanted.append((m.hit_sop_instance_uid, m.hit_frame,
                           f"rank {hit.rank}: best-matching slice of the similar study "
                           f"(frame {m.hit_frame + 1})"))
            if m.query_sop_instance_uid and m.query_frame is not None:
                wanted.append((m.query_sop_instance_uid, m.query_frame,
                               f"rank {hit.rank}: the slice of this study it matched "
                               f"(query slice {m.query_slice + 1})"))
        return {"hits": hits, "result": result, "error": error, "example": example,
                "pictures": self.pictures(wanted), "viewer": self.viewer}

    def search(self, request: SimilarityRequest, requester: Requester, path: str
               ) -> tuple[SearchResult | None, str, int]:
        """Answer (audited as the API's searches are), or the error's message and status."""
        try:
            result = self.query.search(request, requester)
        except SearchError as exc:
            if self.auditor is not None:
                self.auditor.http_query(requester.name, requester.address, audit_keys(request),
                                        results=0, ok=False, path=path, description=str(exc))
            if isinstance(exc, NotEmbedded):
                return None, f"No similar studies yet: {exc}", 200
            return None, str(exc), exc.http_status
        if self.auditor is not None:
            self.auditor.http_query(requester.name, requester.address, audit_keys(request),
                                    results=len(result.hits), path=path)
        return result, "", 200

    def study_page(self, detail: StudyDetail, opts: Options, requester: Requester,
                   fragment: bool, path: str) -> HTMLResponse:
        uid = detail.study.study_instance_uid
        result, error, status = self.search(opts.request(Reference.study(uid)), requester, path)
        context = self.hits_context(result, error)
        if fragment:
            return self.render("hits.html", status if error else 200, **context)
        slices: list[SliceRef] = self.uiq.study_slices(uid, self.model_id())
        keys = [slices[i] for i in spread(len(slices), KEY_SLICES)]
        pictures = self.pictures([(s.sop_instance_uid, s.frame,
                                   f"key slice {i + 1} of this study (frame {s.frame + 1})")
                                  for i, s in enumerate(keys)])
        context["pictures"].update(pictures)
        return self.render("study.html", detail=detail, keys=keys, opts=opts,
                           max_k=self.cfg.query.max_k, levels=LEVELS,
                           query_string=opts.query_string(), **context)


async def _body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise BadQuery(f"the DICOM file is larger than the limit of {limit // 1048576} MiB "
                           "(http.max_upload_mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def _dataset(body: bytes) -> Dataset:
    if not body:
        raise BadQuery("no file: drop one DICOM file")
    try:
        ds = dcmread(BytesIO(body), force=True)
        for _ in ds:
            pass
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, it is not DICOM
        raise BadQuery(f"the file cannot be read as DICOM: {exc}") from exc
    if "PixelData" not in ds:
        raise BadQuery("the file is not a DICOM image (no Pixel Data)")
    return ds


def create_ui_router(
    config: Config,
    engine: Engine,
    query: QueryService,
    embedding: EmbeddingParts | None,
    *,
    auditor: Auditor | None = None,
    dependencies: Sequence[Callable[..., Any]] = (),
    sessions: Sessions | None = None,
    on_security_event: Callable[[str, str | None, str, str], None] | None = None,
) -> APIRouter:
    """The page's routes under ``/ui`` (docs/http-api.md).

    Parameters
    ----------
    config
        ``ui``, ``query`` (default and most K), ``dicom`` (RetrieveAETitle),
        ``http.max_upload_mb``, storage and pre-processing settings.
    engine
        The process's engine (read only).
    query
        The query front (the same as the JSON API's).
    embedding
        The embedding parts (serving model and embedder: thumbnails use its
        input size and channels); ``None`` when embedding is off.
    auditor
        The DICOM audit trail: each search of the page is a Query message, as
        the API's (``path`` the page's route).
    dependencies
        FastAPI dependencies run before every route of the page (e.g. the
        HTTP API's authentication): the one place to add them.
    sessions, on_security_event
        With tokens required: the sign-in sessions (``/ui/login``, ``/ui/logout``,
        :mod:`sidecar.http.signin`) and where a refused sign-in is reported.
    """
    pages = Pages(config, engine, query, embedding, auditor, signed=sessions is not None)
    router = APIRouter(prefix="/ui", dependencies=[Depends(d) for d in dependencies],
                       include_in_schema=False)
    qcfg = config.query
    limit = config.http.max_upload_mb * 1024 * 1024
    if sessions is not None:
        add_signin_routes(router, pages, sessions, auditor=auditor, on_failure=on_security_event)

    @router.get("")
    def root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/")
    def index(request: Request) -> HTMLResponse:
        q = request.query_params
        asked = any(q.get(n, "").strip() for n in
                    ("patient_id", "accession_number", "study_uid", "date_from", "date_to",
                     "modality"))
        form = {n: q.get(n, "").strip() for n in
                ("patient_id", "accession_number", "study_uid", "date_from", "date_to",
                 "modality")}
        studies: list[Any] = []
        more, error = False, ""
        if asked:
            try:
                uid = clean_uid(form["study_uid"], "Study Instance UID") or ""
                low = _date(form["date_from"], "date from") or None
                high = _date(form["date_to"], "date to") or None
                modality = form["modality"].upper()
                if modality and not modality.replace("_", "").isalnum():
                    raise BadQuery(f"Modality {form['modality']!r} is not a DICOM code string")
                studies, more = pages.uiq.find_studies(
                    patient_id=form["patient_id"], accession_number=form["accession_number"],
                    study_uid=uid, date_from=low, date_to=high, modality=modality)
            except BadQuery as exc:
                error = str(exc)
        return pages.render("index.html", 400 if error else 200, form=form, asked=asked,
                            studies=studies, more=more, error=error, max_k=qcfg.max_k,
                            default_k=qcfg.default_k, levels=LEVELS)

    @router.post("/search")
    async def by_example(request: Request) -> HTMLResponse:
        requester = requester_of(request)
        try:
            opts = options(request, qcfg.default_k, qcfg.max_k)
            body = await _body(request, limit)
        except BadQuery as exc:
            return pages.render("hits.html", 400, **pages.hits_context(None, str(exc), True))

        def run() -> HTMLResponse:
            try:
                reference = Reference.images([_dataset(body)])
            except BadQuery as exc:
                return pages.render("hits.html", 400, **pages.hits_context(None, str(exc), True))
            result, error, status = pages.search(opts.request(reference), requester,
                                                 "/ui/search")
            return pages.render("hits.html", status if error else 200,
                                **pages.hits_context(result, error, True))

        return await run_in_threadpool(run)

    def study_route(request: Request, study_uid: str, fragment: bool) -> HTMLResponse:
        try:
            uid = clean_uid(study_uid, "Study Instance UID")
        except BadQuery as exc:
            return pages.problem(404, "No such study", str(exc))
        detail = pages.uiq.study(uid or "")
        if detail is None:
            return pages.problem(404, "No such study",
                                 f"No study with Study Instance UID {study_uid} has been received.")
        try:
            opts = options(request, qcfg.default_k, qcfg.max_k)
        except BadQuery as exc:
            if fragment:
                return pages.render("hits.html", 400, **pages.hits_context(None, str(exc)))
            return pages.problem(400, "Bad filter", str(exc))
        return pages.study_page(detail, opts, requester_of(request), fragment,
                                request.url.path)

    @router.get("/studies/{study_uid}")
    def study(request: Request, study_uid: str) -> HTMLResponse:
        return study_route(request, study_uid, False)

    @router.get("/studies/{study_uid}/hits")
    def hits(request: Request, study_uid: str) -> HTMLResponse:
        return study_route(request, study_uid, True)

    @router.get("/thumbnails/{sop}/{frame}.png")
    def thumbnail(request: Request, sop: str, frame: str) -> Response:
        try:
            uid = clean_uid(sop, "SOP Instance UID")
        except BadQuery as exc:
            return pages.problem(404, "No such image", str(exc))
        if not frame.isdigit() or uid is None:
            return pages.problem(404, "No such image", f"frame {frame!r} is not a number")
        thumb = pages.thumbs.get(uid, int(frame))
        if thumb is None:
            return pages.problem(404, "No such image",
                                 f"No stored image {sop} with a frame {int(frame) + 1} that can "
                                 "be shown.")
        etag = f'"{thumb.etag}"'
        headers = {"ETag": etag, "Cache-Control": THUMB_CACHE_CONTROL,
                   "X-Content-Type-Options": "nosniff", "X-Window": thumb.window}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return FileResponse(thumb.path, media_type="image/png", headers=headers)

    @router.get("/static/{name}")
    def static(request: Request, name: str) -> Response:
        if name not in STATIC:
            return pages.problem(404, "Not found", "No such file.")
        etag = f'"{pages.static_etags[name]}"'
        headers = {"ETag": etag, "Cache-Control": STATIC_CACHE_CONTROL,
                   "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match", "") == etag:
            return Response(status_code=304, headers=headers)
        return Response(pages.static[name], media_type=STATIC[name], headers=headers)

    @router.get("/{rest:path}")
    def not_found(rest: str) -> HTMLResponse:
        return pages.problem(404, "Not found", "This page does not exist: start from the search.")

    return router


__all__ = ["KEY_SLICES", "Options", "Pages", "create_ui_router", "options"]
