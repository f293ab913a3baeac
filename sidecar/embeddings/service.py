"""The index service: one hnswlib index per model, kept consistent with the database.

At start-up (``open``) the saved index of the active model is loaded and checked
against the database, which is the source of truth: labels missing from the
index are added from the stored (float16) vectors, labels the database no
longer has are marked deleted, and an index that cannot be loaded (missing,
corrupt, other model or dimension) is rebuilt from the stored vectors without
running the CNN. Saves are atomic (see ``VectorIndex.save``) and happen
periodically when the index changed, and at shutdown.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from sidecar.config import Config
from sidecar.db.vectors import VectorRepository
from sidecar.embeddings.codec import from_blob
from sidecar.embeddings.index import VectorIndex
from sidecar.embeddings.index_files import IndexMismatch
from sidecar.errors import SidecarError

logger = logging.getLogger(__name__)


class IndexBusy(SidecarError):
    """Another process owns the index (a running ``sidecar serve``, say)."""


@dataclass(frozen=True)
class OpenReport:
    """What ``IndexService.open`` found and did."""

    loaded: bool  # a saved index was loaded (else rebuilt)
    reason: str  # why it was rebuilt, when it was
    added: int  # labels added from stored vectors
    deleted: int  # labels marked deleted (not in the database)
    count: int  # live vectors after opening


class IndexService:
    """Own the vector index of one model.

    Parameters
    ----------
    config
        Configuration (index section, data directory).
    vectors
        Vector repository (stored vectors, labels).
    model_id, dim
        The model whose vectors this index holds.
    """

    def __init__(self, config: Config, vectors: VectorRepository, model_id: str, dim: int) -> None:
        self._cfg = config
        self._repo = vectors
        self.model_id = model_id
        self.dim = dim
        self.directory: Path = config.index_dir / model_id
        self._index = VectorIndex(dim, config.index)
        self._dirty = False
        self._save_lock = threading.Lock()
        self._lock_file: TextIO | None = None

    @property
    def index(self) -> VectorIndex:
        """The live index (thread-safe itself)."""
        return self._index

    def _take_lock(self) -> None:
        """Own the index directory: one process at a time (serve, embed, reindex)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fh = (self.directory / ".lock").open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise IndexBusy(
                f"the index of model {self.model_id} is in use by {owner}; "
                "stop it first (sidecar serve runs the embedding worker itself)"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_file = fh

    def close(self) -> None:
        """Save if changed and release the index lock."""
        try:
            self.save()
        finally:
            if self._lock_file is not None:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()
                self._lock_file = None

    def open(self) -> OpenReport:
        """Lock, load the saved index (or rebuild it) and repair it against the database.

        Raises
        ------
        IndexBusy
            Another process owns this model's index.
        """
        self._take_lock()
        loaded, reason = True, ""
        try:
            self._index = load_saved(self._cfg, self.model_id, self.dim)
        except IndexMismatch as exc:
            loaded, reason = False, str(exc)
            self._index = VectorIndex(self.dim, self._cfg.index)
        added, deleted = self.reconcile(save=False)
        self._dirty = self._dirty or not loaded
        if not loaded and len(self._index):
            logger.warning("index for model %s rebuilt from %d stored vectors: %s",
                           self.model_id, len(self._index), reason)
        if self._dirty:
            self.save()
        return OpenReport(loaded, reason, added, deleted, len(self._index))

    def reconcile(self, save: bool = True) -> tuple[int, int]:
        """Make the index hold exactly the database's vectors of this model.

        Labels missing from the index are added from the stored vectors; labels
        whose rows are gone (a deleted study, say) are marked deleted. Call it
        while no worker run is adding vectors.

        Returns
        -------
        tuple of int
            (added, deleted).
        """
        added, deleted = repair(self._index, self._repo, self.model_id, self.dim)
        if added or deleted:
            self._dirty = True
            logger.warning("index for model %s reconciled with the database: %d added, "
                           "%d removed", self.model_id, added, deleted)
            if save:
                self.save()
        return added, deleted

    def rebuild(self) -> int:
        """Rebuild the index from the stored vectors (no CNN) and save it."""
        fresh = VectorIndex(self.dim, self._cfg.index)
        for batch in self._repo.slice_vectors(self.model_id):
            fresh.add(
                np.asarray([label for label, _ in batch], dtype=np.int64),
                np.stack([from_blob(blob, self.dim) for _, blob in batch]),
            )
        self._index = fresh
        self._dirty = True
        self.save()
        return len(fresh)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Add committed vectors (their rows exist) to the index."""
        self._index.add(labels, vectors)
        self._dirty = True

    def remove(self, labels: np.ndarray) -> int:
        """Hide labels whose rows were deleted (replaced vectors); returns how many."""
        count = self._index.mark_deleted(labels)
        if count:
            self._dirty = True
        return count

    def save(self, force: bool = False) -> bool:
        """Save atomically if changed (or ``force``); returns whether it saved."""
        with self._save_lock:
            if not (self._dirty or force):
                return False
            self._dirty = False
            try:
                self._index.save(self.directory, self.model_id)
            except Exception:
                self._dirty = True
                raise
        logger.debug("index for model %s saved (%d vectors)", self.model_id, len(self._index))
        return True


def load_saved(
    config: Config, model_id: str, dim: int, *, attempts: int = 1, num_threads: int = 1
) -> VectorIndex:
    """The saved index of ``model_id``, checked (``attempts`` tries: a save may race a load).

    Raises
    ------
    IndexMismatch
        The last try's reason: rebuild from the stored vectors.
    """
    for attempt in range(attempts):
        try:
            return VectorIndex.load(
                config.index_dir / model_id,
                expected_model_id=model_id,
                expected_dim=dim,
                cfg=config.index,
                num_threads=num_threads,
            )
        except IndexMismatch:
            if attempt == attempts - 1:
                raise
    raise AssertionError("attempts must be >= 1")


def repair(
    index: VectorIndex, vectors: VectorRepository, model_id: str, dim: int
) -> tuple[int, int]:
    """Make ``index`` hold exactly the database's vectors of ``model_id``.

    Labels missing from the index are added from the stored (float16) vectors;
    labels whose rows are gone are marked deleted. Returns (added, deleted).
    """
    missing, extra = index.verify_against(vectors.labels(model_id))
    if missing:
        for batch in vectors.slice_vectors(model_id):
            rows = [(label, blob) for label, blob in batch if label in missing]
            if rows:
                index.add(
                    np.asarray([r[0] for r in rows], dtype=np.int64),
                    np.stack([from_blob(r[1], dim) for r in rows]),
                )
    deleted = 0
    if extra:
        deleted = index.mark_deleted(np.asarray(sorted(extra), dtype=np.int64))
    return len(missing), deleted


def index_in_use(config: Config) -> bool:
    """Whether another process holds an index lock (``sidecar serve``, ``embed``, ``reindex``)."""
    root = config.index_dir
    if not root.is_dir():
        return False
    for lock in sorted(root.glob("*/.lock")):
        with lock.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    return False
