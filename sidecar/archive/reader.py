"""Reading stored instances by their catalogue path (the embedding worker, search, adaptation)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from sidecar.archive.layout import stored_path


def read_stored(root: Path, file_path: str, *, pixels: bool = True) -> Dataset:
    """The stored instance at catalogue path ``file_path`` under the storage directory ``root``.

    ``pixels=False`` stops before the pixel data (a header). Raises what
    :func:`pydicom.dcmread` raises (``OSError``, ``InvalidDicomError``, ...).
    """
    return dcmread(stored_path(root, file_path), stop_before_pixels=not pixels)
