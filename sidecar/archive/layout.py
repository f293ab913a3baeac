"""The storage layout: ``<storage>/<Study UID>/<Series UID>/<SOP Instance UID>.dcm``.

The catalogue records each file's path relative to the storage directory (POSIX);
these functions are the only place that turns one into the other.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


def stored_path(root: Path, file_path: str) -> Path:
    """The file of a catalogue path under the storage directory ``root``."""
    return root / file_path


def catalogue_path(root: Path, path: Path) -> str:
    """The catalogue path (relative to ``root``, POSIX) of a stored file."""
    return path.relative_to(root).as_posix()


def series_dir(root: Path, study_instance_uid: str, series_instance_uid: str) -> Path:
    """The folder holding a series' files."""
    return root / study_instance_uid / series_instance_uid


def instance_name(sop_instance_uid: str, suffix: str = "") -> str:
    """A stored file's name; ``suffix`` tells apart a second copy of the same UID."""
    return f"{sop_instance_uid}.{suffix}.dcm" if suffix else f"{sop_instance_uid}.dcm"


def prune_empty_dirs(root: Path, path: Path) -> None:
    """Remove a stored file's series folder, then its study folder, when empty."""
    for parent in (path.parent, path.parent.parent):
        if parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                pass  # not empty (yet) or already gone


def remove_stored(root: Path, file_paths: Iterable[str]) -> int:
    """Remove these stored files and the folders they leave empty; returns how many went."""
    removed = 0
    for rel in file_paths:
        path = stored_path(root, rel)
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        prune_empty_dirs(root, path)
    return removed


def preview_path(directory: Path, study_instance_uid: str, series_instance_uid: str,
                 sop_instance_uid: str, frame: int) -> Path:
    """A kept preview (``sidecar.embeddings.previews``) of a released file's frame."""
    return (directory / study_instance_uid / series_instance_uid / sop_instance_uid
            / f"{frame}.png")


def remove_previews(directory: Path, study_instance_uid: str,
                    sops: Iterable[str] | None = None) -> None:
    """Remove the kept previews of a study (``sops`` ``None``) or of some of its instances.

    A study or instance that is deleted or hidden must not stay visible as a picture.
    """
    study = directory / study_instance_uid
    if not study.is_dir():
        return
    targets = [study] if sops is None else [p for sop in sops for p in study.glob(f"*/{sop}")]
    for target in targets:
        if root_inside(directory, target):
            shutil.rmtree(target, ignore_errors=True)


def root_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` lies strictly inside ``root`` (defence against odd UIDs)."""
    try:
        return root.resolve() in path.resolve().parents
    except OSError:
        return False
