"""Storage check (``sidecar verify``): every catalogue row has its file, every file its row?

Reports missing, changed and orphan files and stale temporaries; ``--repair``
quarantines orphans and removes stale temporaries (docs/design/archive.md).
Files released on purpose (``storage.keep_files``) are counted, not missing; a
released file still present (a release interrupted between its commit and its
unlink) is a leftover that ``--repair`` and the release job remove.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from sidecar.archive.layout import catalogue_path, prune_empty_dirs, stored_path
from sidecar.archive.store import TMP_DIR, remove_temporaries, stale_temporaries
from sidecar.config import Config
from sidecar.db.repository import stored_files
from sidecar.db.types import Engine
from sidecar.files import sha256_file, walk_files

logger = logging.getLogger(__name__)

ORPHANS_DIR = "orphans"
"""Where ``--repair`` moves orphans, inside the quarantine directory."""


@dataclass
class VerifyReport:
    """What :func:`verify_storage` found (paths relative to the storage directory)."""

    rows: int = 0
    released: int = 0
    files: int = 0
    bytes_checked: int = 0
    checksums: bool = False
    missing: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)
    wrong_checksum: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    young_unrecorded: int = 0
    stale_temporaries: list[str] = field(default_factory=list)
    released_leftovers: list[str] = field(default_factory=list)
    removed_leftovers: int = 0
    moved_orphans: list[str] = field(default_factory=list)
    removed_temporaries: int = 0
    seconds: float = 0.0

    @property
    def damaged(self) -> int:
        """Rows whose file is missing, changed or unreadable: acknowledged data at risk."""
        return (len(self.missing) + len(self.wrong_size) + len(self.wrong_checksum)
                + len(self.unreadable))

    @property
    def clean(self) -> bool:
        """Nothing damaged and nothing left to tidy."""
        left_orphans = len(self.orphans) - len(self.moved_orphans)
        left_tmp = len(self.stale_temporaries) - self.removed_temporaries
        left_released = len(self.released_leftovers) - self.removed_leftovers
        return (self.damaged == 0 and left_orphans == 0 and left_tmp == 0
                and left_released == 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "rows": self.rows,
            "released": self.released,
            "files": self.files,
            "checksums": self.checksums,
            "bytes_checked": self.bytes_checked,
            "missing": self.missing,
            "wrong_size": self.wrong_size,
            "wrong_checksum": self.wrong_checksum,
            "unreadable": self.unreadable,
            "orphans": self.orphans,
            "young_unrecorded": self.young_unrecorded,
            "stale_temporaries": self.stale_temporaries,
            "moved_orphans": self.moved_orphans,
            "removed_temporaries": self.removed_temporaries,
            "released_leftovers": self.released_leftovers,
            "removed_leftovers": self.removed_leftovers,
            "damaged": self.damaged,
            "clean": self.clean,
            "seconds": round(self.seconds, 2),
        }


def _path_key(rel: str) -> int:
    """64 bits of a relative path's BLAKE2b digest."""
    return int.from_bytes(hashlib.blake2b(rel.encode("utf-8", "surrogateescape"),
                                          digest_size=8).digest(), "little")


class _RecordedPaths:
    """The catalogue's file paths as a sorted array of 64-bit digests.

    8 bytes a row instead of a Python string: a million rows of 148-character
    paths take 8 MB (16 MB while sorting) instead of 230 MB as a set of
    strings (measured with tracemalloc), so an archive of ten million
    instances is checked in well under 200 MB. The chance that two of
    ten million paths share a digest is about 3 in a million, and such a pair
    would only hide one orphan from the report: a recorded file is never
    taken for an orphan.
    """

    def __init__(self) -> None:
        self._keys = array("Q")
        self._sorted: npt.NDArray[np.uint64] | None = None

    def add(self, rel: str) -> None:
        self._keys.append(_path_key(rel))

    def __contains__(self, rel: str) -> bool:
        if self._sorted is None:
            self._sorted = np.sort(np.frombuffer(self._keys, dtype=np.uint64))
            self._keys = array("Q")
        key = np.uint64(_path_key(rel))
        i = int(np.searchsorted(self._sorted, key))
        return i < self._sorted.size and self._sorted[i] == key


def verify_storage(
    config: Config, engine: Engine, *, checksums: bool = False, min_age: float = 300.0,
    now: float | None = None,
) -> VerifyReport:
    """Compare the catalogue's instance rows with the files of the storage directory.

    Parameters
    ----------
    config
        Where the storage directory is.
    engine
        The catalogue.
    checksums
        Also read every recorded file and compare its SHA-256.
    min_age
        Files modified less than this many seconds ago without a row are not
        orphans (yet): a store in flight writes its file before its row.
    now
        ``time.time()`` to judge ages by (tests).
    """
    t0 = time.perf_counter()
    root = config.storage_dir
    clock = time.time() if now is None else now
    report = VerifyReport(checksums=checksums)
    recorded = _RecordedPaths()
    for rel, size, digest, released in stored_files(engine):
        report.rows += 1
        recorded.add(rel)
        path = stored_path(root, rel)
        if released:
            report.released += 1
            if path.exists():
                report.released_leftovers.append(rel)
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            report.missing.append(rel)
            continue
        except OSError:
            report.unreadable.append(rel)
            continue
        if st.st_size != size:
            report.wrong_size.append(rel)
            continue
        if checksums:
            try:
                actual = sha256_file(path)
            except OSError:
                report.unreadable.append(rel)
                continue
            report.bytes_checked += st.st_size
            if actual != digest:
                report.wrong_checksum.append(rel)
    if root.is_dir():
        for path in walk_files([root], skip={root / TMP_DIR}):
            report.files += 1
            rel = catalogue_path(root, path)
            if rel in recorded:
                continue
            try:
                age = clock - path.stat().st_mtime
            except OSError:
                continue  # gone meanwhile
            if age < min_age:
                report.young_unrecorded += 1
            else:
                report.orphans.append(rel)
        report.stale_temporaries = stale_temporaries(root, min_age, clock)
    report.seconds = time.perf_counter() - t0
    return report


def repair_storage(config: Config, report: VerifyReport) -> None:
    """Move ``report``'s orphans to the quarantine and remove its stale temporaries.

    Call only while no service stores into the directory. Each orphan keeps its
    relative path under ``<quarantine>/orphans/``; one that cannot be moved is
    logged and left where it is. Fills ``report.moved_orphans`` and
    ``report.removed_temporaries``.
    """
    root = config.storage_dir
    target_root = config.quarantine_dir / ORPHANS_DIR
    for rel in report.orphans:
        source = stored_path(root, rel)
        target = target_root / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{target.name}.{int(time.time())}")
            os.replace(source, target)
        except OSError as exc:
            logger.error("could not move orphan %s to the quarantine: %s", rel, exc)
            continue
        report.moved_orphans.append(rel)
        prune_empty_dirs(root, source)
    report.removed_temporaries = remove_temporaries(root, report.stale_temporaries)
    for rel in report.released_leftovers:
        path = stored_path(root, rel)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.error("could not remove the released file %s: %s", rel, exc)
            continue
        report.removed_leftovers += 1
        prune_empty_dirs(root, path)
