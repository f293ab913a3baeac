"""The saved index's files: ``index.json`` (its facts, the commit point) and the graph names."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Final, TypedDict, cast

import numpy as np

from sidecar.embeddings.codec import VectorIndexError

logger = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
FACTS_NAME: Final = "index.json"
BIN_RE: Final = re.compile(r"^index-(\d{6,})\.bin(\.tmp)?$")


class IndexMismatch(VectorIndexError):
    """A saved index cannot be used; the caller rebuilds it from stored vectors.

    Parameters
    ----------
    directory
        The index directory.
    reason
        What is wrong (missing file, checksum, model id, dim, ...).
    """

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = directory
        self.reason = reason
        super().__init__(f"index in {directory} unusable: {reason}")


class SavedFacts(TypedDict):
    """The content of ``index.json``."""

    format_version: int
    model_id: str
    dim: int
    space: str
    count: int
    deleted: int
    capacity: int
    m: int
    ef_construction: int
    ef_search: int
    saved_at: str
    index_file: str
    index_sha256: str
    labels_sha256: str
    hnswlib_version: str


_FACT_TYPES: Final[dict[str, type]] = {
    "format_version": int,
    "model_id": str,
    "dim": int,
    "space": str,
    "count": int,
    "deleted": int,
    "capacity": int,
    "m": int,
    "ef_construction": int,
    "ef_search": int,
    "saved_at": str,
    "index_file": str,
    "index_sha256": str,
    "labels_sha256": str,
    "hnswlib_version": str,
}


def labels_checksum(labels: Iterable[int]) -> str:
    """SHA-256 of the sorted labels as little-endian int64 (as in ``index.json``)."""
    arr = np.sort(np.fromiter((int(x) for x in labels), dtype=np.int64))
    return hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()


def read_saved_facts(directory: Path) -> SavedFacts:
    """Read and type-check ``index.json`` without loading the graph.

    Raises
    ------
    IndexMismatch
        Missing, not JSON, or a field is missing or of the wrong type.
    """
    path = directory / FACTS_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexMismatch(directory, f"{FACTS_NAME} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexMismatch(directory, f"cannot read {FACTS_NAME}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IndexMismatch(directory, f"{FACTS_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IndexMismatch(directory, f"{FACTS_NAME} is not a JSON object")
    for key, want in _FACT_TYPES.items():
        value = data.get(key)
        if not isinstance(value, want) or isinstance(value, bool):
            raise IndexMismatch(
                directory, f"{FACTS_NAME}: field {key!r} missing or not {want.__name__}"
            )
    return cast(SavedFacts, {key: data[key] for key in _FACT_TYPES})


def remove_stale(directory: Path, keep: str) -> None:
    """Remove graph files other than ``keep`` and leftover temporary files."""
    for path in directory.iterdir():
        name = path.name
        if name == keep or not (BIN_RE.match(name) or name == FACTS_NAME + ".tmp"):
            continue
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("could not remove stale index file %s: %s", path, exc)


def hnswlib_version() -> str:
    try:
        return metadata.version("hnswlib")
    except metadata.PackageNotFoundError:
        return "unknown"
