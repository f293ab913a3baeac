"""Composition root: builds every part from the configuration, in order."""

from __future__ import annotations

import getpass
import logging
import os
import ssl
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sidecar.archive.retention import Releaser
from sidecar.archive.store import InstanceStore, quarantine_usage
from sidecar.audit import setup as audit_setup
from sidecar.audit.trail import AuditTrail
from sidecar.config import Config
from sidecar.db.connect import open_catalogue, ping
from sidecar.db.retention import RetentionRepository
from sidecar.dicom.access import assumed_permissions
from sidecar.dicom.fetch import FetchBack
from sidecar.dicom.node import DicomNode
from sidecar.dicom.similarity import SimilarityFind
from sidecar.dicom.tls import checked_certificate
from sidecar.errors import ConfigError
from sidecar.http.tokens import TokenStore
from sidecar.metrics import CatalogueFigures, Metrics
from sidecar.search.front import QueryService
from sidecar.search.ipc import QueryServer
from sidecar.search.service import SearchService
from sidecar.service import health, jobs
from sidecar.service.receivers import (
    ReceiverPool,
    effective_receivers,
    share_of_associations,
)

if TYPE_CHECKING:  # torch is imported only when embedding is on
    from sidecar.embeddings.model import Embedder
    from sidecar.http.app import HttpServer
    from sidecar.service.lifecycle import Embedding

logger = logging.getLogger(__name__)


