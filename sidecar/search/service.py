"""Similarity search: "which studies look like this one?", for C-FIND, the CLI and HTTP.

One :class:`SearchService` answers every front door; the method (candidates by series
means and the ANN index, re-ranking by stored slice vectors) is in docs/design/search.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
from pydicom.dataset import Dataset

from sidecar.archive.reader import read_stored
from sidecar.config import Config
from sidecar.db.search_queries import (
    ReferenceRow,
    SearchQueries,
    SliceRow,
    StateSummary,
)
from sidecar.db.types import Engine
from sidecar.embeddings import preprocess
from sidecar.embeddings.codec import from_blobs
from sidecar.embeddings.index import VectorIndex
from sidecar.errors import BadQuery, IndexUnavailable, NotEmbedded, UnknownReference

if TYPE_CHECKING:
    pass

from sidecar.search.caches import (
    Means,
    Ranked,
    SliceCache,
    Slices,
    mean_rows,
    rerank,
    spread,
    unit_rows,
    view_of,
)
from sidecar.search.hits import describe, with_matches
from sidecar.search.images import embed_images
from sidecar.search.readonly import EmbeddingParts, ReadOnlyEmbedding
from sidecar.search.types import (
    LEVELS,
    MAX_K,
    MAX_QUERY_SLICES,
    EmbeddedImages,
    FloatArray,
    IntArray,
    Level,
    Reference,
    ReferenceInfo,
    SearchFilters,
    SearchResult,
)
from sidecar.search.volumes import VolumeSearch, example_volumes

logger = logging.getLogger(__name__)
RERANK_FACTOR: Final = 10
"""Candidates re-ranked per requested hit (``C = max(RERANK_FACTOR * k, MIN_CANDIDATES)``)."""
MIN_CANDIDATES: Final = 50
MAX_EXCLUDED_FETCH: Final = 256
"""Most extra ANN neighbours per query slice fetched past the excluded studies' slices."""
SERIES_PER_STUDY_FETCH: Final = 4
"""Study level: series means ranked per candidate study wanted (several may share a study)."""
IMAGE_OVERFETCH: Final = 4
EXACT_LIMIT: Final = 4096
"""Image level: neighbours per query slice beyond which a filtered query goes exact."""


@dataclass
class _Query:
    vectors: FloatArray  # (n, dim), unit rows
    info_kind: str
    info_uid: str
    own_study_pk: int | None
    own_study_uid: str
    patient_pk: int | None
    note: str = ""
    excluded: set[int] = field(default_factory=set)
    labels: list[int] | None = None  # slice vector of each query row (archived references)
    series_pk: int | None = None  # the reference series (archived series references)



