"""Prometheus metrics of one sidecar (served by the HTTP API at ``/metrics``).

Counts that several processes change (instances received by the receiver
processes, embedded by the worker) are read from the catalogue when
Prometheus scrapes, so every process agrees and nothing is lost on restart.
Query metrics are observed where every similarity query is answered: the
main process (C-FIND from receiver processes is forwarded there).

Each :class:`Metrics` has its own registry (no process-global state), so
tests and several services in one process do not mix their figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: Query latency buckets (seconds): the goal is p50 <= 10 ms, p99 <= 50 ms.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class CatalogueFigures:
    """What the catalogue says at scrape time."""

    instances_by_state: dict[str, int]
    studies: int
    studies_stable: int
    stored_bytes: int
    index_vectors: int | None = None
    examples: int | None = None
    quarantine_datasets: int | None = None
    quarantine_bytes: int | None = None
    disk_free_bytes: int | None = None
    disk_min_free_bytes: int | None = None
    released_files: int | None = None  # storage.keep_files other than forever
    waiting_for_pixels: int | None = None


@dataclass(frozen=True)
class AuditFigures:
    """The audit trail's counters (``sidecar.audit.trail.AuditTrail.figures``)."""

    written: int
    file_errors: int
    sent: int
    send_failures: int
    dropped: dict[str, int]
    queue_depth: int
    syslog: bool


