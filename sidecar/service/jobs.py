"""The service's scheduled jobs and the scheduler that runs them."""

from __future__ import annotations

import datetime as dt
import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from sidecar.config import Config
from sidecar.db.repository import Repository
from sidecar.dicom.tls import NodeCertificate
from sidecar.errors import is_native_panic

logger = logging.getLogger(__name__)

TIDY_INTERVAL_S = 300.0
"""Seconds between two tidies of interrupted stores' leftovers (InstanceStore.tidy)."""
REPEAT_FAILURE_S = 300.0
"""While a job keeps failing the same way, seconds between two log lines saying so."""


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or database: ENOSPC/EDQUOT,
    SQLite SQLITE_FULL, PostgreSQL class 53 (insufficient resources)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(e, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
            return True
        code = getattr(e, "pgcode", None) or getattr(e, "sqlstate", None)
        if isinstance(code, str) and code.startswith("53"):
            return True
        e = getattr(e, "orig", None) or e.__cause__ or e.__context__
    return False


class GuardedJob:
    """A scheduled job whose failures it logs itself, for APScheduler would log a full
    traceback at every run: on a full disk the 1-second jobs filled the log with them
    (found by the torture ``resources`` campaign). A full disk or database is logged on one
    line at ERROR; any other failure with its traceback the first time; while the same
    failure lasts, one line every :data:`REPEAT_FAILURE_S` seconds; the first run that
    works again at INFO. The job's result, or ``None`` after a failure.
    """

    def __init__(self, name: str, func: Callable[[], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.func = func
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0  # runs in a row that failed
        self._last_kind = ""
        self._logged_at = -float("inf")

    def __call__(self) -> object:
        try:
            result = self.func()
        except BaseException as exc:  # a job must not take the scheduler down
            if not isinstance(exc, Exception) and not is_native_panic(exc):
                raise  # KeyboardInterrupt, SystemExit
            self._failed(exc)
            return None
        with self._lock:
            failures, self.failures, self._last_kind = self.failures, 0, ""
        if failures:
            logger.info("scheduled job %s works again after %d failed run%s", self.name,
                        failures, "" if failures == 1 else "s")
        return result

    def _failed(self, exc: BaseException) -> None:
        full = out_of_space(exc)
        kind = "full" if full else exc.__class__.__name__
        now = self._clock()
        with self._lock:
            self.failures += 1
            new = kind != self._last_kind
            if not new and now - self._logged_at < REPEAT_FAILURE_S:
                return
            self._last_kind, self._logged_at, failures = kind, now, self.failures
        cause = f"{exc.__class__.__name__}: {getattr(exc, 'orig', None) or exc}"
        again = "" if failures == 1 else f" ({failures} runs in a row)"
        if full:
            logger.error("scheduled job %s failed, the disk or database is full%s: %s; it "
                         "runs again at its next time", self.name, again, cause)
        elif new and failures == 1:
            logger.exception("scheduled job %s failed; it runs again at its next time",
                             self.name)
        else:
            logger.error("scheduled job %s failed%s: %s", self.name, again, cause)


def report_tls_certificate(cert: NodeCertificate, *, at_start: bool = False) -> None:
    """Log the DICOM TLS certificate in use: WARNING when it expires soon
    (``NodeCertificate.expires_soon``), ERROR once it has expired (TLS peers
    then refuse every handshake), otherwise INFO at start only."""
    if cert.days_left() <= 0:
        logger.error("DICOM TLS certificate %s has expired: TLS peers refuse every "
                     "association; renew it, then restart the service", cert.describe())
    elif cert.expires_soon():
        logger.warning("DICOM TLS certificate %s: renew it, then restart the service",
                       cert.describe())
    elif at_start:
        logger.info("DICOM TLS certificate %s", cert.describe())


def mark_stable(repository: Repository, stable_age: float) -> int:
    """Mark studies quiet for ``stable_age`` seconds as stable."""
    n = repository.mark_stable_studies(stable_age)
    if n:
        logger.info("%d stud%s became stable", n, "y" if n == 1 else "ies")
    return n


def adapt(run: Callable[[], object]) -> None:
    """One on-site adaptation run (``run``); errors are logged, never raised."""
    # training.adapt imports torch: only when an adaptation runs (embedding is on then)
    from sidecar.training.adapt import AdaptationBusy  # noqa: PLC0415

    try:
        run()
    except AdaptationBusy as exc:
        logger.info("on-site adaptation skipped: %s", exc)
    except Exception:
        logger.exception("on-site adaptation failed; the current model stays")


def scheduler(
    config: Config,
    *,
    clear_temporaries: Callable[[], object],
    mark_stable: Callable[[], object],
    report_tls_certificate: Callable[[], object] | None = None,
    embed: Callable[[], object] | None = None,
    maintain: Callable[[], object] | None = None,
    adapt: Callable[[], object] | None = None,
    release: Callable[[], object] | None = None,
    fetch: Callable[[], object] | None = None,
) -> BackgroundScheduler:
    """The scheduler (not started) with the service's jobs.

    ``report_tls_certificate`` is scheduled when given (TLS on); ``embed`` and
    ``maintain`` when given (the worker is on); ``adapt`` when also given and
    ``adaptation.enabled``; ``release`` (``storage.keep_files``) and ``fetch``
    (``storage.fetch``) when given.
    """
    sched = BackgroundScheduler(timezone="UTC")
    once: dict[str, Any] = {"max_instances": 1, "coalesce": True}

    def add_job(func: Callable[[], object], *args: Any, id: str, **kw: Any) -> None:  # noqa: A002
        sched.add_job(GuardedJob(id, func), *args, id=id, name=id, **kw)

    # At start, then every 5 minutes: what interrupted stores left (a receiver process
    # that died and was restarted leaves its temporaries; the tidy is a listdir).
    add_job(clear_temporaries, "interval", seconds=TIDY_INTERVAL_S,
            id="clear_temporaries", next_run_time=dt.datetime.now(dt.UTC), **once)
    if report_tls_certificate is not None:
        # Daily: the certificate in use, until it is renewed and the service restarted.
        add_job(report_tls_certificate, "interval", days=1, id="report_tls_certificate",
                **once)
    add_job(mark_stable, "interval", seconds=config.stability.check_interval,
            id="mark_stable", **once)
    if embed is not None and maintain is not None:
        add_job(embed, "interval", seconds=config.worker.interval, id="embed", **once)
        add_job(maintain, "interval", seconds=config.index.save_interval, id="save_index",
                **once)
        if adapt is not None and config.adaptation.enabled:
            add_job(adapt, CronTrigger.from_crontab(config.adaptation.schedule, timezone="UTC"),
                    id="adapt", misfire_grace_time=3600, **once)
            logger.info("on-site adaptation scheduled: %s (UTC)", config.adaptation.schedule)
    if release is not None:
        sched.add_job(release, "interval", seconds=config.storage.release_interval,
                      id="release_files", **once)
    if fetch is not None:
        sched.add_job(fetch, "interval", seconds=config.storage.fetch.interval,
                      id="fetch_back", **once)
    return sched
