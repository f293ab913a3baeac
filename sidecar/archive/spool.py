"""Temporary files of stores in flight, owned by a live process and tidied after a crash.

Each process that stores holds an exclusive ``flock`` on ``<storage>/.tmp/<owner>.lock``
for as long as it lives and writes its temporaries into ``<storage>/.tmp/<owner>/``.
The kernel drops the lock when the process ends, however it ends (kill -9 included), so
a lock that can be taken belongs to a dead owner, whose leftovers are safe to tidy at
any age: nobody will link or commit them any more (docs/design/archive.md, "Crash
leftovers").

A temporary is named after the catalogue path it is written for
(``<study>_<series>_<sop>.<random>.part``: UIDs are digits and dots) and is only
removed after the row's commit, so a leftover that has a second link tells where the
stored twin is: a twin without a row is an orphan (linked, never acknowledged) and goes
to the quarantine, like ``sidecar verify --repair`` does; one with its row was
acknowledged and stays.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.archive.layout import catalogue_path, prune_empty_dirs, series_dir

logger = logging.getLogger(__name__)

LOCK_SUFFIX: Final = ".lock"
_CLAIM_SUFFIX: Final = ".claim"
PART_SUFFIX: Final = ".part"
STALE_CLAIM_AGE: Final = 3600.0
"""A ``.claim`` file (an owner between creating its lock and naming it) older than this
was left by a process that died in those microseconds."""


@dataclass
class TidyReport:
    """What one tidy of dead owners' temporaries did."""

    owners: int = 0
    """Dead owners whose directory was tidied."""
    temporaries: int = 0
    """Temporaries removed (never acknowledged, or acknowledged and already linked)."""
    orphans: int = 0
    """Stored twins without a row moved to the quarantine's ``orphans/``."""
    kept: int = 0
    """Stored twins with their row (acknowledged): left in place."""
    failures: int = 0
    """Files that could not be examined, moved or removed (logged; left for ``verify``)."""

    @property
    def anything(self) -> bool:
        """Whether a file was tidied, kept or could not be handled (worth a log line).

        A dead owner's empty directory alone is not: every receiver process killed
        between two stores leaves one, and each restart logged "0 temporaries removed,
        0 ..." for it (43 of 48 such lines in a 50-cycle torture kill9 campaign).
        """
        return bool(self.temporaries or self.orphans or self.kept or self.failures)