def _os_user() -> str:
    """The user running the service (the launcher in Application Activity messages)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid())


class Sidecar:
    """The running service: catalogue, storage, DICOM node, embedding, queries and jobs.

    Start order: database (migrated) → storage → index (loaded and repaired)
    → scheduler → query server (for receiver processes) → DICOM receivers →
    HTTP API. Stop order is the reverse, so no association is served without
    storage and the index is saved last.

    Every similarity query (C-FIND, HTTP) is answered by this process's
    :class:`~sidecar.search.front.QueryService`; receiver processes forward theirs
    through :class:`~sidecar.search.ipc.QueryServer`.

    Parameters
    ----------
    config
        The configuration.
    receiver_processes
        Processes receiving associations; ``None`` uses ``dicom.receiver_processes``
        (one per core by default). With more than one, every receiver is a child
        process and this one runs the scheduled jobs. Tests use 1 (in-process).
    log_level
        Logging level handed to receiver processes.
    embedder
        Embedder to use instead of the configured model (tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        receiver_processes: int | None = 1,
        log_level: str = "INFO",
        embedder: Embedder | None = None,
    ) -> None:
        self.config = config
        # bad TLS files fail here, named, before anything opens (not in each receiver)
        tls_cert = checked_certificate(config.dicom.tls) if config.dicom.tls.enabled else None
        assumed = assumed_permissions(config.dicom.allowed_peers)
        if assumed:
            logger.warning(
                "dicom.allowed_peers without permissions: %s may store, find, similarity and "
                "example (as before permissions existed); list permissions to narrow",
                ", ".join(assumed),
            )
        self.audit_trail: AuditTrail | None = None
        if config.audit.enabled:
            try:
                self.audit_trail = audit_setup.open_trail(config)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError([f"audit.syslog: cannot load the TLS files: {exc}"]) from exc
        #: Reports this process's audit events (the HTTP API's too).
        self.auditor = audit_setup.auditor(config, self.audit_trail)
        self.engine, self.repository = open_catalogue(config)
        self.store = InstanceStore(config, self.repository)
        n = effective_receivers(config) if receiver_processes is None else receiver_processes
        share = share_of_associations(config, n)
        self.embedding: Embedding | None = None
        if config.worker.enabled or embedder is not None:
            from sidecar.service.lifecycle import Embedding  # noqa: PLC0415 - loads torch

            self.embedding = Embedding(config, self.engine, embedder)
        self.metrics = Metrics(catalogue=self.catalogue_figures)
        if self.audit_trail is not None:
            self.metrics.watch_audit(self.audit_trail.figures)
        self.tls_certificate = tls_cert
        if tls_cert is not None:
            self.metrics.tls_certificate_expires(tls_cert.not_after.timestamp())
            self.report_tls_certificate(at_start=True)
        self.search = SearchService(config, self.engine, self.embedding)
        self.query = QueryService(config, self.search, metrics=self.metrics)
        self.query_server: QueryServer | None = None
        # One receiver: in this process. Several: all in child processes sharing
        # the port, so the CNN in this process never competes with them for the GIL.
        self.node = (
            DicomNode(
                config, self.store, max_associations=share,
                similarity=SimilarityFind(
                    self.query, self.engine, config.query,
                    retrieve_ae_title=config.dicom.effective_retrieve_ae_title,
                ),
                examples=self.query,
                auditor=self.auditor,
            )
            if n == 1 else None
        )
        self.pool = ReceiverPool(config, n, share, log_level) if n > 1 else None
        self.http: HttpServer | None = None
        if config.http.enabled:
            from sidecar.http.app import HttpServer, create_app  # noqa: PLC0415 - fastapi, only when on
            from sidecar.http.auth import describe  # noqa: PLC0415 - starlette, only when on
            from sidecar.http.ui import create_ui_router  # noqa: PLC0415 - jinja2, only when on

            open_by_default = (config.http.auth == "auto" and config.http.loopback
                               and "auth" not in config.http.model_fields_set)
            logger.log(logging.WARNING if open_by_default else logging.INFO,
                       "%s", describe(config.http))
            from sidecar.http.sessions import Sessions  # noqa: PLC0415 - with the API only

            tokens = TokenStore(self.engine)
            sessions = (Sessions(tokens, self.engine, lifetime=config.ui.session_hours * 3600,
                                 secure=config.http.tls.enabled)
                        if config.ui.enabled and config.http.tokens_required else None)
            pages = ([create_ui_router(config, self.engine, self.query, self.embedding,
                                       auditor=self.auditor, sessions=sessions,
                                       on_security_event=self._http_security_event)]
                     if config.ui.enabled else [])
            self.http = HttpServer(config.http, create_app(
                self.query, self.metrics, self.health, max_upload_mb=config.http.max_upload_mb,
                tokens=tokens, http_config=config.http,
                on_security_event=self._http_security_event, auditor=self.auditor, routers=pages,
                sessions=sessions,
            ))
        emb = self.embedding if config.worker.enabled else None
        self.releaser, self.fetch_back = self._retention(emb)
        self.scheduler = jobs.scheduler(
            config,
            clear_temporaries=self.clear_temporaries,
            mark_stable=self.mark_stable,
            report_tls_certificate=self.report_tls_certificate if tls_cert else None,
            embed=emb.run_job if emb is not None else None,
            maintain=emb.maintain if emb is not None else None,
            adapt=self.adapt,
            release=self.release if self.releaser is not None else None,
            fetch=self.fetch if self.fetch_back is not None else None,
        )
        self.address: tuple[str, int] | None = None

    def report_tls_certificate(self, at_start: bool = False) -> None:
        """Log the DICOM TLS certificate in use (:func:`jobs.report_tls_certificate`)."""
        if self.tls_certificate is not None:
            jobs.report_tls_certificate(self.tls_certificate, at_start=at_start)

    def clear_temporaries(self) -> int:
        """Tidy what interrupted stores left (:meth:`InstanceStore.tidy`); how many files."""
        report = self.store.tidy()
        return report.temporaries + report.orphans

    def mark_stable(self) -> int:
        """Mark studies quiet for ``stability.stable_age`` seconds as stable."""
        return jobs.mark_stable(self.repository, self.config.stability.stable_age)

    def adapt(self) -> None:
        """Scheduled job: one on-site adaptation run (errors are logged, never raised)."""
        if self.embedding is not None:
            jobs.adapt(self.embedding.adapt)

    def _retention(self, emb: Embedding | None) -> tuple[Releaser | None, FetchBack | None]:
        """The release and fetch-back jobs' parts (``storage.keep_files``, ``storage.fetch``)."""
        storage = self.config.storage
        releaser = None
        if storage.releases and emb is None:
            logger.warning("storage.keep_files is %s but the embedding worker is off in this "
                           "process: files are kept (the release job runs beside the worker)",
                           storage.keep_files)
        elif storage.releases and emb is not None:
            releaser = Releaser(self.config, self.engine, lambda: emb.model.model_id,
                                keep=emb.keep_previews, auditor=self.auditor)
            fetch = storage.fetch
            logger.log(
                logging.INFO if fetch.configured else logging.WARNING,
                "storage.keep_files: %s: files are released once embedded; re-embedding %s",
                storage.keep_files,
                f"fetches them back from {fetch.ae_title}@{fetch.host}:{fetch.port} by "
                f"{fetch.method.upper()}" if fetch.configured else
                "waits until the PACS sends them again (no storage.fetch)")
        back = (FetchBack(self.config, self.store, RetentionRepository(self.engine),
                          auditor=self.auditor)
                if storage.fetch.configured and emb is not None else None)
        return releaser, back

    def release(self) -> None:
        """Scheduled job: release the files ``storage.keep_files`` no longer wants."""
        if self.releaser is None or self.embedding is None:
            return
        try:
            self.embedding.run_exclusive(self.releaser.run_once)
        except Exception:
            logger.exception("release job failed; files are kept until its next run")

    def fetch(self) -> None:
        """Scheduled job: fetch released files back from the PACS for work that needs them."""
        if self.fetch_back is not None and self.embedding is not None:
            self.fetch_back.run_once(self.embedding.model.model_id)

    def catalogue_figures(self) -> CatalogueFigures:
        """Catalogue, index, example, quarantine and disk figures (read at scrape time)."""
        rep = self.repository.status()
        vectors = None
        if self.embedding is not None:
            vectors = len(self.embedding.serving.index)
        quarantine = quarantine_usage(self.config.quarantine_dir)
        try:
            free: int | None = self.store.free_bytes()
        except OSError:
            logger.warning("metrics: cannot examine the storage filesystem", exc_info=True)
            free = None
        return CatalogueFigures(
            instances_by_state=dict(rep.instances_by_state),
            studies=rep.studies,
            studies_stable=rep.studies_stable,
            stored_bytes=rep.stored_bytes,
            index_vectors=vectors,
            examples=len(self.query.examples),
            quarantine_datasets=quarantine.datasets,
            quarantine_bytes=quarantine.bytes,
            disk_free_bytes=free,
            disk_min_free_bytes=self.store.min_free_bytes,
            **self._retention_figures(),
        )

    def _retention_figures(self) -> dict[str, int]:
        if self.releaser is None or self.embedding is None:
            return {}
        counts = RetentionRepository(self.engine).counts(
            self.embedding.model.model_id, max_attempts=self.config.worker.max_attempts)
        return {"released_files": counts.released,
                "waiting_for_pixels": counts.waiting_instances}

    def _http_security_event(self, kind: str, token_name: str | None, remote: str,
                             path: str) -> None:
        """An HTTP request refused by the token check: a WARNING and an audit message."""
        who = f"token {token_name!r}" if token_name else "no token name"
        logger.warning("HTTP API: refused %s from %s: %s (%s)", path, remote or "?", kind, who)
        if kind == "insufficient_scope":  # sidecar.http.auth.SCOPE
            self.auditor.access_refused(token_name or "", remote, path)
        else:  # missing, invalid, expired or revoked token
            self.auditor.authentication_failure(token_name or "", remote, f"{kind} for {path}")

    def health(self) -> dict[str, Any]:
        """Whether the service can do its job now, part by part (for ``/healthz``).

        Returns ``{"ok": bool, "checks": {name: {"ok": bool, "detail": str}}}``:
        the database answers, the DICOM receivers listen, the storage has free
        disk above the watermark (below it every store is refused), the
        scheduler runs, and (when embedding is on) the serving index is loaded.
        """
        return health.report({
            "database": health.database(lambda: ping(self.engine)),
            "dicom": health.dicom(self.pool, self.node),
            "storage": health.storage(self.store),
            "scheduler": health.scheduler(self.scheduler),
            "index": health.index(
                None if self.embedding is None else self.embedding.serving),
        })

    def _warm_search(self) -> None:
        """Load the search's in-memory vectors now, not on the first query (in a thread)."""
        started = time.perf_counter()
        try:
            self.search.warm()
        except Exception as exc:  # noqa: BLE001 - the first query loads them instead
            logger.warning("could not preload the search vectors (%s); the first query will",
                           exc.__class__.__name__)
            return
        logger.info("search vectors loaded in %.1f s", time.perf_counter() - started)

    def start(self) -> tuple[str, int]:
        """Open the index, start the scheduler and the receivers; returns the address.

        The search's in-memory vectors (series means, slice vectors of the
        serving model) are loaded in a background thread, so the first query
        does not pay for it (about 0.7 s per 100 000 vectors).
        """
        if self.audit_trail is not None:
            self.audit_trail.start()
            if self.pool is not None:
                self.audit_trail.relay(self.pool.audit_queue)
        if self.embedding is not None:
            self.embedding.open()
            threading.Thread(target=self._warm_search, name="search-warm", daemon=True).start()
        self.scheduler.start()
        if self.node is not None:
            self.address = self.node.start()
        else:
            assert self.pool is not None
            self.query_server = QueryServer(self.query)
            self.query_server.start()
            self.pool.start((self.query_server.address, self.query_server.authkey))
            self.address = (self.config.dicom.bind_address, self.config.dicom.port)
        if self.http is not None:
            host, port = self.http.start()
            logger.info("HTTP API listening on %s://%s:%s", self.http.scheme, host, port)
        self.auditor.application_start(_os_user())
        return self.address

    def stop(self) -> None:
        """Stop the HTTP API and receivers, then the scheduler (waiting for a job), then save."""
        if self.http is not None:
            self.http.stop()
        if self.pool is not None:
            self.pool.stop()
        if self.node is not None:
            self.node.stop()
        self.store.close()
        if self.query_server is not None:
            self.query_server.close()
            self.query_server = None
        if self.embedding is not None:
            self.embedding.cancel()  # a running adaptation stops at its next epoch
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.embedding is not None:
            self.embedding.close()
        self.query.close()
        self.engine.dispose()
        self.auditor.application_stop(_os_user())
        if self.audit_trail is not None:
            self.audit_trail.stop()  # after the receivers: their last messages are relayed

    def __enter__(self) -> Sidecar:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
