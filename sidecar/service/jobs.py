"""The service's scheduled jobs and the scheduler that runs them."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from sidecar.config import Config
from sidecar.db.repository import Repository
from sidecar.dicom.tls import NodeCertificate

logger = logging.getLogger(__name__)

TIDY_INTERVAL_S = 300.0
"""Seconds between two tidies of interrupted stores' leftovers (InstanceStore.tidy)."""


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
    # At start, then every 5 minutes: what interrupted stores left (a receiver process
    # that died and was restarted leaves its temporaries; the tidy is a listdir).
    sched.add_job(clear_temporaries, "interval", seconds=TIDY_INTERVAL_S,
                  id="clear_temporaries", next_run_time=dt.datetime.now(dt.UTC), **once)
    if report_tls_certificate is not None:
        # Daily: the certificate in use, until it is renewed and the service restarted.
        sched.add_job(report_tls_certificate, "interval", days=1,
                      id="report_tls_certificate", **once)
    sched.add_job(mark_stable, "interval", seconds=config.stability.check_interval,
                  id="mark_stable", **once)
    if embed is not None and maintain is not None:
        sched.add_job(embed, "interval", seconds=config.worker.interval, id="embed", **once)
        sched.add_job(maintain, "interval", seconds=config.index.save_interval,
                      id="save_index", **once)
        if adapt is not None and config.adaptation.enabled:
            sched.add_job(adapt, CronTrigger.from_crontab(config.adaptation.schedule,
                                                          timezone="UTC"),
                          id="adapt", misfire_grace_time=3600, **once)
            logger.info("on-site adaptation scheduled: %s (UTC)", config.adaptation.schedule)
    if release is not None:
        sched.add_job(release, "interval", seconds=config.storage.release_interval,
                      id="release_files", **once)
    if fetch is not None:
        sched.add_job(fetch, "interval", seconds=config.storage.fetch.interval,
                      id="fetch_back", **once)
    return sched