class SearchService:
    """Similarity search over the archive (see the module notes for the method).

    Parameters
    ----------
    config
        The configuration (storage directory, preprocessing for query images).
    engine
        The process's engine (read only).
    embedding
        The embedding parts (``sidecar.service.app.Embedding`` in a service,
        :class:`ReadOnlyEmbedding` in a one-shot command); ``None`` when
        embedding is off: every query raises :class:`IndexUnavailable`.
    refresh_interval
        Seconds during which the in-memory mean and slice vectors are used
        without checking the database for changes.
    slice_cache
        Hold the serving model's slice vectors in memory for re-ranking (see
        the module notes). ``None`` (default): on, except with a
        :class:`ReadOnlyEmbedding` (a one-shot reader is faster reading the
        few candidates' vectors than loading them all).
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        embedding: EmbeddingParts | None,
        *,
        refresh_interval: float = 2.0,
        slice_cache: bool | None = None,
    ) -> None:
        self._cfg = config
        self._queries = SearchQueries(engine)
        self._embedding = embedding
        self._refresh = refresh_interval
        self._means: Means | None = None
        self._means_lock = threading.Lock()
        if slice_cache is None:
            slice_cache = not isinstance(embedding, ReadOnlyEmbedding)
        self._slices = SliceCache(self._queries, refresh_interval) if slice_cache else None
        self._volumes = (VolumeSearch(engine, config.index, refresh_interval)
                         if config.volumes.enabled else None)

    def warm(self) -> None:
        """Load the in-memory mean and slice vectors of the serving model now.

        Optional: otherwise the first query loads them (0.5-1.5 s per
        100 000 slice vectors on a 2-core machine). Does nothing when embedding is off or nothing
        is embedded yet.
        """
        if self._embedding is None:
            return
        serving = self._embedding.serving
        model_id, dim = serving.model_id, serving.dim
        self._mean_matrix(model_id, dim)
        if self._slices is not None:
            self._slices.view(model_id, dim)

    @property
    def cache_loaded(self) -> bool:
        """Whether the serving model's series means (and slice vectors) are in memory."""
        if self._embedding is None:
            return False
        model_id = self._embedding.serving.model_id
        means = self._means
        if means is None or means.model_id != model_id:
            return False
        if self._slices is None:
            return True
        view = self._slices.loaded
        return view is not None and view.model_id == model_id

    # -------------------------------------------------------------- public
    def search(
        self,
        reference: Reference,
        *,
        k: int,
        level: Level = "study",
        include_same_patient: bool = False,
        filters: SearchFilters | None = None,
    ) -> SearchResult:
        """Rank the studies, series or images most similar to ``reference``.

        Parameters
        ----------
        reference
            What to compare with.
        k
            Most hits returned (1 to :data:`MAX_K`); fewer when fewer qualify.
        level
            ``"study"``, ``"series"`` or ``"image"``.
        include_same_patient
            Keep the studies of the reference's patient (never its own study).
        filters
            Conditions on the hits.

        Returns
        -------
        SearchResult
            Hits in rank order (rank 1 first).

        Raises
        ------
        BadQuery
            ``k`` out of range, unknown level, malformed filters or reference,
            or query images that cannot be embedded.
        UnknownReference
            The reference UID is not in the catalogue.
        NotEmbedded
            The reference has no vectors under the serving model.
        IndexUnavailable
            Embedding is off, or query images cannot be embedded by the
            serving model in this process.
        """
        start = time.perf_counter()
        if not isinstance(reference, Reference):
            raise BadQuery("the reference must be a Reference")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise BadQuery(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        if level not in LEVELS:
            raise BadQuery(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        flt = (filters or SearchFilters()).catalogue()
        if self._embedding is None:
            raise IndexUnavailable("similarity search off: embedding is turned off "
                                   "(worker.enabled)")
        serving = self._embedding.serving  # one snapshot: a model swap may happen meanwhile
        model_id, dim, index = serving.model_id, serving.dim, serving.index

        query = self._query(reference, model_id, dim)
        excluded: set[int] = set()
        if query.own_study_pk is not None:
            excluded.add(query.own_study_pk)
        if query.patient_pk is not None and not include_same_patient:
            excluded |= self._queries.studies_of_patient(query.patient_pk)

        candidates = 0
        allowed: set[int] | None = None
        if not flt.empty:
            allowed = (self._queries.allowed_studies(flt) if level == "study"
                       else self._queries.allowed_series(flt))
        ranked: list[Ranked] = []
        if allowed is not None and not allowed:
            pass  # nothing passes the filters
        elif level == "image":
            ranked = self._rank_images(query.vectors, index, model_id, k, excluded, allowed)
        else:
            ranked, candidates = self._rank_volumes(
                query, reference, level, model_id, dim, k, excluded, allowed
            ) or self._rank_groups(level, query.vectors, index, model_id, dim, k, excluded, allowed)
        hits = with_matches(self._queries, describe(self._queries, ranked, level, k),
                            query.labels or [])
        info = ReferenceInfo(
            kind=query.info_kind,
            uid=query.info_uid,
            study_instance_uid=query.own_study_uid,
            slices=int(query.vectors.shape[0]),
            excluded_studies=len(excluded),
            note=query.note,
        )
        elapsed = (time.perf_counter() - start) * 1000.0
        logger.debug(
            "similarity query: %s reference, level %s, k %d, %d query slices, %d candidates, "
            "%d hits, model %s, %.1f ms",
            query.info_kind, level, k, info.slices, candidates, len(hits), model_id, elapsed,
        )
        return SearchResult(model_id, level, k, info, tuple(hits), candidates, elapsed)

    # ---------------------------------------------------------- reference
    def _query(self, ref: Reference, model_id: str, dim: int) -> _Query:
        kind = ref.kind
        if kind == "dataset":
            return self._query_embedded(self.embed_images(ref.datasets), model_id, dim, kind)
        if kind == "example":
            assert ref.embedded is not None  # the kind says so
            return self._query_embedded(ref.embedded, model_id, dim, kind)
        uid = ref.uid
        row = self._queries.reference(kind, uid)
        if row is None:
            raise UnknownReference(f"no {kind} with UID {uid} in the catalogue")
        note = ""
        if kind in ("study", "series") and self._slices is not None:
            view = self._slices.view(model_id, dim)
            held = (view.rows("study", row.study_pk) if kind == "study"
                    else view.rows("series", row.series_pk or 0))
            if held is not None and held.size:
                used = held[spread(held.size, MAX_QUERY_SLICES)]
                return _Query(
                    vectors=view.unit_vectors(used),
                    info_kind=kind,
                    info_uid=uid,
                    own_study_pk=row.study_pk,
                    series_pk=row.series_pk,
                    own_study_uid=row.study_instance_uid,
                    patient_pk=row.patient_pk if row.patient_id else None,
                    labels=[int(x) for x in view.labels[used].tolist()],
                )
        if kind == "study":
            rows = self._queries.slices(model_id, study_pks=[row.study_pk])
        elif kind == "series":
            rows = self._queries.slices(model_id, series_pks=[row.series_pk or 0])
        else:
            rows = self._queries.slices(model_id, instance_pk=row.instance_pk or 0)
            if not rows:
                rows, note = self._nearest_sampled(row, model_id)
        if not rows:
            raise self._not_embedded(kind, uid, row, model_id)
        chosen = [rows[i] for i in spread(len(rows), MAX_QUERY_SLICES)]
        vectors = unit_rows(from_blobs([r.blob for r in chosen], dim))
        return _Query(
            vectors=vectors,
            info_kind=kind,
            info_uid=uid,
            own_study_pk=row.study_pk,
            series_pk=row.series_pk,
            own_study_uid=row.study_instance_uid,
            patient_pk=row.patient_pk if row.patient_id else None,
            note=note,
            labels=[r.label for r in chosen],
        )

    def _nearest_sampled(self, row: ReferenceRow, model_id: str) -> tuple[list[SliceRow], str]:
        """An embedded instance that was not sampled: the nearest sampled slice of its series."""
        if row.instance_pk is None or row.series_pk is None:
            return [], ""
        summary = self._queries.states(instance_pk=row.instance_pk)
        if summary.counts.get("embedded", 0) == 0:
            return [], ""
        series = self._queries.slices(model_id, series_pks=[row.series_pk])
        if not series:
            return [], ""
        position = self._position(row.file_path)
        placed = [r for r in series if r.position_mm is not None]
        if position is not None and placed:
            best = min(placed, key=lambda r: (abs(float(r.position_mm or 0.0) - position),
                                              r.label))
            gap = abs(float(best.position_mm or 0.0) - position)
            how = f"{gap:.1f} mm away"
        else:
            number = row.instance_number or 0
            best = min(series, key=lambda r: (abs((r.instance_number or 0) - number), r.label))
            how = f"instance number {best.instance_number}"
        note = ("the instance was not sampled for embedding; the nearest sampled slice of its "
                f"series was used ({how})")
        return [best], note

    def _position(self, file_path: str) -> float | None:
        if not file_path:
            return None
        try:
            header = read_stored(self._cfg.storage_dir, file_path, pixels=False)
            infos = preprocess.frame_infos(header, 0)
        except Exception as exc:  # noqa: BLE001 - fall back to the instance number
            logger.debug("cannot read the position of %s: %s", file_path, exc)
            return None
        return infos[0].position_mm if infos else None

    def _not_embedded(
        self, kind: str, uid: str, row: ReferenceRow, model_id: str
    ) -> NotEmbedded:
        scope: dict[str, int | None]
        if kind == "instance":
            scope = {"instance_pk": row.instance_pk}
        elif kind == "series":
            scope = {"series_pk": row.series_pk}
        else:
            scope = {"study_pk": row.study_pk}
        summary: StateSummary = self._queries.states(**scope)
        counts = dict(summary.counts)
        what = f"{kind} {uid}"
        if counts.get("pending"):
            n = counts["pending"]
            why = ("its study is still receiving (not stable yet)" if not row.study_stable
                   else "waiting for the embedding worker")
            return NotEmbedded(
                f"{what} is not embedded yet: {n} instance{'s' if n != 1 else ''} pending "
                f"({why})", "pending", counts,
            )
        if counts.get("failed"):
            n = counts["failed"]
            return NotEmbedded(
                f"{what} is not embedded: embedding failed for {n} instance"
                f"{'s' if n != 1 else ''} ({summary.error or 'no detail'})", "failed", counts,
            )
        if counts.get("embedded"):
            others = sorted(self._queries.models_with_vectors(**scope) - {model_id})
            if others:
                detail = (f"it has vectors of model {', '.join(others)} only; re-embedding "
                          "with the serving model is in progress")
            else:
                detail = "none of its slices has a vector"
            return NotEmbedded(
                f"{what} has no vectors of the serving model {model_id}: {detail}",
                "embedded", counts,
            )
        if counts.get("skipped"):
            return NotEmbedded(
                f"{what} is not embedded: not an image for embedding (skipped: "
                f"{summary.skip_reason or 'no reason recorded'})", "skipped", counts,
            )
        return NotEmbedded(f"{what} has no instances to embed", "pending", counts)

    def embed_images(self, datasets: Sequence[Dataset]) -> EmbeddedImages:
        """Embed query images with the serving model: :func:`sidecar.search.images.embed_images`."""
        return embed_images(self._embedding, self._cfg, datasets)

    def _query_embedded(
        self, images: EmbeddedImages, model_id: str, dim: int, kind: str
    ) -> _Query:
        if images.model_id != model_id or images.vectors.shape[1] != dim:
            raise IndexUnavailable(
                f"the example images were embedded with model {images.model_id}, queries are "
                f"served by model {model_id} now: send them again"
            )
        study_uid = images.study_instance_uid
        study_pk = self._queries.study_by_uid(study_uid) if study_uid else None
        patient_pk = (
            self._queries.patient_by_id(images.patient_id, images.issuer_of_patient_id)
            if images.patient_id else None
        )
        vectors = images.vectors
        if vectors.shape[0] > MAX_QUERY_SLICES:  # e.g. a whole example series
            vectors = vectors[spread(vectors.shape[0], MAX_QUERY_SLICES)]
        return _Query(
            vectors=vectors,
            info_kind=kind,
            info_uid=images.sop_instance_uid or "(no SOP Instance UID)",
            own_study_pk=study_pk,
            own_study_uid=study_uid if study_pk is not None else "",
            patient_pk=patient_pk,
        )

    # ------------------------------------------------------------ ranking
    def _mean_matrix(self, model_id: str, dim: int) -> Means:
        """The serving model's series means, checked at most every ``refresh`` seconds.

        When only new or recomputed means changed the signature (the worker
        adds series; slice keys are never reused), just those rows are read
        and merged; anything else (another model, a deleted study) reads them all.
        """
        now = time.monotonic()
        cached = self._means
        if cached is not None and cached.model_id == model_id and (
            now - cached.checked_at < self._refresh
        ):
            return cached
        with self._means_lock:
            cached = self._means
            signature = self._queries.mean_signature(model_id)
            fresh: Means | None = None
            if cached is not None and cached.model_id == model_id:
                if cached.signature == signature:
                    fresh = replace(cached, checked_at=now)
                elif signature[1] > cached.signature[1] and signature[0] >= cached.signature[0]:
                    fresh = self._merged_means(cached, signature, dim, now)
            if fresh is None:
                rows = self._queries.mean_vectors(model_id)
                keys, study_keys, matrix = mean_rows(rows, dim)
                fresh = Means(model_id, signature, now, keys, study_keys, matrix)
                logger.debug("loaded %d series mean vectors of model %s", keys.size, model_id)
            self._means = fresh
            return fresh

    def _merged_means(
        self, cached: Means, signature: tuple[int, int], dim: int, now: float
    ) -> Means | None:
        """``cached`` with the means changed since its signature; ``None``: read them all."""
        keys, study_keys, matrix = mean_rows(
            self._queries.series_means_after(cached.model_id, cached.signature[1]), dim
        )
        at = np.full(keys.size, -1, dtype=np.int64)  # row of each in ``cached``, or -1
        if cached.keys.size and keys.size:
            order = np.argsort(cached.keys)
            pos = np.minimum(np.searchsorted(cached.keys, keys, sorter=order),
                             cached.keys.size - 1)
            found = cached.keys[order[pos]] == keys
            at[found] = order[pos[found]]
        old, new = at >= 0, at < 0
        if cached.keys.size + int(new.sum()) != signature[0]:
            return None  # a study was deleted meanwhile as well
        merged = cached.matrix.copy() if old.any() else cached.matrix
        merged[at[old]] = matrix[old]
        logger.debug("series means of model %s: %d recomputed, %d new", cached.model_id,
                     int(old.sum()), int(new.sum()))
        return Means(
            cached.model_id, signature, now,
            np.concatenate([cached.keys, keys[new]]),
            np.concatenate([cached.study_keys, study_keys[new]]),
            np.concatenate([merged, matrix[new]]) if new.any() else merged,
        )

    def _rank_groups(
        self,
        level: Literal["study", "series"],
        queries: FloatArray,
        index: VectorIndex,
        model_id: str,
        dim: int,
        k: int,
        excluded: set[int],
        allowed: set[int] | None,
    ) -> tuple[list[Ranked], int]:
        """Candidates by mean vectors and slice ANN, re-ranked by slice vectors.

        Returns one :class:`Ranked` per candidate (score, keys of the best
        slice, the best pair), best first, and the number of candidates.
        """
        c = max(RERANK_FACTOR * k, MIN_CANDIDATES)

        def ok(key: int, study: int) -> bool:
            return study not in excluded and (allowed is None or key in allowed)

        # (a) exact cosine against the series means (a study: its best series)
        means = self._mean_matrix(model_id, dim)
        group_keys = means.keys if level == "series" else means.study_keys
        chosen: list[int] = []
        if means.keys.size:
            mask = ~np.isin(means.study_keys, np.fromiter(excluded, dtype=np.int64))
            if allowed is not None:
                mask &= np.isin(group_keys, np.fromiter(allowed, dtype=np.int64))
            rows = np.flatnonzero(mask)
            if rows.size:
                centre = unit_rows(queries.mean(axis=0, keepdims=True))[0]
                sims = (means.matrix @ centre)[rows]  # no copy of the matrix
                take = min(c if level == "series" else SERIES_PER_STUDY_FETCH * c, rows.size)
                top = np.argpartition(-sims, take - 1)[:take] if take < rows.size else \
                    np.arange(rows.size)
                top = top[np.lexsort((group_keys[rows[top]], -sims[top]))]
                seen_keys: set[int] = set()
                for i in top:
                    key = int(group_keys[rows[i]])
                    if key not in seen_keys:
                        seen_keys.add(key)
                        chosen.append(key)
                        if len(chosen) == c:
                            break
        # (b) the groups of each query slice's nearest slices
        live = len(index)
        if live:
            # the excluded studies' own slices are often the nearest: fetch past them
            fetch = max(2 * k, 20) + min(self._slice_count(model_id, dim, excluded),
                                         MAX_EXCLUDED_FETCH)
            labels, scores = index.search(queries, min(live, fetch))
            owners = self._owners(model_id, dim, labels, means.signature[1])
            best: dict[int, float] = {}
            for label, score in zip(labels.reshape(-1), scores.reshape(-1), strict=True):
                owner = owners.get(int(label))
                if owner is None:
                    continue
                key = owner[0] if level == "study" else owner[1]
                if ok(key, owner[0]) and float(score) > best.get(key, -2.0):
                    best[key] = float(score)
            extra = sorted(best, key=lambda g: (-best[g], g))[:c]
            seen = set(chosen)
            chosen.extend(g for g in extra if g not in seen)
        if not chosen:
            return [], 0
        # re-rank with the candidates' slice vectors
        view = self._view(level, model_id, dim, chosen, means.signature[1])
        return rerank(view, level, queries, chosen), len(chosen)

    def _view(self, level: str, model_id: str, dim: int, chosen: list[int], need: int) -> Slices:
        if self._slices is not None:
            return self._slices.view(model_id, dim, need=need)
        if level == "study":
            return view_of(model_id, dim, self._queries.slices(model_id, study_pks=chosen))
        return view_of(model_id, dim, self._queries.slices(model_id, series_pks=chosen))

    def _rank_volumes(
        self, query: _Query, reference: Reference, level: Literal["study", "series"],
        model_id: str, dim: int, k: int, excluded: set[int], allowed: set[int] | None,
    ) -> tuple[list[Ranked], int] | None:
        """Rank by volume vectors when the reference series or study has one (else ``None``).

        The best (query slice, hit slice) pair of each hit is looked up in its best
        series, so that a person sees why it matched; the score is the volume cosine.
        """
        if self._volumes is None:
            return None
        if query.info_kind == "dataset" and self._embedding is not None:
            found = example_volumes(reference.datasets, self._cfg, self._embedding.embedder)
        elif query.info_kind == "study" and query.own_study_pk is not None:
            series = self._volumes.series_of_study(model_id, query.own_study_pk)
            found = self._volumes.vectors_of(model_id, series)
        elif query.info_kind == "series" and query.series_pk is not None:
            found = self._volumes.vectors_of(model_id, [query.series_pk])
        else:
            return None
        if found is None:
            return None
        hits = self._volumes.rank(model_id, found[0], found[1], level, k, excluded, allowed)
        if not hits:
            return None
        top = hits[: 2 * k]
        view = self._view("series", model_id, dim, [h.series_pk for h in top], 0)
        pairs = {r.keys[1]: r for r in rerank(view, "series", query.vectors,
                                               [h.series_pk for h in top])}
        ranked = [pairs[h.series_pk]._replace(score=h.score, calibrated=h.calibrated,
                                              ranked_by="volume")
                  for h in top if h.series_pk in pairs]
        return ranked, len(hits)

    def _rank_images(
        self,
        queries: FloatArray,
        index: VectorIndex,
        model_id: str,
        k: int,
        excluded: set[int],
        allowed_series: set[int] | None,
    ) -> list[Ranked]:
        """ANN over slices, post-filtered and over-fetched; one entry per instance."""
        live = len(index)
        if live == 0:
            return []
        fetch = min(live, max(IMAGE_OVERFETCH * k, 32))
        while True:
            if allowed_series is not None and (
                fetch > EXACT_LIMIT or fetch * queries.shape[0] > 16 * EXACT_LIMIT
            ):
                # A selective filter: rank the allowed slices exactly, once.
                labels_ok = self._queries.slice_labels(model_id, series_pks=allowed_series)
                if not labels_ok:
                    return []
                labels, scores = index.exact_search(queries, min(fetch, live), allowed=labels_ok)
                final = True
            else:
                labels, scores = index.search(queries, fetch)
                final = fetch >= live
            owners = self._owners(model_id, queries.shape[1], labels)
            best: dict[int, Ranked] = {}
            for row, (row_labels, row_scores) in enumerate(zip(labels.tolist(),
                                                               scores.tolist(), strict=True)):
                for label, score in zip(row_labels, row_scores, strict=True):
                    owner = owners.get(int(label))
                    if owner is None or owner[0] in excluded:
                        continue
                    if allowed_series is not None and owner[1] not in allowed_series:
                        continue
                    key = owner[2]
                    if key not in best or float(score) > best[key].score:
                        best[key] = Ranked(float(score), (owner[0], owner[1], owner[2]),
                                           int(label), row, float(score))
            if len(best) >= k or final:
                return sorted(best.values(), key=lambda item: -item.score)
            fetch = min(live, fetch * 2)

    def _slice_count(self, model_id: str, dim: int, studies: Iterable[int]) -> int:
        """Slice vectors of the serving model under some studies."""
        keys = list(studies)
        if not keys:
            return 0
        if self._slices is None:
            return len(self._queries.slice_labels(model_id, study_pks=keys))
        view = self._slices.view(model_id, dim)
        return sum(int(rows.size) for s in keys if (rows := view.rows("study", s)) is not None)

    def _owners(
        self, model_id: str, dim: int, labels: IntArray, need: int = 0
    ) -> dict[int, tuple[int, int, int]]:
        """label -> (study, series, instance) keys of the labels that still have a row."""
        unique = np.unique(labels)
        if self._slices is None:
            return {label: (o[0], o[1], o[2]) for label, o in
                    self._queries.slice_owners(int(x) for x in unique).items()}
        top = int(unique[-1]) if unique.size else 0
        view = self._slices.view(model_id, dim, need=max(top, need))
        rows = view.owners(unique)
        return {
            int(label): (int(view.study[r]), int(view.series[r]), int(view.instance[r]))
            for label, r in zip(unique.tolist(), rows.tolist(), strict=True) if r >= 0
        }


__all__ = [
    "SearchService",
]
