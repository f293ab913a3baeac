"""The release job (``storage.keep_files``): files go, the catalogue, vectors and previews stay.

The PACS is the system of record; a site that does not want a second full copy
lets the sidecar drop each file once it has served its purpose (see
:mod:`sidecar.db.retention` for when). Order, per batch: the page's previews of
the frames with vectors are rendered and written (``keep``); the rows are marked
released and committed; then the files are unlinked and their folders fsynced.
A crash after the commit leaves a released file on disk: the job's first run
after a start removes such leftovers (as ``sidecar verify --repair`` does). The
folders stay (a restore or a late instance writes into them again).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from sidecar.archive.layout import stored_path
from sidecar.archive.reader import read_stored
from sidecar.audit.events import Auditor
from sidecar.audit.messages import SopClassCount
from sidecar.config import Config
from sidecar.db.repository import utcnow
from sidecar.db.retention import Releasable, RetentionRepository
from sidecar.db.types import Engine
from sidecar.files import fsync_dir, unlink_quietly

logger = logging.getLogger(__name__)

BATCH = 200
"""Instances released per commit."""

#: Renders and keeps the previews of a file about to go; returns how many it kept.
KeepPreviews = Callable[[Dataset, Releasable], int]


@dataclass
class ReleaseStats:
    """What one run of the release job did."""

    released: int = 0
    bytes: int = 0
    previews: int = 0
    preview_failures: int = 0
    leftovers_removed: int = 0
    seconds: float = 0.0


class Releaser:
    """Releases the files ``storage.keep_files`` no longer wants (see the module).

    Parameters
    ----------
    config
        ``storage.keep_files``, the storage directory, fsync.
    engine
        The catalogue.
    keep
        Renders the previews of a file before it goes (``None``: none are kept,
        e.g. without an embedding model in this process).
    auditor
        Audits each study's released files (DICOM Instances Accessed, Delete).
    model_id
        Called for the model the worker writes: a series needs its vectors (and its
        volume row, with volumes on) under it before its files go.
    """

    def __init__(self, config: Config, engine: Engine, model_id: Callable[[], str],
                 keep: KeepPreviews | None = None, auditor: Auditor | None = None) -> None:
        self._cfg = config
        self._root = config.storage_dir
        self._repo = RetentionRepository(engine)
        self._keep = keep
        self._model_id = model_id
        self._auditor = auditor
        self._swept = False

    def run_once(self, *, limit: int = 5000, now: dt.datetime | None = None) -> ReleaseStats:
        """Release what is due (at most ``limit`` files); after a start, finish old releases."""
        t0 = time.perf_counter()
        stats = ReleaseStats()
        if not self._cfg.storage.releases:
            return stats
        if not self._swept:
            stats.leftovers_removed = self.sweep()
            self._swept = True
        cutoff = (now or utcnow()) - dt.timedelta(days=self._cfg.storage.keep_days)
        while stats.released < limit:
            due = self._repo.due(self._model_id(), received_before=cutoff,
                                 volumes=self._cfg.volumes.enabled,
                                 limit=min(BATCH, limit - stats.released))
            if not due:
                break
            self._release(due, stats)
        stats.seconds = time.perf_counter() - t0
        if stats.released:
            logger.info("released %d file(s), %d MiB (storage.keep_files: %s); %d preview(s) "
                        "kept, %.1f s", stats.released, stats.bytes // 2**20,
                        self._cfg.storage.keep_files, stats.previews, stats.seconds)
        return stats

    def _release(self, due: list[Releasable], stats: ReleaseStats) -> None:
        sizes: dict[int, int] = {}
        for item in due:
            path = stored_path(self._root, item.file_path)
            try:
                sizes[item.pk] = path.stat().st_size
            except FileNotFoundError:
                sizes[item.pk] = 0
                continue
            if self._keep is None or not item.frames:
                continue
            try:
                stats.previews += self._keep(read_stored(self._root, item.file_path), item)
            except Exception as exc:  # noqa: BLE001 - a preview is not worth keeping a copy for
                stats.preview_failures += 1
                logger.warning("no preview kept of %s before its release: %s",
                               item.file_path, exc)
        dirs = set()
        marked = self._repo.mark_released(due)
        for item in marked:
            path = stored_path(self._root, item.file_path)
            unlink_quietly(path)  # one that cannot go is logged; the next start's sweep retries
            stats.released += 1
            stats.bytes += sizes.get(item.pk, 0)
            dirs.add(path.parent)
        if self._cfg.storage.fsync:
            for d in dirs:
                try:
                    fsync_dir(d)
                except OSError as exc:
                    logger.debug("cannot fsync %s: %s", d, exc)
        if self._auditor is not None:
            self._audit(marked)

    def _audit(self, marked: list[Releasable]) -> None:
        """One message per study (and batch), listing the released SOP Instance UIDs."""
        auditor = self._auditor
        assert auditor is not None
        studies: dict[str, list[Releasable]] = defaultdict(list)
        for item in marked:
            studies[item.study_instance_uid].append(item)
        for study, items in studies.items():
            by_class: dict[str, list[str]] = defaultdict(list)
            for item in items:
                by_class[item.sop_class_uid].append(item.sop_instance_uid)
            auditor.files_released(
                study, items[0].patient_id, items[0].issuer_of_patient_id,
                [SopClassCount(uid, len(sops), tuple(sops)) for uid, sops in by_class.items()],
                policy=str(self._cfg.storage.keep_files))

    def sweep(self) -> int:
        """Remove released files still on disk (a release interrupted after its commit).

        A file written after its row was released is a fetched-back copy whose
        commit is in flight: it stays.
        """
        removed = 0
        for rel, released_at in self._repo.released_files():
            path = stored_path(self._root, rel)
            try:
                # Written after its release: a fetched-back copy whose commit is in flight.
                if path.stat().st_mtime > released_at.replace(tzinfo=dt.UTC).timestamp():
                    continue
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("cannot remove the released file %s: %s", rel, exc)
        if removed:
            logger.warning("removed %d released file(s) an interrupted release left", removed)
        return removed


__all__ = ["KeepPreviews", "ReleaseStats", "Releaser"]
