"""The vector index: hnswlib (cosine) behind one readers-writer lock, saved atomically.

Labels are database keys of vector rows; the database's float16 copies
(:mod:`sidecar.embeddings.codec`) rebuild or repair it. Locking and the crash-safe
save are described in docs/design/archive.md.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import operator
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import hnswlib
import numpy as np
import numpy.typing as npt

from sidecar.config import IndexConfig
from sidecar.embeddings.codec import IndexInputError, VectorIndexError
from sidecar.embeddings.index_files import (
    BIN_RE,
    FACTS_NAME,
    FORMAT_VERSION,
    IndexMismatch,
    SavedFacts,
    hnswlib_version,
    labels_checksum,
    read_saved_facts,
    remove_stale,
)
from sidecar.embeddings.rwlock import ReadWriteLock
from sidecar.files import fsync_dir, sha256_file, write_durably

logger = logging.getLogger(__name__)

SPACE: Final = "cosine"
_RANDOM_SEED: Final = 100
_CONTIGUOUS_MSG: Final = "contiguous 2D array"
_MIN_NORM: Final = 1e-12

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]


# ---------------------------------------------------------------------- errors
class IndexSaveError(VectorIndexError):
    """Saving the index failed; the previously saved index is unchanged."""


# ---------------------------------------------------------------------- facts
@dataclass(frozen=True)
class IndexFacts:
    """What the index holds right now.

    Attributes
    ----------
    dim, space
        Vector dimension and hnswlib space (always ``"cosine"``).
    count
        Live (searchable) elements.
    deleted
        Elements marked deleted; they keep their slot until a rebuild.
    capacity
        Slots allocated (grows by resizing).
    m, ef_construction, ef_search
        HNSW parameters in force.
    dirty
        Changed since the last save or load.
    fallbacks
        Searches answered by exact search because hnswlib could not fill ``k``.
    """

    dim: int
    space: str
    count: int
    deleted: int
    capacity: int
    m: int
    ef_construction: int
    ef_search: int
    dirty: bool
    fallbacks: int


# ---------------------------------------------------------------------- index
class VectorIndex:
    """An hnswlib cosine index whose labels are database keys.

    ``VectorIndex(dim, cfg)`` is empty; :meth:`build` bulk-loads stored
    vectors and :meth:`load` reads a saved index.

    Parameters
    ----------
    dim
        Vector dimension.
    cfg
        Index settings: ``m``, ``ef_construction``, ``ef_search`` and
        ``initial_capacity`` (unless ``capacity`` is given).
    capacity
        Initial number of slots.
    num_threads
        Threads hnswlib may use for ``add_items``.
    """

    def __init__(
        self,
        dim: int,
        cfg: IndexConfig,
        *,
        capacity: int | None = None,
        num_threads: int = 1,
    ) -> None:
        if dim < 1:
            raise IndexInputError(f"dim must be >= 1, got {dim}")
        cap = cfg.initial_capacity if capacity is None else capacity
        raw = hnswlib.Index(space=SPACE, dim=dim)
        raw.init_index(
            max_elements=max(1, cap),
            M=cfg.m,
            ef_construction=cfg.ef_construction,
            random_seed=_RANDOM_SEED,
        )
        self._setup(raw, dim, cfg, set(), num_threads)

    def _setup(
        self, raw: Any, dim: int, cfg: IndexConfig, live: set[int], num_threads: int
    ) -> None:
        self._raw = raw
        self._dim = dim
        self._cfg = cfg
        self._num_threads = max(1, num_threads)
        self._live = live
        self._deleted: set[int] = {int(x) for x in raw.get_ids_list()} - live
        self._ef = cfg.ef_search
        raw.set_ef(self._ef)
        self._lock = ReadWriteLock()
        self._save_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._generation = 0
        self._saved_generation = 0
        self._fallbacks = 0

    @classmethod
    def _wrap(
        cls, raw: Any, dim: int, cfg: IndexConfig, live: set[int], num_threads: int
    ) -> VectorIndex:
        """Wrap an hnswlib index read from disk."""
        index = cls.__new__(cls)
        index._setup(raw, dim, cfg, live, num_threads)
        return index

    # ------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        labels: npt.ArrayLike,
        vectors: npt.ArrayLike,
        cfg: IndexConfig,
        *,
        num_threads: int = 1,
    ) -> VectorIndex:
        """Bulk-build an index from stored vectors.

        Parameters
        ----------
        labels
            Database keys, shape ``(n,)``, unique, >= 0.
        vectors
            Shape ``(n, dim)``.
        cfg
            Index settings.
        num_threads
            Threads for the bulk insert (and later ``add`` calls).

        Raises
        ------
        IndexInputError
            Invalid labels or vectors.
        """
        vecs = np.asarray(vectors)
        if vecs.ndim != 2:
            raise IndexInputError(f"vectors must have shape (n, dim), got {vecs.shape}")
        n, dim = vecs.shape
        index = cls(dim, cfg, capacity=max(cfg.initial_capacity, n), num_threads=num_threads)
        index.add(labels, vecs)
        return index

    # ---------------------------------------------------------------- queries
    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._dim

    @property
    def capacity(self) -> int:
        """Slots allocated."""
        with self._lock.read():
            return int(self._raw.get_max_elements())

    @property
    def dirty(self) -> bool:
        """Changed since the last save or load."""
        return self._generation != self._saved_generation

    def __len__(self) -> int:
        with self._lock.read():
            return len(self._live)

    def __contains__(self, label: object) -> bool:
        if not isinstance(label, int | np.integer):
            return False
        with self._lock.read():
            return int(label) in self._live

    def labels(self) -> LabelArray:
        """The live labels, sorted."""
        with self._lock.read():
            return np.sort(np.fromiter(self._live, dtype=np.int64, count=len(self._live)))

    def facts(self) -> IndexFacts:
        """A consistent snapshot of counts and parameters."""
        with self._lock.read():
            return self._facts_locked()

    def _facts_locked(self) -> IndexFacts:
        return IndexFacts(
            dim=self._dim,
            space=SPACE,
            count=len(self._live),
            deleted=len(self._deleted),
            capacity=int(self._raw.get_max_elements()),
            m=int(self._raw.M),
            ef_construction=int(self._raw.ef_construction),
            ef_search=self._ef,
            dirty=self.dirty,
            fallbacks=self._fallbacks,
        )

    def verify_against(self, labels_in_db: Iterable[int]) -> tuple[set[int], set[int]]:
        """Compare with the labels the database holds.

        Returns
        -------
        missing, extra
            Labels in the database but not live in the index (add them from the
            stored vectors), and live labels the database no longer has (mark
            them deleted).
        """
        wanted = {int(x) for x in labels_in_db}
        with self._lock.read():
            live = set(self._live)
        return wanted - live, live - wanted

    # ----------------------------------------------------------------- writes
    def add(self, labels: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Insert vectors, or replace the vectors of labels already present.

        A label marked deleted becomes visible again with the new vector. The
        index grows (doubling) when it is full.

        Parameters
        ----------
        labels
            Database keys, shape ``(n,)``, unique within the call, >= 0.
        vectors
            Shape ``(n, dim)`` (or ``(dim,)`` with one label), finite and not
            zero; normalised here, so any positive scale gives the same result.

        Raises
        ------
        IndexInputError
            Invalid labels or vectors.
        VectorIndexError
            hnswlib failed (the label bookkeeping is resynchronised first).
        """
        labs = _check_labels(labels)
        vecs = _check_vectors(vectors, self._dim, what="vectors")
        if vecs.shape[0] != labs.shape[0]:
            raise IndexInputError(f"{labs.shape[0]} labels but {vecs.shape[0]} vectors")
        if labs.size == 0:
            return
        with self._lock.write():
            label_list = [int(x) for x in labs]
            revived = [x for x in label_list if x in self._deleted]
            new = sum(1 for x in label_list if x not in self._live and x not in self._deleted)
            needed = int(self._raw.element_count) + new
            capacity = int(self._raw.get_max_elements())
            try:
                if needed > capacity:
                    new_capacity = max(needed, 2 * capacity)
                    logger.info("growing vector index from %d to %d slots", capacity, new_capacity)
                    self._raw.resize_index(new_capacity)
                for label in revived:
                    self._raw.unmark_deleted(label)
                self._raw.add_items(vecs, labs, num_threads=self._num_threads)
            except (RuntimeError, MemoryError) as exc:
                self._resync_locked()
                raise VectorIndexError(f"adding {len(label_list)} vectors failed: {exc}") from exc
            finally:
                self._generation += 1
            self._live.update(label_list)
            self._deleted.difference_update(revived)

    def mark_deleted(self, labels: Iterable[int] | npt.NDArray[np.integer[Any]]) -> int:
        """Hide labels from searches; labels not live are ignored.

        Returns
        -------
        int
            How many labels were live and are now deleted.
        """
        if isinstance(labels, np.ndarray):
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise IndexInputError(f"labels must be integers, got {labels.dtype}")
            wanted = {int(x) for x in labels.reshape(-1)}
        else:
            try:
                wanted = {operator.index(x) for x in labels}
            except TypeError as exc:
                raise IndexInputError(f"labels must be integers: {exc}") from exc
        count = 0
        with self._lock.write():
            for label in wanted:
                if label not in self._live:
                    continue
                self._raw.mark_deleted(label)
                self._live.discard(label)
                self._deleted.add(label)
                count += 1
            if count:
                self._generation += 1
        return count

    # ----------------------------------------------------------------- search
    def search(
        self, vectors: npt.ArrayLike, k: int, ef: int | None = None
    ) -> tuple[LabelArray, FloatArray]:
        """Approximate nearest neighbours by cosine similarity.

        Parameters
        ----------
        vectors
            Queries, shape ``(q, dim)`` or ``(dim,)``.
        k
            Neighbours per query; capped at the number of live elements.
        ef
            HNSW search breadth; default ``cfg.ef_search`` (hnswlib uses at
            least ``k``). A different value takes the lock exclusively.

        Returns
        -------
        labels, scores
            Shape ``(q, min(k, len(self)))`` each: int64 labels and float32
            cosine similarities, best first. An empty index gives ``(q, 0)``.

        Notes
        -----
        When hnswlib cannot fill ``k`` results ("Cannot return the results in a
        contiguous 2D array": live elements the graph no longer reaches after
        many deletions, typically with a small M), the search is answered
        exactly from the live vectors under the same lock hold. Retrying with
        a larger ``ef`` first does not help with hnswlib 0.8.0: with deleted
        elements present its search already walks the whole reachable graph
        until it has ``ef`` live results, so a larger ``ef`` finds nothing more
        (600 of 600 such failures stayed failures at ef 32, 128 and 1000),
        while the retry would need the lock exclusively.
        """
        queries = _check_vectors(vectors, self._dim, what="queries")
        if k < 1:
            raise IndexInputError(f"k must be >= 1, got {k}")
        if ef is not None and ef < 1:
            raise IndexInputError(f"ef must be >= 1, got {ef}")
        if ef is None or ef == self._ef:
            with self._lock.read():
                return self._search_locked(queries, k)
        with self._lock.write():  # set_ef changes what concurrent searches use
            self._raw.set_ef(ef)
            try:
                return self._search_locked(queries, k)
            finally:
                self._raw.set_ef(self._ef)

    def _search_locked(self, queries: FloatArray, k: int) -> tuple[LabelArray, FloatArray]:
        k_eff = min(k, len(self._live))
        if k_eff == 0:
            return _empty(queries.shape[0])
        try:
            return self._knn_locked(queries, k_eff)
        except RuntimeError as exc:
            if _CONTIGUOUS_MSG not in str(exc):
                raise VectorIndexError(f"search failed: {exc}") from exc
        with self._stats_lock:
            self._fallbacks += 1
        logger.debug("hnsw search could not return %d results; exact search instead", k_eff)
        return self._exact_locked(queries, k_eff, None)

    def get(self, labels: Iterable[int]) -> FloatArray:
        """The stored unit vectors of live ``labels``, in that order, ``(n, dim)``."""
        with self._lock.read():
            items = self._raw.get_items([int(x) for x in labels])
        return np.asarray(items, dtype=np.float32).reshape(-1, self._dim)

    def exact_search(
        self, vectors: npt.ArrayLike, k: int, allowed: Iterable[int] | None = None
    ) -> tuple[LabelArray, FloatArray]:
        """Brute-force nearest neighbours over the live vectors.

        For filtered queries and for measuring recall. Fetches the vectors from
        hnswlib, so it costs ``O(n * dim)`` per call.

        Parameters
        ----------
        vectors
            Queries, shape ``(q, dim)`` or ``(dim,)``.
        k
            Neighbours per query; capped at the number of candidates.
        allowed
            Only these labels are candidates (those not live are ignored).

        Returns
        -------
        labels, scores
            As :meth:`search`; ties are broken by the smaller label.
        """
        queries = _check_vectors(vectors, self._dim, what="queries")
        if k < 1:
            raise IndexInputError(f"k must be >= 1, got {k}")
        allowed_set = None if allowed is None else {int(x) for x in allowed}
        with self._lock.read():
            return self._exact_locked(queries, k, allowed_set)

    def _knn_locked(self, queries: FloatArray, k: int) -> tuple[LabelArray, FloatArray]:
        raw_labels, distances = self._raw.knn_query(queries, k=k, num_threads=1)
        scores = (1.0 - np.asarray(distances, dtype=np.float32)).astype(np.float32)
        return np.asarray(raw_labels).astype(np.int64), scores

    def _exact_locked(
        self, queries: FloatArray, k: int, allowed: set[int] | None
    ) -> tuple[LabelArray, FloatArray]:
        candidates = self._live if allowed is None else self._live & allowed
        if not candidates:
            return _empty(queries.shape[0])
        cand = np.sort(np.fromiter(candidates, dtype=np.int64, count=len(candidates)))
        matrix = np.asarray(self._raw.get_items(cand), dtype=np.float32)
        sims = queries @ matrix.T  # both L2-normalised
        k_eff = min(k, cand.shape[0])
        if k_eff < cand.shape[0]:
            top = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        else:
            top = np.broadcast_to(np.arange(cand.shape[0]), sims.shape)
        top_scores = np.take_along_axis(sims, top, axis=1)
        # best score first, then the smaller label (cand is sorted, so the smaller index)
        order = np.lexsort((top, -top_scores), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        return cand[top], np.take_along_axis(sims, top, axis=1).astype(np.float32)

    def _resync_locked(self) -> None:
        """Rebuild the live/deleted bookkeeping from hnswlib itself."""
        self._live = _probe_live(self._raw)
        self._deleted = {int(x) for x in self._raw.get_ids_list()} - self._live

    # ------------------------------------------------------------ persistence
    def save(self, directory: Path, model_id: str, *, fsync: bool = True) -> SavedFacts:
        """Write the index and its facts atomically (see the module notes).

        Searches go on during the save; writers wait while hnswlib writes.

        Parameters
        ----------
        directory
            Index directory (created if missing).
        model_id
            Identifies the embedding model (and preprocessing) that made the
            vectors; :meth:`load` refuses an index saved with another one.
        fsync
            fsync files and the directory (turn off only for tests or scratch).

        Returns
        -------
        SavedFacts
            What was written to ``index.json``.

        Raises
        ------
        IndexSaveError
            A file could not be written; the previous save is still loadable.
        """
        with self._save_lock:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                seq = 1 + max(
                    (int(m.group(1)) for p in directory.iterdir() if (m := BIN_RE.match(p.name))),
                    default=0,
                )
                bin_name = f"index-{seq:06d}.bin"
                bin_path = directory / bin_name
                bin_tmp = directory / (bin_name + ".tmp")
                with self._lock.read():
                    self._raw.save_index(str(bin_tmp))
                    facts = self._facts_locked()
                    live_sum = labels_checksum(self._live)
                    generation = self._generation
                digest = sha256_file(bin_tmp, fsync=fsync)
                os.replace(bin_tmp, bin_path)
                if fsync:
                    fsync_dir(directory)
                saved: SavedFacts = {
                    "format_version": FORMAT_VERSION,
                    "model_id": model_id,
                    "dim": facts.dim,
                    "space": facts.space,
                    "count": facts.count,
                    "deleted": facts.deleted,
                    "capacity": facts.capacity,
                    "m": facts.m,
                    "ef_construction": facts.ef_construction,
                    "ef_search": facts.ef_search,
                    "saved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "index_file": bin_name,
                    "index_sha256": digest,
                    "labels_sha256": live_sum,
                    "hnswlib_version": hnswlib_version(),
                }
                write_durably(
                    directory / FACTS_NAME,
                    (json.dumps(saved, indent=2, sort_keys=True) + "\n").encode(),
                    fsync=fsync,
                    tmp=directory / (FACTS_NAME + ".tmp"),  # cleared by name (index_files)
                )
            except OSError as exc:
                raise IndexSaveError(f"cannot save index in {directory}: {exc}") from exc
            except RuntimeError as exc:  # hnswlib could not open/write the file
                raise IndexSaveError(f"cannot save index in {directory}: {exc}") from exc
            self._saved_generation = generation
            try:
                remove_stale(directory, keep=bin_name)
            except OSError as exc:  # the save itself is committed
                logger.warning("could not clean index directory %s: %s", directory, exc)
        logger.info("saved vector index: %d vectors (%d deleted)", facts.count, facts.deleted)
        return saved

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        expected_model_id: str,
        expected_dim: int,
        cfg: IndexConfig,
        num_threads: int = 1,
    ) -> VectorIndex:
        """Load a saved index, checking that it is whole and made by this model.

        Parameters
        ----------
        directory
            Index directory written by :meth:`save`.
        expected_model_id, expected_dim
            The model in use now; a different one means the vectors are stale.
        cfg
            Index settings; an index built with another ``m`` or
            ``ef_construction`` is refused so that the change takes effect.
        num_threads
            Threads hnswlib may use for ``add_items``.

        Raises
        ------
        IndexMismatch
            Missing or unreadable files, a checksum that does not match, another
            model id, dim or graph parameters: rebuild from stored vectors.
        """
        saved = read_saved_facts(directory)
        if saved["format_version"] != FORMAT_VERSION:
            raise IndexMismatch(
                directory, f"format version {saved['format_version']}, expected {FORMAT_VERSION}"
            )
        if saved["space"] != SPACE:
            raise IndexMismatch(directory, f"space {saved['space']!r}, expected {SPACE!r}")
        if saved["model_id"] != expected_model_id:
            raise IndexMismatch(
                directory,
                f"model id {saved['model_id']!r}, expected {expected_model_id!r}",
            )
        if saved["dim"] != expected_dim:
            raise IndexMismatch(directory, f"dim {saved['dim']}, expected {expected_dim}")
        if saved["m"] != cfg.m or saved["ef_construction"] != cfg.ef_construction:
            raise IndexMismatch(
                directory,
                f"built with m={saved['m']}, ef_construction={saved['ef_construction']}; "
                f"configured m={cfg.m}, ef_construction={cfg.ef_construction}",
            )
        name = saved["index_file"]
        if not BIN_RE.match(name) or name.endswith(".tmp"):
            raise IndexMismatch(directory, f"invalid index file name {name!r}")
        bin_path = directory / name
        try:
            digest = sha256_file(bin_path)
        except FileNotFoundError:
            raise IndexMismatch(directory, f"index file {name} is missing") from None
        except OSError as exc:
            raise IndexMismatch(directory, f"cannot read {name}: {exc.strerror}") from exc
        if digest != saved["index_sha256"]:
            raise IndexMismatch(directory, f"SHA-256 of {name} does not match {FACTS_NAME}")
        raw = hnswlib.Index(space=SPACE, dim=expected_dim)
        try:
            raw.load_index(str(bin_path), max_elements=max(saved["capacity"], 1))
        except (RuntimeError, MemoryError, ValueError) as exc:
            raise IndexMismatch(directory, f"hnswlib cannot read {name}: {exc}") from exc
        total = int(raw.element_count)
        if total != saved["count"] + saved["deleted"]:
            raise IndexMismatch(
                directory,
                f"{name} holds {total} elements, {FACTS_NAME} says "
                f"{saved['count']} live + {saved['deleted']} deleted",
            )
        if int(raw.M) != saved["m"]:
            raise IndexMismatch(directory, f"{name} has M={raw.M}, facts say {saved['m']}")
        if saved["deleted"] == 0:
            live = {int(x) for x in raw.get_ids_list()}
        else:
            live = _probe_live(raw)
        if len(live) != saved["count"] or labels_checksum(live) != saved["labels_sha256"]:
            raise IndexMismatch(directory, f"live labels of {name} do not match {FACTS_NAME}")
        index = cls._wrap(raw, expected_dim, cfg, live, num_threads)
        logger.info(
            "loaded vector index: %d vectors (%d deleted) saved %s",
            saved["count"],
            saved["deleted"],
            saved["saved_at"],
        )
        return index


