"""Files on disk: the one durable write, folders walked in a stable order, SHA-256.

The store, the vector index and model files all write through :func:`write_new`,
:func:`write_durably` and :func:`fsync_dir`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def walk_files(paths: Iterable[Path], *, skip: Container[Path] = ()) -> Iterator[Path]:
    """Each path that is not a folder, and every file under each folder, sorted.

    Folders are walked depth-first with names in sorted order, so the same tree
    gives the same sequence on every run (training manifests depend on it).
    Folders in ``skip`` are not entered.
    """
    for p in paths:
        if not p.is_dir():
            yield p
            continue
        for root, dirs, files in os.walk(p):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if here / d not in skip)
            for name in sorted(files):
                yield here / name


def sha256_file(path: Path, *, fsync: bool = False) -> str:
    """SHA-256 of a file's bytes, hex; ``fsync`` also flushes the file to disk."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def write_new(path: Path, data: bytes, *, mode: int = 0o640, fsync: bool = True) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it.

    ``mode`` is narrowed by the umask. On any failure the file is removed again.
    """
    _write(path, data, os.O_EXCL, mode, fsync=fsync, exact_mode=False)


def write_durably(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o640,
    fsync: bool = True,
    exact_mode: bool = False,
    tmp: Path | None = None,
) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves either the old or the new bytes.

    Writes a temporary file beside it (``tmp``, for a writer that holds a lock
    and clears its own leftovers by name; else a new ``.<name>.<random>.tmp``,
    so that concurrent writers never share one), fsyncs it, renames it over
    ``path`` and fsyncs the directory (``fsync=False`` skips both fsyncs:
    tests, scratch). ``exact_mode`` gives the file ``mode`` whatever the umask
    (model files must stay readable by the service's user); otherwise the
    umask narrows it.
    """
    if tmp is None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        flags = os.O_EXCL
    else:
        flags = os.O_TRUNC
    _write(tmp, data, flags, mode, fsync=fsync, exact_mode=exact_mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that names created, renamed or removed in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    """Remove a file; one already gone is fine, any other failure is logged."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.error("could not remove %s: %s", path, exc)


def _write(
    path: Path, data: bytes, flags: int, mode: int, *, fsync: bool, exact_mode: bool
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, mode)
    try:
        if exact_mode:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)