class _AuditCollector(Collector):
    def __init__(self, read: Callable[[], AuditFigures]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        fig = self.read()
        written = CounterMetricFamily(
            "sidecar_audit_records_written",
            "Audit messages appended to the local audit file and fsynced.")
        written.add_metric([], fig.written)
        yield written
        errors = CounterMetricFamily(
            "sidecar_audit_file_errors", "Failed writes (or fsyncs) of the local audit file.")
        errors.add_metric([], fig.file_errors)
        yield errors
        dropped = CounterMetricFamily(
            "sidecar_audit_messages_dropped",
            "Audit messages dropped: queue_full (more waiting than audit.queue_size), expired "
            "(the collector was down longer than audit.syslog.retry_seconds), at_stop (not "
            "delivered to the collector when the service stopped; they are in the file).",
            labels=["reason"])
        for reason, n in sorted(fig.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        depth = GaugeMetricFamily(
            "sidecar_audit_queue_depth",
            "Audit messages waiting for the local file or for the syslog collector.")
        depth.add_metric([], fig.queue_depth)
        yield depth
        if fig.syslog:
            sent = CounterMetricFamily(
                "sidecar_audit_messages_sent", "Audit messages sent to the syslog collector.")
            sent.add_metric([], fig.sent)
            yield sent
            failures = CounterMetricFamily(
                "sidecar_audit_send_failures",
                "Failed attempts to send an audit message to the syslog collector (each is "
                "retried until audit.syslog.retry_seconds).")
            failures.add_metric([], fig.send_failures)
            yield failures


class _CatalogueCollector(Collector):
    def __init__(self, read: Callable[[], CatalogueFigures]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        try:
            fig = self.read()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is busy
            logger.warning("metrics: cannot read the catalogue", exc_info=True)
            up = GaugeMetricFamily("sidecar_catalogue_up", "1 when the catalogue could be read.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("sidecar_catalogue_up", "1 when the catalogue could be read.")
        up.add_metric([], 1)
        yield up
        states = GaugeMetricFamily(
            "sidecar_instances",
            "Stored instances by embedding state (pending, embedded, failed, skipped).",
            labels=["state"],
        )
        for state, count in sorted(fig.instances_by_state.items()):
            states.add_metric([state], count)
        yield states
        received = GaugeMetricFamily(
            "sidecar_instances_received", "Instances received and stored (all states)."
        )
        received.add_metric([], sum(fig.instances_by_state.values()))
        yield received
        queue = GaugeMetricFamily(
            "sidecar_embedding_queue_depth", "Instances waiting to be embedded (pending)."
        )
        queue.add_metric([], fig.instances_by_state.get("pending", 0))
        yield queue
        studies = GaugeMetricFamily("sidecar_studies", "Studies stored, by stability.",
                                    labels=["stable"])
        studies.add_metric(["true"], fig.studies_stable)
        studies.add_metric(["false"], fig.studies - fig.studies_stable)
        yield studies
        stored = GaugeMetricFamily("sidecar_stored_bytes", "Bytes of stored DICOM files.")
        stored.add_metric([], fig.stored_bytes)
        yield stored
        if fig.index_vectors is not None:
            vectors = GaugeMetricFamily(
                "sidecar_index_vectors", "Vectors in the index serving queries."
            )
            vectors.add_metric([], fig.index_vectors)
            yield vectors
        if fig.released_files is not None and fig.waiting_for_pixels is not None:
            released = GaugeMetricFamily(
                "sidecar_released_files",
                "Instances whose files storage.keep_files released (catalogue and vectors kept).")
            released.add_metric([], fig.released_files)
            yield released
            waiting = GaugeMetricFamily(
                "sidecar_instances_waiting_for_pixels",
                "Released instances that re-embedding needs back from the PACS (storage.fetch).")
            waiting.add_metric([], fig.waiting_for_pixels)
            yield waiting
        if fig.quarantine_bytes is not None and fig.quarantine_datasets is not None:
            kept = GaugeMetricFamily("sidecar_quarantine_datasets",
                                     "Refused datasets kept in the quarantine directory.")
            kept.add_metric([], fig.quarantine_datasets)
            yield kept
            size = GaugeMetricFamily("sidecar_quarantine_bytes",
                                     "Bytes in the quarantine directory (datasets and notes).")
            size.add_metric([], fig.quarantine_bytes)
            yield size
        if fig.disk_free_bytes is not None and fig.disk_min_free_bytes is not None:
            free = GaugeMetricFamily(
                "sidecar_disk_free_bytes",
                "Free bytes on the storage filesystem (stores are refused below "
                "sidecar_disk_min_free_bytes).",
            )
            free.add_metric([], fig.disk_free_bytes)
            yield free
            floor = GaugeMetricFamily(
                "sidecar_disk_min_free_bytes",
                "The free-disk watermark (storage.min_free_mb) in bytes.",
            )
            floor.add_metric([], fig.disk_min_free_bytes)
            yield floor
        if fig.examples is not None:
            examples = GaugeMetricFamily(
                "sidecar_query_examples", "Example images held for query by example."
            )
            examples.add_metric([], fig.examples)
            yield examples


class Metrics:
    """The metrics of one sidecar.

    Parameters
    ----------
    catalogue
        Reads the catalogue figures at scrape time (``None``: query metrics only).
    """

    def __init__(self, catalogue: Callable[[], CatalogueFigures] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.query_seconds = Histogram(
            "sidecar_query_duration_seconds",
            "Similarity query latency inside the sidecar (reference lookup, ANN, re-ranking).",
            labelnames=["interface", "level"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queries = Counter(
            "sidecar_queries",
            "Similarity queries answered, by interface and outcome (ok or the error kind).",
            labelnames=["interface", "outcome"],
            registry=self.registry,
        )
        self.examples_received = Counter(
            "sidecar_query_examples_received",
            "Example images received for query by example, by outcome.",
            labelnames=["outcome"],
            registry=self.registry,
        )
        if catalogue is not None:
            self.registry.register(_CatalogueCollector(catalogue))

    def tls_certificate_expires(self, when: float) -> None:
        """Publish when the DICOM TLS certificate in use expires (Unix time; call once).

        Only a node with TLS has the metric; alert on it minus ``time()``
        falling under a few weeks.
        """
        Gauge(
            "sidecar_tls_certificate_expiry_timestamp_seconds",
            "When the DICOM TLS certificate in use expires (Unix time).",
            registry=self.registry,
        ).set(when)

    def watch_audit(self, read: Callable[[], AuditFigures]) -> None:
        """Publish the audit trail's counters, read at scrape time (call once)."""
        self.registry.register(_AuditCollector(read))

    def observe_query(self, interface: str, level: str, outcome: str, seconds: float) -> None:
        """Record one similarity query."""
        self.queries.labels(interface, outcome).inc()
        if outcome == "ok":
            self.query_seconds.labels(interface, level).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


__all__ = ["AuditFigures", "CONTENT_TYPE", "CatalogueFigures", "LATENCY_BUCKETS", "Metrics"]