# ------------------------------------------------------------------- helpers
# ------------------------------------------------------------------- helpers
def _check_labels(labels: npt.ArrayLike) -> LabelArray:
    arr = np.asarray(labels)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise IndexInputError(f"labels must have shape (n,), got {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise IndexInputError(f"labels must be integers, got {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise IndexInputError("labels must fit int64")
    out = arr.astype(np.int64)
    if int(out.min()) < 0:
        raise IndexInputError("labels must be >= 0")
    if np.unique(out).size != out.size:
        raise IndexInputError("labels must be unique within one call")
    return np.ascontiguousarray(out)


def _check_vectors(vectors: npt.ArrayLike, dim: int, *, what: str) -> FloatArray:
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise IndexInputError(f"{what} must have shape (n, {dim}), got {np.shape(vectors)}")
    if arr.shape[0] == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise IndexInputError(f"{what} must be floating point, got {arr.dtype}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise IndexInputError(f"{what} contain values that are not finite")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if (norms < _MIN_NORM).any():
        raise IndexInputError(f"{what} contain a zero vector (no direction for cosine)")
    return np.ascontiguousarray(out / norms, dtype=np.float32)


def _empty(rows: int) -> tuple[LabelArray, FloatArray]:
    return np.zeros((rows, 0), dtype=np.int64), np.zeros((rows, 0), dtype=np.float32)


def _probe_live(raw: Any) -> set[int]:
    """The live labels of an hnswlib index (``get_items`` refuses deleted ones)."""
    live: set[int] = set()
    for label in raw.get_ids_list():
        try:
            raw.get_items([label])
        except RuntimeError:
            continue
        live.add(int(label))
    return live
