"""Durable storage of received instances: the one code path for C-STORE and ``ingest``.

File fsynced, linked and its directory fsynced, then the row committed, and only
then success; on failure nothing is kept (docs/design/archive.md).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Final

from sidecar.archive.iocm import RejectionNote, RejectionOutcome, Rejector, rejection_note
from sidecar.archive.layout import catalogue_path, instance_name, series_dir, stored_path
from sidecar.archive.parse import extract_meta, is_valid_uid, read_header
from sidecar.archive.spool import (
    LOCK_SUFFIX,
    Spool,
    TidyReport,
    leftover_temporaries,
    tidy_dead_owners,
)
from sidecar.config import Config
from sidecar.db.rejections import Rejections
from sidecar.db.repository import (
    CatalogueError,
    CatalogueFull,
    CatalogueUnavailable,
    ExistingInstance,
    InstanceMeta,
    Repository,
    RowRefused,
    StoredFile,
)
from sidecar.errors import InvalidDataset, OutOfResources, RejectedInstance, StorageFailure
from sidecar.files import fsync_dir, unlink_quietly, write_durably, write_new

logger = logging.getLogger(__name__)

TMP_DIR: Final = ".tmp"
"""The temporary directory inside the storage directory (files being stored)."""

STALE_TEMPORARY_AGE: Final = 3600.0
"""Seconds after which a temporary file is taken to be left by an interrupted store
(writing, fsyncing and linking one dataset takes well under that)."""

_LOCK_STRIPES = 64

QUARANTINE_REMEASURE_S = 10.0
"""How often (seconds at most) the quarantine's size is measured again."""


class _LostRace(Exception):
    """Another writer recorded the same SOP Instance UID first."""


