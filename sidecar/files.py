"""Files on disk: walking folders in a stable order, SHA-256 of a file's bytes.

Used by ``sidecar ingest`` and ``sidecar train`` (files and folders named on the
command line), ``sidecar verify`` (the storage directory) and training manifests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Container, Iterable, Iterator
from pathlib import Path


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


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
