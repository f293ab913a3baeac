"""Removing a deleted study's files from the storage."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def remove_files(storage_dir: Path, paths: Iterable[str]) -> int:
    """Remove the files at ``paths`` (relative to ``storage_dir``) and the series
    and study folders they leave empty; returns how many files were removed
    (one already gone is not counted)."""
    removed = 0
    for rel in paths:
        path = storage_dir / rel
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        for parent in (path.parent, path.parent.parent):  # series, then study folder
            if parent != storage_dir:
                try:
                    parent.rmdir()
                except OSError:
                    pass  # not empty (yet) or already gone
    return removed
