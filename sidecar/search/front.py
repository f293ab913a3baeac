"""The query front: similarity requests from every door, with examples, audit and metrics.

:class:`QueryService` wraps :class:`sidecar.search.service.SearchService` for the
three front doors (C-FIND, HTTP, CLI). For every request it

* applies the configured top-K default and cap (``query.default_k``,
  ``query.max_k``: a larger K is lowered, not refused);
* resolves references to **example images** (query by example): images sent
  by C-STORE to ``query.example_ae_title`` are embedded at once by
  :meth:`QueryService.add_example`, held in memory (never archived, never in
  the catalogue) for ``query.example_ttl`` seconds and referenced by their
  SOP Instance UID; a series or study UID that is not in the archive is
  looked up among the examples too (all example images of that series or
  study then form the query). A SOP Instance UID is looked up among the
  examples first, series and study UIDs in the archive first;
* writes one audit record (:class:`AuditLog`) per query, answered or not;
* records latency and outcome in :class:`sidecar.metrics.Metrics`.

Receiver processes (``dicom.receiver_processes`` > 1) hold no index: they
forward similarity queries and examples to the main process through
:mod:`sidecar.search.ipc`, whose client has the same two methods
(:class:`SimilarityBackend`).
"""

from __future__ import annotations

import getpass
import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from sidecar.config import Config, QueryConfig
from sidecar.errors import (
    SEARCH_ERRORS,
    BadQuery,
    NotEmbedded,
    QueryError,
    SearchError,
    UnknownReference,
)
from sidecar.metrics import Metrics
from sidecar.search.service import SearchService
from sidecar.search.types import EmbeddedImages, Level, Reference, SearchFilters, SearchResult

logger = logging.getLogger(__name__)

Interface = Literal["dicom", "http", "cli"]

def error_kind(exc: BaseException) -> str:
    """The wire kind of a query error (metrics, audit, inter-process; ``"error"`` for others)."""
    return exc.wire_kind if isinstance(exc, QueryError) else "error"


def error_from_kind(kind: str, message: str) -> SearchError:
    """Rebuild a search error from its kind and message (inter-process)."""
    for cls in SEARCH_ERRORS:
        if cls.wire_kind == kind:
            if cls is NotEmbedded:
                return NotEmbedded(message, "unknown", {})
            return cls(message)
    return SearchError(message)


@dataclass(frozen=True)
class Requester:
    """Who asks: the interface, a name (calling AE title, HTTP client, OS user), an address."""

    interface: Interface
    name: str = ""
    address: str = ""

    @classmethod
    def cli(cls) -> Requester:
        """The local user running a command."""
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            user = str(os.getuid()) if hasattr(os, "getuid") else ""
        return cls("cli", user, "localhost")


@dataclass(frozen=True)
class SimilarityRequest:
    """One similarity query, as every front door states it.

    ``k`` ``None`` means ``query.default_k``. The reference of a request that
    crosses processes must name UIDs only (examples are resolved where the
    query runs).
    """

    reference: Reference
    k: int | None = None
    level: Level = "study"
    include_same_patient: bool = False
    filters: SearchFilters = field(default_factory=SearchFilters)