def part_name(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """A temporary's name for the instance it carries (unique per store)."""
    return f"{study_uid}_{series_uid}_{sop_uid}.{secrets.token_hex(6)}{PART_SUFFIX}"


def _parse_part(name: str) -> tuple[str, str, str] | None:
    if not name.endswith(PART_SUFFIX):
        return None
    stem = name[: -len(PART_SUFFIX)].rpartition(".")[0]
    uids = stem.split("_")
    if len(uids) != 3 or not all(uids):
        return None
    return uids[0], uids[1], uids[2]


class Spool:
    """This process's temporary directory under ``tmp_root`` (held by a lock).

    Raises :class:`OSError` when the lock or the directory cannot be made.
    """

    def __init__(self, tmp_root: Path) -> None:
        self.tmp_root = tmp_root
        tmp_root.mkdir(parents=True, exist_ok=True)
        while True:
            owner = f"{os.getpid()}-{secrets.token_hex(4)}"
            claim = tmp_root / f"{owner}{_CLAIM_SUFFIX}"
            try:
                fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.directory = tmp_root / owner
            self.directory.mkdir(mode=0o700)
            # named only once locked: a sweeper never takes a live owner for a dead one
            os.rename(claim, tmp_root / f"{owner}{LOCK_SUFFIX}")
        except BaseException:
            os.close(fd)
            claim.unlink(missing_ok=True)
            raise
        self._fd = fd
        self.owner = owner

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """A new temporary's path for this instance."""
        return self.directory / part_name(study_uid, series_uid, sop_uid)

    def close(self) -> None:
        """Remove the directory (when empty) and the lock; later stores need a new spool."""
        if self._fd < 0:
            return
        try:
            self.directory.rmdir()
            (self.tmp_root / f"{self.owner}{LOCK_SUFFIX}").unlink(missing_ok=True)
        except OSError:
            pass  # a temporary is still there (a store failed to remove it): next tidy
        os.close(self._fd)
        self._fd = -1


def _dead_owners(tmp_root: Path) -> Iterator[tuple[Path, Path]]:
    """``(lock, directory)`` of each dead owner, its lock held while the caller tidies."""
    try:
        names = sorted(os.listdir(tmp_root))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(LOCK_SUFFIX):
            continue
        lock = tmp_root / name
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # another sweeper finished it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive (or another sweeper is on it)
            if not lock.exists():
                continue  # tidied by another sweeper between our open and our lock
            yield lock, tmp_root / name[: -len(LOCK_SUFFIX)]
        finally:
            os.close(fd)


def leftover_temporaries(tmp_root: Path) -> list[str]:
    """Names (relative to ``tmp_root``) of the temporaries of dead owners."""
    found: list[str] = []
    for _lock, directory in _dead_owners(tmp_root):
        try:
            found.extend(f"{directory.name}/{n}" for n in sorted(os.listdir(directory)))
        except FileNotFoundError:
            continue
    return found


def tidy_dead_owners(
    root: Path, tmp_root: Path, orphans_dir: Path,
    recorded_path: Callable[[str], str | None],
) -> TidyReport:
    """Tidy the temporaries of dead owners (see the module's docstring).

    ``recorded_path(sop_instance_uid)`` is the catalogue path recorded for that SOP
    Instance UID (``None``: no row). Raises nothing for a file it cannot handle: it is
    logged, counted in ``failures`` and left for ``sidecar verify``.
    """
    report = TidyReport()
    for lock, directory in _dead_owners(tmp_root):
        report.owners += 1
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            names = []
        for name in names:
            _tidy_one(root, directory / name, orphans_dir, recorded_path, report)
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.error("could not remove the temporary directory %s: %s", directory, exc)
            report.failures += 1
            continue
        lock.unlink(missing_ok=True)
    for name in _stale_claims(tmp_root):
        (tmp_root / name).unlink(missing_ok=True)
    return report


def _stale_claims(tmp_root: Path) -> list[str]:
    now = time.time()
    stale = []
    for entry in os.scandir(tmp_root):
        if entry.name.endswith(_CLAIM_SUFFIX):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_CLAIM_AGE:
                    stale.append(entry.name)
            except OSError:
                continue
    return stale


def _tidy_one(
    root: Path, part: Path, orphans_dir: Path, recorded_path: Callable[[str], str | None],
    report: TidyReport,
) -> None:
    try:
        st = part.lstat()
        uids = _parse_part(part.name)
        if st.st_nlink > 1 and uids is not None:
            _settle_twin(root, st.st_ino, uids, orphans_dir, recorded_path, report)
        part.unlink()
        report.temporaries += 1
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - one bad leftover must not stop the tidy
        logger.error("could not tidy the temporary %s: %s", part.name, exc)
        report.failures += 1


def _settle_twin(
    root: Path, inode: int, uids: tuple[str, str, str], orphans_dir: Path,
    recorded_path: Callable[[str], str | None], report: TidyReport,
) -> None:
    """Find the stored link of a leftover temporary; quarantine it when it has no row."""
    study, series, sop = uids
    directory = series_dir(root, study, series)
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(sop + ".")]
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.inode() != inode:
            continue
        path = Path(entry.path)
        rel = catalogue_path(root, path)
        if recorded_path(sop) == rel:
            report.kept += 1
            return
        target = orphans_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{target.name}.{int(time.time())}")
        os.replace(path, target)
        prune_empty_dirs(root, path)
        report.orphans += 1
        logger.warning("stored file %s had no catalogue row after an interrupted store "
                       "(never acknowledged): moved to %s", rel, target)
        return
