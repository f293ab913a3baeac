"""The read-only opening of the serving index, for one-shot readers (``sidecar search``).

It loads the saved index files without the file lock, reconciles the copy with the
database in memory and never saves it (docs/design/search.md).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sidecar.config import Config
from sidecar.db.types import Engine
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.embeddings.index import VectorIndex
from sidecar.embeddings.index_files import IndexMismatch, read_saved_facts
from sidecar.embeddings.service import load_saved, repair
from sidecar.errors import IndexUnavailable

if TYPE_CHECKING:
    from sidecar.embeddings.model import Embedder


logger = logging.getLogger(__name__)



# ------------------------------------------------------------- embedding parts
class ServingIndex(Protocol):
    """The index that answers queries (``IndexService`` or a read-only copy)."""

    @property
    def model_id(self) -> str:
        """The model of the vectors it holds."""
        ...

    @property
    def dim(self) -> int:
        """The vectors' length."""
        ...

    @property
    def index(self) -> VectorIndex:
        """The live index."""
        ...


class EmbeddingParts(Protocol):
    """What the service needs of ``service.app.Embedding`` (or :class:`ReadOnlyEmbedding`)."""

    @property
    def serving(self) -> ServingIndex:
        """The index answering queries (read once per query)."""
        ...

    @property
    def embedder(self) -> Embedder | None:
        """The process's embedder, for queries by image."""
        ...


@dataclass(frozen=True)
class _ReadOnlyServing:
    model_id: str
    dim: int
    index: VectorIndex


class ReadOnlyEmbedding:
    """The serving index opened read-only, for one-shot readers beside ``sidecar serve``.

    The serving model is the one a service starting now would serve: the
    active model recorded in the database when it has vectors, else the
    configured model. Its saved index files are loaded with
    ``VectorIndex.load`` without taking the index lock (a load racing a save
    is retried; an index that cannot be loaded is built in memory from the
    stored vectors), the copy is reconciled with the database in memory
    only, and it is never saved.

    Parameters
    ----------
    config
        The configuration.
    engine
        The process's engine.
    embedder_factory
        Loads the configured embedder; called only when needed (to embed
        query images, or to learn the configured model's id when no active
        model has vectors).

    Raises
    ------
    IndexUnavailable
        Nothing has been embedded yet.
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        embedder_factory: Callable[[], Embedder] | None = None,
    ) -> None:
        self._factory = embedder_factory
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()
        repo = VectorRepository(engine)
        counts = repo.count_vectors()
        if not counts:
            raise IndexUnavailable(
                "no vectors yet: nothing has been embedded (run `sidecar serve` or "
                "`sidecar embed`)"
            )
        active = repo.get_setting(ACTIVE_MODEL_KEY)
        if active and counts.get(active):
            model_id, dim = active, _stored_dim(config, repo, active)
        else:
            embedder = self.embedder
            if embedder is None:
                raise IndexUnavailable("no active model with vectors and no embedding model")
            model_id, dim = embedder.model_id, embedder.dim
        self._serving = _ReadOnlyServing(model_id, dim, _load_read_only(config, repo, model_id,
                                                                        dim))

    @property
    def serving(self) -> ServingIndex:
        """The read-only copy of the serving index."""
        return self._serving

    @property
    def embedder(self) -> Embedder | None:
        """The configured embedder, loaded on first use (``None`` without a factory)."""
        with self._lock:
            if self._embedder is None and self._factory is not None:
                self._embedder = self._factory()
            return self._embedder


def _stored_dim(config: Config, repo: VectorRepository, model_id: str) -> int:
    try:
        return int(read_saved_facts(config.index_dir / model_id)["dim"])
    except IndexMismatch:
        for batch in repo.slice_vectors(model_id, batch=1):
            return len(batch[0][1]) // 2  # float16
    raise IndexUnavailable(f"no vectors of model {model_id}")


def _load_read_only(
    config: Config, repo: VectorRepository, model_id: str, dim: int, attempts: int = 3
) -> VectorIndex:
    threads = max(1, os.cpu_count() or 1)
    try:  # a save may replace the graph file between two reads: a few tries
        index = load_saved(config, model_id, dim, attempts=attempts, num_threads=threads)
    except IndexMismatch as exc:
        logger.warning("saved index of model %s not usable (%s): building a read-only copy "
                       "from the stored vectors", model_id, exc.reason)
        index = VectorIndex(dim, config.index, num_threads=threads)
    added, hidden = repair(index, repo, model_id, dim)
    if added or hidden:
        logger.info("read-only index of model %s: %d vectors added from the database, %d "
                    "hidden (not saved)", model_id, added, hidden)
    return index


__all__ = [
    "EmbeddingParts",
    "ReadOnlyEmbedding",
    "ServingIndex",
]