@dataclass(frozen=True)
class ExampleInfo:
    """What was kept of one example image."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    slices: int
    model_id: str
    expires_in: float


class SimilarityBackend(Protocol):
    """Answers similarity queries and takes example images (in-process or remote)."""

    def search(self, request: SimilarityRequest, requester: Requester) -> SearchResult:
        """Answer a query or raise a :class:`sidecar.errors.SearchError`."""
        ...

    def add_example(self, data: bytes, requester: Requester) -> ExampleInfo:
        """Embed and keep one example image (a DICOM file with meta) or raise a SearchError."""
        ...


def effective_k(cfg: QueryConfig, k: int | None) -> int:
    """``k`` with the configured default (``None`` or 0) and cap (``query.max_k``) applied.

    Raises
    ------
    BadQuery
        ``k`` is not a non-negative integer.
    """
    if k is None or (isinstance(k, int) and not isinstance(k, bool) and k == 0):
        return cfg.default_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise BadQuery(f"top-K must be a positive integer, got {k!r}")
    return min(k, cfg.max_k)


# -------------------------------------------------------------------- examples
@dataclass
class _Example:
    images: EmbeddedImages
    expires_at: float


class ExampleStore:
    """Example images embedded for query by example: in memory, expiring, bounded.

    Parameters
    ----------
    ttl
        Seconds an example stays usable.
    capacity
        Most examples held; adding one more drops the oldest.
    clock
        Monotonic clock (tests).
    """

    def __init__(self, ttl: float, capacity: int, clock: Any = time.monotonic) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._items: OrderedDict[str, _Example] = OrderedDict()
        self._lock = threading.Lock()

    def _purge(self, now: float) -> None:
        for uid in [u for u, e in self._items.items() if e.expires_at <= now]:
            del self._items[uid]

    def put(self, images: EmbeddedImages) -> float:
        """Keep ``images`` under its SOP Instance UID (replacing an older copy); returns its TTL."""
        now = self._clock()
        with self._lock:
            self._purge(now)
            self._items.pop(images.sop_instance_uid, None)
            self._items[images.sop_instance_uid] = _Example(images, now + self._ttl)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return self._ttl

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._items)

    def find(self, kind: str, uid: str) -> EmbeddedImages | None:
        """The example (``kind`` instance) or the examples of a series or study, combined."""
        with self._lock:
            self._purge(self._clock())
            if kind == "instance":
                found = self._items.get(uid)
                return found.images if found is not None else None
            attr = "series_instance_uid" if kind == "series" else "study_instance_uid"
            members = [e.images for e in self._items.values() if getattr(e.images, attr) == uid]
        if not members or len({m.model_id for m in members}) != 1:
            return None
        first = members[0]
        return EmbeddedImages(
            model_id=first.model_id,
            vectors=np.concatenate([m.vectors for m in members]),
            sop_instance_uid=first.sop_instance_uid,
            series_instance_uid=first.series_instance_uid if kind == "series" else "",
            study_instance_uid=first.study_instance_uid,
            patient_id=first.patient_id,
            issuer_of_patient_id=first.issuer_of_patient_id,
        )


# ----------------------------------------------------------------------- audit
class AuditLog:
    """Append-only JSON-lines record of similarity queries (they expose other patients' studies).

    One line per query, answered or refused: UTC time, interface, requester
    name and address, reference kind and UID, level, k, filters, outcome,
    number of hits, the Study Instance UIDs of the hits, model id and latency.
    The hits are those the search disclosed to the front door; a similarity
    C-FIND that matches other keys after ranking (see
    :mod:`sidecar.dicom.similarity`) may send fewer of them.
    The file is created with mode 0600; each record is written with one
    ``write`` on a descriptor opened with ``O_APPEND`` (whole lines, even
    with several writers), without fsync.

    Parameters
    ----------
    path
        The audit file; its directory is created (mode 0700) when missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def record(self, entry: dict[str, Any]) -> None:
        """Append one record (``time`` is added)."""
        line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry}
        data = (json.dumps(line, separators=(",", ":"), sort_keys=False) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                raise ValueError("audit log closed")
            os.write(self._fd, data)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _filters_text(filters: SearchFilters) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if filters.modalities:
        out["modalities"] = list(filters.modalities)
    if filters.study_date:
        out["study_date"] = filters.study_date
    if filters.body_part:
        out["body_part"] = filters.body_part
    return out


# --------------------------------------------------------------------- service
class QueryService:
    """Every similarity query of the process goes through here.

    Parameters
    ----------
    config
        The configuration (``query`` section).
    search
        The search service.
    metrics
        Where latency and outcomes are recorded (``None``: nowhere).
    audit
        The audit log (``None``: opened at ``config.audit_log_path``).
    """

    def __init__(
        self,
        config: Config,
        search: SearchService,
        *,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._cfg = config.query
        self.search_service = search
        self.metrics = metrics
        self.audit = audit or AuditLog(config.audit_log_path)
        self.examples = ExampleStore(self._cfg.example_ttl, self._cfg.max_examples)

    def _resolve(self, reference: Reference) -> Reference | None:
        """The example reference standing for ``reference``, if one applies."""
        if reference.kind == "instance":
            found = self.examples.find("instance", reference.uid)
            return Reference.example(found) if found is not None else None
        if reference.kind in ("series", "study"):
            found = self.examples.find(reference.kind, reference.uid)
            return Reference.example(found) if found is not None else None
        return None

    def search(self, request: SimilarityRequest, requester: Requester) -> SearchResult:
        """Answer one similarity query; audited and measured whatever the outcome.

        Raises
        ------
        sidecar.errors.SearchError
            As :meth:`sidecar.search.service.SearchService.search`.
        """
        start = time.perf_counter()
        ref = request.reference
        result: SearchResult | None = None
        failure: BaseException | None = None
        k = 0
        try:
            k = effective_k(self._cfg, request.k)
            resolved = self._resolve(ref) if ref.kind == "instance" else None
            try:
                result = self.search_service.search(
                    resolved or ref, k=k, level=request.level,
                    include_same_patient=request.include_same_patient, filters=request.filters,
                )
            except UnknownReference:
                fallback = self._resolve(ref) if ref.kind in ("series", "study") else None
                if fallback is None:
                    raise
                result = self.search_service.search(
                    fallback, k=k, level=request.level,
                    include_same_patient=request.include_same_patient, filters=request.filters,
                )
            return result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            outcome = "ok" if failure is None else error_kind(failure)
            if self.metrics is not None:
                self.metrics.observe_query(requester.interface, request.level, outcome, elapsed)
            self._audit(request, requester, k, result, failure, elapsed)

    def _audit(
        self,
        request: SimilarityRequest,
        requester: Requester,
        k: int,
        result: SearchResult | None,
        failure: BaseException | None,
        elapsed: float,
    ) -> None:
        ref = request.reference
        entry: dict[str, Any] = {
            "event": "similarity-query",
            "interface": requester.interface,
            "requester": requester.name,
            "address": requester.address,
            "reference": {"kind": ref.kind, "uid": ref.uid},
            "level": request.level,
            "k": k,
            "include_same_patient": request.include_same_patient,
            "filters": _filters_text(request.filters),
        }
        if result is not None:
            entry["outcome"] = "ok"
            entry["hits"] = len(result.hits)
            entry["studies"] = list(dict.fromkeys(h.study_instance_uid for h in result.hits))
            entry["model_id"] = result.model_id
            if result.reference.kind == "example":
                entry["reference"]["example"] = True
        else:
            entry["outcome"] = error_kind(failure) if failure is not None else "error"
            entry["hits"] = 0
            entry["error"] = str(failure) if failure is not None else ""
        entry["elapsed_ms"] = round(elapsed * 1000.0, 2)
        try:
            self.audit.record(entry)
        except OSError:
            logger.exception("cannot write the similarity query audit log %s", self.audit.path)

    def add_example(self, data: bytes, requester: Requester) -> ExampleInfo:
        """Embed one example image (a DICOM file, with or without meta) and keep it.

        Raises
        ------
        BadQuery
            Not DICOM, no SOP Instance UID, or nothing to embed.
        IndexUnavailable
            No model can embed it for the serving index now.
        """
        outcome = "ok"
        try:
            try:
                ds = dcmread(io.BytesIO(data), force=True)
                sop = str(ds.get("SOPInstanceUID", "") or "").strip()
            except (InvalidDicomError, ValueError, EOFError, OSError, TypeError) as exc:
                raise BadQuery(f"example image cannot be read as DICOM: {exc}") from exc
            if not sop:
                raise BadQuery("example image has no SOP Instance UID")
            images = self.search_service.embed_images([ds])
            ttl = self.examples.put(images)
        except BaseException as exc:
            outcome = error_kind(exc)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.examples_received.labels(outcome).inc()
        logger.info(
            "example image from %s@%s embedded (%d slice%s), usable for %.0f s",
            requester.name, requester.address, images.vectors.shape[0],
            "" if images.vectors.shape[0] == 1 else "s", ttl,
        )
        return ExampleInfo(
            sop_instance_uid=images.sop_instance_uid,
            series_instance_uid=images.series_instance_uid,
            study_instance_uid=images.study_instance_uid,
            slices=int(images.vectors.shape[0]),
            model_id=images.model_id,
            expires_in=ttl,
        )

    def close(self) -> None:
        """Close the audit log."""
        self.audit.close()


__all__ = [
    "AuditLog",
    "ExampleInfo",
    "ExampleStore",
    "Interface",
    "QueryService",
    "Requester",
    "SimilarityBackend",
    "SimilarityRequest",
    "error_from_kind",
    "effective_k",
    "error_kind",
]