class Outcome(StrEnum):
    """What happened to an accepted instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # identical bytes already stored: no-op
    KEPT_FIRST = "kept_first"  # different bytes, policy keep_first: new copy dropped
    REPLACED = "replaced"  # different bytes, policy replace: new copy stored
    RESTORED = "restored"  # the file had been released (storage.keep_files): a copy is back


@dataclass(frozen=True)
class StoreResult:
    """The result of a successful store."""

    outcome: Outcome
    sop_instance_uid: str
    study_instance_uid: str
    path: Path
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    rejection: RejectionOutcome | None = None  # the instance was an IOCM rejection note


@dataclass(frozen=True)
class Origin:
    """Who sent an instance (for the catalogue and the logs)."""

    ae_title: str = ""
    host: str = ""


class InstanceStore:
    """Store Part-10 byte strings durably and record them.

    Parameters
    ----------
    config
        The configuration (storage directory, watermark, fsync, duplicate policy).
    repository
        Catalogue access.
    """

    def __init__(self, config: Config, repository: Repository) -> None:
        self._root = config.storage_dir.resolve()
        self._tmp = self._root / TMP_DIR
        self._quarantine = config.quarantine_dir.resolve()
        self._min_free = config.storage.min_free_mb * 1024 * 1024
        self._fsync = config.storage.fsync
        self._policy = config.dicom.duplicate_policy
        self._repo = repository
        self._rejector = Rejector(config.iocm, Rejections(repository.engine), self._root,
                                  self._quarantine, config.previews_dir)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._quarantine_cap = config.storage.quarantine_max_mb * 1024 * 1024
        self._quarantine_lock = threading.Lock()
        self._quarantine_bytes = 0
        self._quarantine_measured = -math.inf
        for d in (self._root, self._tmp, self._quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._spool: Spool | None = None
        self._spool_lock = threading.Lock()
        self.tidy()

    @property
    def root(self) -> Path:
        """The storage directory (absolute)."""
        return self._root

    @property
    def repository(self) -> Repository:
        """The catalogue this store records into."""
        return self._repo

    # ---------------------------------------------------------------- public
    def tidy(self) -> TidyReport:
        """Tidy what interrupted stores left: dead owners' temporaries (any age) and the
        stored files they linked without a row (to ``<quarantine>/orphans/``), and
        temporaries of the old flat layout older than :data:`STALE_TEMPORARY_AGE`.
        Runs when the store is made (each process at start) and as a scheduled job;
        never raises (what it cannot handle is logged and left for ``sidecar verify``).
        """
        def recorded(sop: str) -> str | None:
            found = self._repo.find_instance(sop)
            return None if found is None else found.file_path

        try:
            report = tidy_dead_owners(self._root, self._tmp, self._quarantine / "orphans",
                                      recorded)
            report.temporaries += remove_temporaries(
                self._root, stale_temporaries(self._root, STALE_TEMPORARY_AGE, flat_only=True))
        except Exception as exc:  # noqa: BLE001 - tidying must never stop the service
            logger.error("could not tidy the storage's temporaries: %s", exc)
            return TidyReport(failures=1)
        if report.anything:
            logger.info(
                "tidied what interrupted stores left: %d temporar%s removed, %d stored "
                "file(s) without a row moved to the quarantine, %d acknowledged kept, "
                "%d failure(s)", report.temporaries, "y" if report.temporaries == 1 else "ies",
                report.orphans, report.kept, report.failures)
        return report

    def close(self) -> None:
        """Release this process's temporary directory (a later store makes a new one)."""
        with self._spool_lock:
            spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    @property
    def min_free_bytes(self) -> int:
        """The free-disk watermark (``storage.min_free_mb``) in bytes."""
        return self._min_free

    def free_bytes(self) -> int:
        """Bytes free for the store on its filesystem (as the watermark counts them).

        Raises
        ------
        OSError
            The storage directory cannot be examined.
        """
        st = os.statvfs(self._root)
        return st.f_bavail * st.f_frsize

    def check_free_space(self) -> None:
        """Raise :class:`OutOfResources` when free disk is below the watermark."""
        try:
            free = self.free_bytes()
        except OSError as exc:
            raise OutOfResources(f"cannot stat storage: {exc.strerror}") from exc
        if free < self._min_free:
            raise OutOfResources(
                f"free disk {free // 2**20} MiB below watermark {self._min_free // 2**20} MiB"
            )

    def store(
        self,
        data: bytes,
        transfer_syntax_uid: str | None,
        origin: Origin,
        *,
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
    ) -> StoreResult:
        """Keep ``data`` (a Part-10 file image) and record it.

        ``transfer_syntax_uid`` is the negotiated one for C-STORE; ``None``
        takes it from the file meta information (``ingest``).

        Raises
        ------
        OutOfResources
            Free disk is below the watermark (nothing is written).
        InvalidDataset
            The dataset is unparseable or inconsistent (a malformed rejection
            note too); it was quarantined.
        RejectedInstance
            A rejection note named it (``iocm.refuse_rejected``); nothing is kept.
        StorageFailure
            Writing or committing failed; nothing was kept. For a rejection
            note: stored, but applying it failed (a resend applies it again).
        """
        self.check_free_space()
        try:
            ds = read_header(data)
            if transfer_syntax_uid is None:
                transfer_syntax_uid = str(ds.file_meta.get("TransferSyntaxUID", "")).strip()
                if not transfer_syntax_uid:
                    raise InvalidDataset("missing", "file meta has no TransferSyntaxUID")
            meta = extract_meta(
                ds,
                transfer_syntax_uid,
                expected_sop_class_uid=expected_sop_class_uid,
                expected_sop_instance_uid=expected_sop_instance_uid,
            )
            note = rejection_note(ds)
        except InvalidDataset as exc:
            self.quarantine(data, str(exc), origin)
            raise
        digest = hashlib.sha256(data).hexdigest()
        with self._lock_for(meta.sop_instance_uid):
            try:
                try:
                    result = self._store_locked(data, digest, meta, origin)
                except _LostRace:
                    # Another process recorded the same SOP Instance UID between
                    # our duplicate check and our commit: decide again, now as a
                    # duplicate (our file was removed).
                    result = self._store_locked(data, digest, meta, origin)
            except _LostRace as exc:
                raise StorageFailure("concurrent store of the same SOP Instance UID") from exc
            except InvalidDataset as exc:
                self.quarantine(data, str(exc), origin)
                raise
        return result if note is None else self._apply(note, result)

    def _apply(self, note: RejectionNote, result: StoreResult) -> StoreResult:
        """Apply a stored rejection note (again, for a duplicate: it is idempotent)."""
        try:
            outcome = self._rejector.apply(note)
        except Exception as exc:
            cause = exc.cause if isinstance(exc, CatalogueError) else exc.__class__.__name__
            logger.error("rejection note %s stored but not applied: %s",
                         note.sop_instance_uid, cause)
            raise StorageFailure(f"rejection note stored, not applied: {cause}") from exc
        return replace(result, rejection=outcome)

    def quarantine(self, data: bytes, reason: str, origin: Origin) -> Path | None:
        """Keep a refused dataset for the administrator, with a note of why.

        Never raises: quarantine is best effort, skipped below the free-disk
        watermark and when the quarantine holds ``storage.quarantine_max_mb``
        already (its size is measured at most every
        :data:`QUARANTINE_REMEASURE_S` seconds and counted up in between, so
        several receiver processes together may pass the cap by what they
        refuse in that time).
        """
        try:
            self.check_free_space()
            if not self._quarantine_room(len(data)):
                logger.warning(
                    "refused dataset from %s@%s not kept: the quarantine holds %d MiB "
                    "(storage.quarantine_max_mb %d): %s", origin.ae_title, origin.host,
                    self._quarantine_bytes // 2**20, self._quarantine_cap // 2**20, reason,
                )
                return None
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
            name = f"{stamp}_{secrets.token_hex(4)}"
            path = self._quarantine / f"{name}.dcm"
            write_durably(path, data, fsync=self._fsync)
            note = (
                f"reason: {reason}\ncalling_ae_title: {origin.ae_title}\n"
                f"calling_host: {origin.host}\nbytes: {len(data)}\n"
            )
            write_durably(self._quarantine / f"{name}.txt", note.encode(), fsync=self._fsync)
        except Exception as exc:  # noqa: BLE001 - must not mask the original refusal
            logger.warning("could not quarantine refused dataset: %s", exc)
            return None
        logger.warning(
            "refused dataset from %s@%s quarantined as %s: %s",
            origin.ae_title, origin.host, path.name, reason,
        )
        return path

    # --------------------------------------------------------------- private
    def _quarantine_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit under the cap; if so they are counted."""
        with self._quarantine_lock:
            now = time.monotonic()
            if now - self._quarantine_measured > QUARANTINE_REMEASURE_S:
                self._quarantine_bytes = quarantine_usage(self._quarantine).bytes
                self._quarantine_measured = now
            if self._quarantine_bytes + size > self._quarantine_cap:
                return False
            self._quarantine_bytes += size
            return True

    def _lock_for(self, uid: str) -> threading.Lock:
        return self._locks[hash(uid) % _LOCK_STRIPES]

    def _store_locked(
        self, data: bytes, digest: str, meta: InstanceMeta, origin: Origin
    ) -> StoreResult:
        try:
            found = self._repo.lookup(meta.sop_instance_uid)  # one query for both
        except CatalogueUnavailable as exc:
            raise StorageFailure(str(exc)) from exc
        if found.rejected and self._rejector.refusing:
            raise RejectedInstance(
                f"instance {meta.sop_instance_uid} was rejected (IOCM rejection note)")
        existing = found.existing
        if existing is not None and existing.released:
            return self._restore(data, digest, meta, origin, existing)
        if existing is not None:
            kept = stored_path(self._root, existing.file_path)
            if existing.sha256 == digest:
                logger.debug("duplicate %s from %s: identical, no-op",
                            meta.sop_instance_uid, origin.ae_title)
                return StoreResult(Outcome.DUPLICATE, meta.sop_instance_uid,
                                   meta.study_instance_uid, kept, meta.patient_id,
                                   meta.issuer_of_patient_id)
            if self._policy == "keep_first":
                logger.warning(
                    "duplicate %s from %s with different content: kept the first copy",
                    meta.sop_instance_uid, origin.ae_title,
                )
                return StoreResult(Outcome.KEPT_FIRST, meta.sop_instance_uid,
                                   meta.study_instance_uid, kept, meta.patient_id,
                                   meta.issuer_of_patient_id)

        final, tmp = self._place(data, meta)
        try:
            return self._record(data, digest, meta, origin, existing, final)
        finally:
            unlink_quietly(tmp)  # only now: a leftover names its stored twin (spool.py)

    def _record(
        self, data: bytes, digest: str, meta: InstanceMeta, origin: Origin,
        existing: ExistingInstance | None, final: Path,
    ) -> StoreResult:
        stored = StoredFile(
            file_path=catalogue_path(self._root, final),
            file_size=len(data),
            sha256=digest,
            calling_ae_title=origin.ae_title,
            calling_host=origin.host,
        )
        try:
            self._repo.record_instance(
                meta, stored, replace_pk=None if existing is None else existing.pk
            )
        except InvalidDataset:
            unlink_quietly(final)
            raise
        except RowRefused as exc:
            unlink_quietly(final)
            if existing is None and self._find(meta.sop_instance_uid):
                raise _LostRace() from exc
            raise StorageFailure(str(exc)) from exc
        except Exception as exc:
            raise _commit_failed(exc, final) from exc

        if existing is not None:
            unlink_quietly(stored_path(self._root, existing.file_path))
            logger.warning("duplicate %s from %s with different content: replaced",
                           meta.sop_instance_uid, origin.ae_title)
            outcome = Outcome.REPLACED
        else:
            outcome = Outcome.STORED
        logger.debug("stored %s (study %s) from %s@%s, %d bytes",
                    meta.sop_instance_uid, meta.study_instance_uid,
                    origin.ae_title, origin.host, len(data))
        return StoreResult(outcome, meta.sop_instance_uid, meta.study_instance_uid, final,
                           meta.patient_id, meta.issuer_of_patient_id)

    def _restore(self, data: bytes, digest: str, meta: InstanceMeta, origin: Origin,
                 existing: ExistingInstance) -> StoreResult:
        """A released instance's file comes back (fetched from the PACS, or sent again).

        Whatever the duplicate policy: the row has no file to compare with. The
        PACS may send other bytes than it first did (another transfer syntax); the
        row takes the new file's facts and keeps its state and vectors.
        """
        final, tmp = self._place(data, meta)
        try:
            self._repo.restore_instance(existing.pk, meta, StoredFile(
                file_path=catalogue_path(self._root, final), file_size=len(data), sha256=digest,
                calling_ae_title=origin.ae_title, calling_host=origin.host))
        except Exception as exc:
            raise _commit_failed(exc, final) from exc
        finally:
            unlink_quietly(tmp)
        logger.debug("restored the released file of %s from %s", meta.sop_instance_uid,
                     origin.ae_title)
        return StoreResult(Outcome.RESTORED, meta.sop_instance_uid, meta.study_instance_uid,
                           final, meta.patient_id, meta.issuer_of_patient_id)

    def _find(self, sop_instance_uid: str) -> ExistingInstance | None:
        try:
            return self._repo.find_instance(sop_instance_uid)
        except CatalogueUnavailable as exc:
            raise StorageFailure(str(exc)) from exc

    def _spool_dir(self) -> Spool:
        with self._spool_lock:
            if self._spool is None:
                self._spool = Spool(self._tmp)
            return self._spool

    def _place(self, data: bytes, meta: InstanceMeta) -> tuple[Path, Path]:
        """Write ``data`` durably under a fresh final name: ``(final, temporary)``.

        The temporary stays linked until the caller has committed the row (or given up)
        and removed it: a crash in between leaves it to tell where its twin is.
        """
        for uid in (meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid):
            if not is_valid_uid(uid):  # defence in depth: names are digits and dots only
                raise StorageFailure("refusing a file name that is not a UID")
        directory = series_dir(self._root, meta.study_instance_uid, meta.series_instance_uid)
        try:
            self._ensure_dir(directory)
            tmp = self._spool_dir().path_for(
                meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid)
            write_new(tmp, data, fsync=self._fsync)
            try:
                final = directory / instance_name(meta.sop_instance_uid)
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    final = directory / instance_name(meta.sop_instance_uid, secrets.token_hex(6))
                    os.link(tmp, final)
                if self._fsync:
                    fsync_dir(directory)
            except BaseException:
                unlink_quietly(tmp)
                raise
        except OSError as exc:
            with self._dirs_lock:
                self._known_dirs.discard(directory)  # it may have been removed
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResources(f"storage full: {exc.strerror}") from exc
            raise StorageFailure(f"cannot write file: {exc.strerror or exc}") from exc
        return final, tmp

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._dirs_lock:
            missing = []
            d = directory
            while not d.exists():
                missing.append(d)
                d = d.parent
            for d in reversed(missing):
                d.mkdir(exist_ok=True)
                if self._fsync:
                    fsync_dir(d.parent)
            self._known_dirs.add(directory)


def _commit_failed(exc: Exception, final: Path) -> Exception:
    """The catalogue refused a row: remove its file; the failure the peer is told."""
    unlink_quietly(final)
    if isinstance(exc, CatalogueFull):
        return OutOfResources(str(exc))
    cause = exc.cause if isinstance(exc, CatalogueError) else exc.__class__.__name__
    return StorageFailure(f"database commit failed: {cause}")


def stale_temporaries(root: Path, min_age: float, now: float | None = None, *,
                      flat_only: bool = False) -> list[str]:
    """Names (relative to ``root``'s temporary directory) of the temporaries left by
    interrupted stores: every file of a dead owner (spool.py), and files of the old
    flat layout at least ``min_age`` s old (``flat_only``: those only).

    A store's temporary lives for the time it takes to write, link and commit one
    dataset; a leftover was left by a process that stopped in between (crash,
    power loss, kill -9). Its sender got no Success for it unless its row is there.
    """
    clock = time.time() if now is None else now
    names: list[str] = [] if flat_only else leftover_temporaries(root / TMP_DIR)
    try:
        with os.scandir(root / TMP_DIR) as entries:
            for entry in entries:
                if entry.name.endswith((LOCK_SUFFIX, ".claim")):
                    continue  # owners' locks (spool.py)
                try:
                    if entry.is_file(follow_symlinks=False) \
                            and clock - entry.stat(follow_symlinks=False).st_mtime >= min_age:
                        names.append(entry.name)
                except OSError:
                    continue  # removed meanwhile
    except FileNotFoundError:
        pass
    return sorted(names)


def remove_temporaries(root: Path, names: Iterable[str]) -> int:
    """Remove these files of ``root``'s temporary directory; returns how many went.

    One already gone counts as removed; one that cannot be removed is logged.
    """
    removed = 0
    for name in names:
        try:
            (root / TMP_DIR / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.error("could not remove temporary %s: %s", name, exc)
            continue
        removed += 1
    return removed


@dataclass(frozen=True)
class QuarantineUsage:
    """What the quarantine directory holds (its top level: refused datasets and notes)."""

    datasets: int
    """Refused datasets kept (``.dcm`` files)."""
    bytes: int
    """Bytes of every file at the top level (datasets and their notes)."""


def quarantine_usage(directory: Path) -> QuarantineUsage:
    """Count the quarantine's refused datasets and bytes (0 when it does not exist)."""
    datasets = total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue  # removed meanwhile
                datasets += entry.name.endswith(".dcm")
    except FileNotFoundError:
        pass
    return QuarantineUsage(datasets, total)
