"""Similarity search: "which studies look like this one?", for C-FIND, the CLI and HTTP.

One :class:`SearchService` answers every front door. A query names a
*reference* (exactly one of a SOP Instance UID, a Series Instance UID, a Study
Instance UID, or DICOM datasets that are not in the archive) and a *level*
(``study``, ``series`` or ``image``); it returns up to ``k`` ranked hits,
best first, with a score (cosine similarity, higher is more similar), the
UIDs of the hit's best-matching slice and the catalogue attributes a viewer
shows. Every vector involved belongs to the **serving** model (the model whose
index answers queries: ``embedding.serving.model_id``; during re-embedding
after a model change, the previous model).

Query vectors
-------------
* Archived references: the stored slice vectors (float16 in the database) of
  the reference under the serving model: every embedded slice of the study or
  series, the instance's own slices (frames). The CNN is never run for them.
  Slice sampling embeds about one slice every ``preprocess.slice_spacing_mm``,
  so most instances of a thin-slice series have no vector of their own: an
  instance reference whose instance is ``embedded`` but was not sampled uses
  the sampled slice of its series nearest to it (by position along the slice
  normal, read from its stored header; else by Instance Number), and the
  result's ``reference.note`` says so.
* Datasets: sampled per series exactly as the embedding worker does
  (``preprocess.frame_infos`` + ``preprocess.sample``), prepared
  (``preprocess.prepare``) and embedded with the process's embedder, which
  must be the serving model (it is not while a model change is re-embedding
  the archive: :class:`IndexUnavailable`).
* At most :data:`MAX_QUERY_SLICES` query slices are used, evenly spread.

Ranking (study and series levels)
---------------------------------
1. **Candidates.** (a) By the series' stored *mean* vectors (``SeriesVector``:
   the normalised mean of a series' slice vectors), exact cosine to the
   normalised mean of the query slices: at series level the
   ``C = max(RERANK_FACTOR * k, MIN_CANDIDATES)`` nearest series; at study
   level the first ``C`` studies of the nearest ``SERIES_PER_STUDY_FETCH * C``
   series (each study once, ranked by its best series; fewer when studies
   have many series). Series rather than study means: a study holding one
   matching series among unrelated ones has a diluted study mean (study-level
   recall@10 against exact re-ranking of every study, ``bench/query.py``
   data, 100 000 vectors: 0.987 with study means, 0.9995 with series means,
   same latency). The series means of the serving model are held in memory as
   one float32 matrix (512 bytes per row at 128-d: 51 MB for 100 000 series;
   a product costs a few ms), checked against the number of means and the
   highest slice key at most every ``refresh_interval`` seconds: new and
   recomputed means (series with slices above the last key seen) are read and
   merged, a deleted study reads them all again (0.3 s at 100 000 series).
   Exact search over the means makes filters and exclusions exact (a row
   mask) with no over-fetch. (b)
   Because a mean can hide a single matching slice among many unrelated ones,
   the studies (series) of each query slice's nearest slices in the serving
   hnswlib index are added, at most ``C`` of them, best slice first. The
   index is asked for ``max(2k, 20)`` neighbours per query slice plus the
   number of slices of the excluded studies (at most
   :data:`MAX_EXCLUDED_FETCH` more): the reference's own slices are usually
   the nearest, and without this they crowd out the others (study-level
   recall@10 against exact re-ranking of every study rose from 0.959 to
   0.987 on ``bench/query.py``'s 100 000 vectors). This also finds studies
   embedded since the means were last loaded.
2. **Re-ranking** with the stored slice vectors (the float16 values of the
   database, the source of truth, normalised): for each candidate ``s`` with
   slices ``V_s``,
   ``score(s) = mean_i max_j cos(q_i, v_j)``, ``q_i`` the query slices: every
   query slice is matched with its best counterpart in the candidate, and the
   matches are averaged. A candidate that holds one slice identical to a
   one-slice query scores 1.0 whatever else it holds, while ranking by the
   means alone would push it down (see ``tests/test_search.py``). The hit's
   best series and instance are those of the best (query slice, slice) pair.
3. Hits are sorted by score (ties: by UID) and cut to ``k``.

The slice cache
---------------
Reading a hundred candidates' slice vectors from the database costs tens of
milliseconds per query (thousands of rows at 100 000 vectors), so a service
holds the serving model's stored slice vectors in memory (``slice_cache``,
on by default except for a :class:`ReadOnlyEmbedding`, where a one-shot
query is cheaper than loading them all): one unit float32 row per slice
(exactly the values the database path computes), with the study, series and
instance keys of each label, grouped by study and by series (about 600 bytes
per slice vector: 60 MB per 100 000; loading costs 0.5-1.5 s per 100 000 on
a 2-core machine, done by :meth:`SearchService.warm` or the first query). It
serves the query vectors of study and series references, the owners of ANN
hits (both levels' candidates and image level) and the re-ranking. Like the means it is
an immutable view, checked against the database with the means' signature
(number of series means, highest slice key) at most every
``refresh_interval`` seconds, and at once when the index returns a label
above the highest key it has seen (the worker commits rows before it adds
them to the index): new rows are appended (keys only grow); a deleted study
(its series means gone) leaves the view; rows of an instance embedded again
(a replaced file) give way to the new ones. A reference whose slices are not
in the view yet (embedded within the last ``refresh_interval``) is read from
the database. Without the cache the same code runs on the rows read from
the database per query.

Ranking (image level)
---------------------
Approximate nearest neighbours of every query slice in the serving index
(hnswlib), post-filtered (exclusions and filters), over-fetched (``max(4k,
32)`` neighbours per query slice, doubled until ``k`` instances remain or the
index is exhausted; a filtered query whose over-fetch passes
:data:`EXACT_LIMIT` neighbours per query slice, or ``16 * EXACT_LIMIT`` in
all, is answered by exact search over the allowed slices instead). An
instance scores the best cosine between any query slice and any of its frames.

Exclusions and filters
----------------------
The reference's own study is never a hit. Studies of the same patient (the
same PatientID and Issuer of Patient ID, when the PatientID is not empty)
are excluded unless ``include_same_patient``. :class:`SearchFilters`
(Modality / ModalitiesInStudy any-of, a StudyDate range, BodyPartExamined
with ``*``/``?`` wildcards) restrict the candidates before ranking; at study
level a study passes when one of its series has the modality or body part.

Errors
------
:class:`BadQuery` (arguments), :class:`UnknownReference`, :class:`NotEmbedded`
(known, no vectors under the serving model; names the state: pending,
failed, skipped, or embedded under another model only) and
:class:`IndexUnavailable`. Front doors translate them (C-FIND status, CLI
exit code, HTTP status).

Concurrency
-----------
:meth:`SearchService.search` is thread-safe: the index has its own
readers-writer lock, the mean matrices and slice views are immutable
snapshots swapped under a lock (a newer view only writes past the rows an
older one uses), and each query reads with its own connections. The service
never writes to the database.

Read-only opening
-----------------
A running ``sidecar serve`` owns the index (a file lock). One-shot readers
(``sidecar search``) use :class:`ReadOnlyEmbedding`: it loads the saved index
files of the serving model with ``VectorIndex.load`` without the lock (saves
are atomic, a load racing a save is retried), reconciles the copy with the
database in memory (adds stored vectors it lacks, hides deleted ones) and
never saves it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from sqlalchemy import Engine

from sidecar.archive.reader import read_stored
from sidecar.config import Config
from sidecar.db.search_queries import (
    CatalogueFilter,
    CatalogueRow,
    ReferenceRow,
    SearchQueries,
    SliceRow,
    StateSummary,
    like_pattern,
)
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.embeddings.codec import from_blobs
from sidecar.embeddings.index import VectorIndex
from sidecar.embeddings.index_files import IndexMismatch, read_saved_facts
from sidecar.embeddings.service import load_saved, repair
from sidecar.errors import SidecarError

if TYPE_CHECKING:
    from sidecar.embeddings.model import Embedder

logger = logging.getLogger(__name__)

Level = Literal["study", "series", "image"]
LEVELS: Final[tuple[str, ...]] = get_args(Level)
RERANK_FACTOR: Final = 10
"""Candidates re-ranked per requested hit (``C = max(RERANK_FACTOR * k, MIN_CANDIDATES)``)."""
MIN_CANDIDATES: Final = 50
MAX_EXCLUDED_FETCH: Final = 256
"""Most extra ANN neighbours per query slice fetched past the excluded studies' slices."""
SERIES_PER_STUDY_FETCH: Final = 4
"""Study level: series means ranked per candidate study wanted (several may share a study)."""
MAX_K: Final = 1000
"""Most hits one query may ask for."""
MAX_QUERY_SLICES: Final = 128
"""Most query slices used (evenly spread over the reference's slices)."""
IMAGE_OVERFETCH: Final = 4
EXACT_LIMIT: Final = 4096
"""Image level: neighbours per query slice beyond which a filtered query goes exact."""
_UID_RE: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RE: Final = re.compile(r"^\d{8}$")

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


# ---------------------------------------------------------------------- errors
class SearchError(SidecarError):
    """Base of the errors of a similarity query."""


class BadQuery(SearchError):
    """The query's arguments are invalid (k, level, references, filters, images)."""


class UnknownReference(SearchError):
    """The reference UID is not in the catalogue."""


class NotEmbedded(SearchError):
    """The reference is known but has no vectors under the serving model.

    Parameters
    ----------
    message
        What happened, for the user.
    state
        ``"pending"``, ``"failed"``, ``"skipped"`` or ``"embedded"`` (under
        another model only, during re-embedding).
    counts
        Instances of the reference by state.
    """

    def __init__(self, message: str, state: str, counts: dict[str, int]) -> None:
        self.state = state
        self.counts = counts
        super().__init__(message)


class IndexUnavailable(SearchError):
    """No index or embedding model can answer the query in this process."""


# ------------------------------------------------------------------ query parts
def _clean_uid(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    uid = str(value).strip(" \x00")
    if not uid:
        return None
    if len(uid) > 64 or not _UID_RE.match(uid):
        raise BadQuery(f"{name} {uid!r} is not a valid UID")
    return uid


@dataclass(frozen=True, eq=False)
class EmbeddedImages:
    """Query images embedded once, to be used as a reference later (query by example).

    Attributes
    ----------
    model_id
        The model that embedded them; a query needs it to be the serving model.
    vectors
        Unit query vectors, one row per sampled slice.
    sop_instance_uid, series_instance_uid, study_instance_uid
        UIDs of the first image (``""`` when absent).
    patient_id, issuer_of_patient_id
        The images' patient, for the same-patient exclusion.
    """

    model_id: str
    vectors: FloatArray
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str


@dataclass(frozen=True)
class Reference:
    """What the query looks like: exactly one UID, or datasets.

    Build one with :meth:`instance`, :meth:`series`, :meth:`study` or
    :meth:`images`.

    Raises
    ------
    BadQuery
        None or several of the four are given, or a UID is malformed.
    """

    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    datasets: tuple[Dataset, ...] = ()
    embedded: EmbeddedImages | None = None

    def __post_init__(self) -> None:
        sop = _clean_uid(self.sop_instance_uid, "SOP Instance UID")
        series = _clean_uid(self.series_instance_uid, "Series Instance UID")
        study = _clean_uid(self.study_instance_uid, "Study Instance UID")
        object.__setattr__(self, "sop_instance_uid", sop)
        object.__setattr__(self, "series_instance_uid", series)
        object.__setattr__(self, "study_instance_uid", study)
        object.__setattr__(self, "datasets", tuple(self.datasets))
        given = [x for x in (sop, series, study) if x] + ([1] if self.datasets else []) + (
            [1] if self.embedded is not None else []
        )
        if len(given) != 1:
            raise BadQuery(
                "give exactly one reference (a SOP Instance UID, a Series Instance UID, "
                f"a Study Instance UID or images), got {len(given)}"
            )

    @classmethod
    def instance(cls, uid: str) -> Reference:
        """An archived instance (its slices, or the nearest sampled slice)."""
        return cls(sop_instance_uid=uid)

    @classmethod
    def series(cls, uid: str) -> Reference:
        """An archived series (its sampled slices)."""
        return cls(series_instance_uid=uid)

    @classmethod
    def study(cls, uid: str) -> Reference:
        """An archived study (its sampled slices)."""
        return cls(study_instance_uid=uid)

    @classmethod
    def images(cls, datasets: Iterable[Dataset]) -> Reference:
        """DICOM datasets with pixel data, embedded on the fly (not archived)."""
        return cls(datasets=tuple(datasets))

    @classmethod
    def example(cls, embedded: EmbeddedImages) -> Reference:
        """Images embedded beforehand (query by example, :meth:`SearchService.embed_images`)."""
        return cls(embedded=embedded)

    @property
    def kind(self) -> Literal["instance", "series", "study", "dataset", "example"]:
        """Which kind of reference this is."""
        if self.embedded is not None:
            return "example"
        if self.sop_instance_uid:
            return "instance"
        if self.series_instance_uid:
            return "series"
        if self.study_instance_uid:
            return "study"
        return "dataset"

    @property
    def uid(self) -> str:
        """The reference UID (for datasets: the first one's SOP Instance UID, or "")."""
        if self.embedded is not None:
            return self.embedded.sop_instance_uid
        if self.datasets:
            return str(self.datasets[0].get("SOPInstanceUID", "") or "")
        return self.sop_instance_uid or self.series_instance_uid or self.study_instance_uid or ""


def _parse_date_range(value: str) -> tuple[str | None, str | None]:
    """A DICOM DA value or range (``A``, ``A-B``, ``A-``, ``-B``) as inclusive bounds."""
    text = value.strip()
    if not text:
        return None, None
    if "-" in text:
        if text.count("-") != 1:
            raise BadQuery(f"StudyDate range {value!r}: expected YYYYMMDD-YYYYMMDD")
        low, high = (part.strip() for part in text.split("-"))
    else:
        low = high = text
    for part in (low, high):
        if part and not _valid_date(part):
            raise BadQuery(f"StudyDate {value!r}: {part!r} is not a date YYYYMMDD")
    if not low and not high:
        raise BadQuery(f"StudyDate range {value!r} has no bound")
    if low and high and low > high:
        raise BadQuery(f"StudyDate range {value!r} ends before it starts")
    return low or None, high or None


def _valid_date(text: str) -> bool:
    import datetime as dt

    if not _DATE_RE.match(text):
        return False
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SearchFilters:
    """Conditions on the hits (empty: none).

    Attributes
    ----------
    modalities
        Any of these modalities: the hit series' Modality (series and image
        levels), or one of the study's series (ModalitiesInStudy, study level).
        A string is read as a DICOM multi-value (``"CT\\MR"``); ``*`` matches all.
    study_date
        A DICOM date or range: ``20240101``, ``20240101-20241231``,
        ``20240101-`` (from), ``-20241231`` (until).
    body_part
        BodyPartExamined of the hit series (study level: of one of its
        series), case-insensitive, with ``*`` and ``?`` wildcards.
    """

    modalities: tuple[str, ...] = ()
    study_date: str = ""
    body_part: str = ""

    def catalogue(self) -> CatalogueFilter:
        """The filter in catalogue terms.

        Raises
        ------
        BadQuery
            A malformed date or range, or a modality that is not a code string.
        """
        given = (self.modalities,) if isinstance(self.modalities, str) else self.modalities
        mods: list[str] = []
        for m in (part for value in given for part in str(value).split("\\")):
            code = m.strip().upper()
            if code in ("", "*"):  # universal matching
                continue
            if len(code) > 16 or not re.match(r"^[A-Z0-9_ ]+$", code):
                raise BadQuery(f"Modality {m!r} is not a DICOM code string")
            mods.append(code)
        low, high = _parse_date_range(self.study_date)
        body = self.body_part.strip()
        if body in ("*", ""):
            body_like = None
        else:
            body_like = like_pattern(body)
        return CatalogueFilter(tuple(sorted(set(mods))), low, high, body_like)


@dataclass(frozen=True)
class Hit:
    """One ranked answer.

    ``series_instance_uid`` and ``sop_instance_uid`` are the best-matching
    series and instance of the hit (the hit series itself at series level,
    the hit instance at image level). ``modality`` and ``body_part_examined``
    are those of that series; ``modalities_in_study`` the study's.
    """

    rank: int
    score: float
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    study_date: str
    study_description: str
    accession_number: str
    modalities_in_study: tuple[str, ...]
    modality: str
    body_part_examined: str
    series_description: str
    series_number: int | None
    instance_number: int | None


@dataclass(frozen=True)
class ReferenceInfo:
    """What the query was compared with.

    Attributes
    ----------
    kind, uid
        The reference (``uid`` of the first dataset for images).
    study_instance_uid
        The reference's own study, excluded from the hits ("" when the
        images' study is not in the archive).
    slices
        Query vectors used.
    excluded_studies
        Studies left out: the own study and, unless asked, the patient's others.
    note
        A remark for the user (e.g. the nearest sampled slice was used).
    """

    kind: str
    uid: str
    study_instance_uid: str
    slices: int
    excluded_studies: int
    note: str = ""


@dataclass(frozen=True)
class SearchResult:
    """The answer to one query: model, reference and hits in rank order."""

    model_id: str
    level: Level
    k: int
    reference: ReferenceInfo
    hits: tuple[Hit, ...]
    candidates: int = 0  # re-ranked candidates (study and series levels)
    elapsed_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (for ``--json`` and HTTP)."""
        data = asdict(self)
        for hit in data["hits"]:
            hit["modalities_in_study"] = list(hit["modalities_in_study"])
        data["hits"] = list(data["hits"])
        return data


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


# ------------------------------------------------------------------- internals
@dataclass(frozen=True)
class _Means:
    model_id: str
    signature: tuple[int, int]
    checked_at: float
    keys: IntArray
    study_keys: IntArray
    matrix: FloatArray


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


def _mean_rows(
    rows: Sequence[tuple[int, int, bytes]], dim: int
) -> tuple[IntArray, IntArray, FloatArray]:
    """Keys, study keys and unit float32 vectors of (key, study key, blob) mean rows.

    Rows whose blob is not ``dim`` float16 values are left out.
    """
    rows = [r for r in rows if len(r[2]) == 2 * dim]
    if not rows:
        return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                np.zeros((0, dim), dtype=np.float32))
    return (np.asarray([r[0] for r in rows], dtype=np.int64),
            np.asarray([r[1] for r in rows], dtype=np.int64),
            _unit_rows(from_blobs([r[2] for r in rows], dim)))


def _unit_rows(arr: FloatArray) -> FloatArray:
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    out: FloatArray = (arr / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def _spread(n: int, m: int) -> list[int]:
    """``m`` indices evenly spread over ``range(n)`` (all when ``n <= m``)."""
    if n <= m:
        return list(range(n))
    return sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})


def _grouped(keys: IntArray, offset: int) -> dict[int, IntArray]:
    """key -> row indices (``offset`` + position, ascending) of every distinct key."""
    if keys.size == 0:
        return {}
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    starts = np.r_[0, cuts]
    return {
        int(ordered[start]): rows
        for start, rows in zip(starts, np.split(order + offset, cuts), strict=True)
    }


def _merged(old: dict[int, IntArray], new: dict[int, IntArray]) -> dict[int, IntArray]:
    out = dict(old)
    for key, rows in new.items():
        prev = out.get(key)
        out[key] = rows if prev is None else np.concatenate([prev, rows])
    return out


@dataclass(frozen=True)
class _Slices:
    """Slice vectors in memory (unit float32 rows of the stored float16 values): one view.

    Rows ``[:count]`` of the buffers are valid, in ascending label order; the
    buffers may be longer (room to append) and shared with newer views, which
    only ever write past this view's ``count``.
    """

    model_id: str
    dim: int
    count: int
    signature: tuple[int, int]  # mean_signature() when last checked
    seen_top: int  # highest slice key ever seen in the database (monotonic)
    checked_at: float
    labels: IntArray
    study: IntArray
    series: IntArray
    instance: IntArray
    vectors: FloatArray
    by_study: dict[int, IntArray]
    by_series: dict[int, IntArray]

    @property
    def top(self) -> int:
        """The highest label held (0 when empty)."""
        return int(self.labels[self.count - 1]) if self.count else 0

    def rows(self, group: Literal["study", "series"], key: int) -> IntArray | None:
        """Row indices of a study's or a series' slices (ascending label), or ``None``."""
        return (self.by_study if group == "study" else self.by_series).get(key)

    def unit_vectors(self, rows: IntArray) -> FloatArray:
        """The rows' vectors (unit float32 rows, as ``_unit_rows(from_blobs(...))``)."""
        out: FloatArray = self.vectors[rows]
        return out

    def owners(self, labels: IntArray) -> IntArray:
        """Row index of each label (``-1`` for labels not held), same shape."""
        flat = labels.reshape(-1)
        held = self.labels[: self.count]
        pos = np.searchsorted(held, flat)
        pos_ok = np.minimum(pos, max(self.count - 1, 0))
        found = (pos < self.count) & (held[pos_ok] == flat) if self.count else \
            np.zeros(flat.shape, dtype=bool)
        out: IntArray = np.where(found, pos_ok, -1).astype(np.int64).reshape(labels.shape)
        return out


def _empty_slices(model_id: str, dim: int) -> _Slices:
    return _Slices(
        model_id=model_id, dim=dim, count=0, signature=(0, 0), seen_top=0, checked_at=0.0,
        labels=np.zeros(0, dtype=np.int64), study=np.zeros(0, dtype=np.int64),
        series=np.zeros(0, dtype=np.int64), instance=np.zeros(0, dtype=np.int64),
        vectors=np.zeros((0, dim), dtype=np.float32), by_study={}, by_series={},
    )


def _room(buf: npt.NDArray[Any], used: int, needed: int) -> npt.NDArray[Any]:
    """``buf`` itself when it holds ``needed`` rows, else a larger copy of its first rows."""
    if buf.shape[0] >= needed:
        return buf
    bigger = np.empty((max(needed, 2 * buf.shape[0], 1024), *buf.shape[1:]), dtype=buf.dtype)
    bigger[:used] = buf[:used]
    return bigger


class _SliceCache:
    """Keeps the serving model's stored slice vectors in memory (see the module notes).

    The view is checked against the database at most every ``refresh``
    seconds, and at once when a query meets a label above the highest key it
    has seen (vectors the worker committed since: the index only ever holds
    committed rows), with the mean matrix's cheap signature (number of the
    model's series means, highest slice key; a count of the slice rows would
    cost ~40 ms at a million). New rows are appended (keys only grow). The
    worker commits a series' slice vectors and its mean in one transaction,
    so fewer series means than the view expects means a deleted study: the
    studies that lost their means leave the view. New rows for an instance
    the view already holds are replaced vectors (a replaced file): the old
    rows leave their series and study.
    """

    def __init__(self, queries: SearchQueries, refresh: float) -> None:
        self._queries = queries
        self._refresh = refresh
        self._lock = threading.Lock()
        self._view: _Slices | None = None

    @property
    def loaded(self) -> _Slices | None:
        """The view held now (``None`` before the first load)."""
        return self._view

    def view(self, model_id: str, dim: int, *, need: int = 0) -> _Slices:
        """A view no older than ``refresh`` seconds that has seen key ``need``."""
        now = time.monotonic()
        view = self._view
        if self._fresh(view, model_id, dim, need, now):
            assert view is not None
            return view
        with self._lock:
            view = self._view
            if self._fresh(view, model_id, dim, need, now):
                assert view is not None
                return view
            signature = self._queries.mean_signature(model_id)
            if view is None or view.model_id != model_id or view.dim != dim:
                view = self._load(model_id, dim, signature)
            elif signature != view.signature:
                view = self._update(view, signature)
            view = replace(view, signature=signature, checked_at=now,
                           seen_top=max(view.seen_top, signature[1], view.top))
            self._view = view
            return view

    def _fresh(self, view: _Slices | None, model_id: str, dim: int, need: int,
               now: float) -> bool:
        return (
            view is not None and view.model_id == model_id and view.dim == dim
            and now - view.checked_at < self._refresh and need <= view.seen_top
        )

    def _load(self, model_id: str, dim: int, signature: tuple[int, int]) -> _Slices:
        started = time.perf_counter()
        view = _empty_slices(model_id, dim)
        for batch in self._queries.slice_table(model_id):
            view = self.append(view, batch)
        logger.debug("loaded %d slice vectors of model %s in %.0f ms", view.count, model_id,
                     1000 * (time.perf_counter() - started))
        return replace(view, signature=signature)

    def _update(self, view: _Slices, signature: tuple[int, int]) -> _Slices:
        """Append the rows committed since ``view``; drop deleted studies and replaced rows."""
        old_series = view.by_series
        start = view.count
        for batch in self._queries.slice_table(view.model_id, after=view.top):
            view = self.append(view, batch)
        new_series = 0
        by_study, by_series = dict(view.by_study), dict(view.by_series)
        if view.count > start:
            series_of = view.series[start:view.count]
            instance_of = view.instance[start:view.count]
            for key in np.unique(series_of).tolist():
                prev = old_series.get(key)
                if prev is None:
                    new_series += 1
                    continue
                stale = prev[np.isin(view.instance[prev], instance_of[series_of == key])]
                if stale.size:  # replaced vectors: keep the new rows only
                    by_series[key] = np.setdiff1d(by_series[key], stale)
                    study = int(view.study[stale[0]])
                    by_study[study] = np.setdiff1d(by_study[study], stale)
        if signature[0] != view.signature[0] + new_series:
            # series means were deleted (a deleted study), or rows were committed
            # while this ran: keep the studies that still have means
            live = self._queries.studies_with_means(view.model_id)
            for study in [s for s in by_study if s not in live]:
                rows = by_study.pop(study)
                for key in np.unique(view.series[rows]).tolist():
                    by_series.pop(key, None)
        return replace(view, by_study=by_study, by_series=by_series)

    @staticmethod
    def append(view: _Slices, batch: Sequence[tuple[int, int, int, int, bytes]]) -> _Slices:
        """``view`` with the rows of ``batch`` (ascending labels above its own) added."""
        rows = [r for r in batch if len(r[4]) == 2 * view.dim]
        if not rows:
            return view
        n, m = view.count, len(rows)
        labels = _room(view.labels, n, n + m)
        study = _room(view.study, n, n + m)
        series = _room(view.series, n, n + m)
        instance = _room(view.instance, n, n + m)
        vectors = _room(view.vectors, n, n + m)
        labels[n:n + m] = [r[0] for r in rows]
        study[n:n + m] = [r[1] for r in rows]
        series[n:n + m] = [r[2] for r in rows]
        instance[n:n + m] = [r[3] for r in rows]
        vectors[n:n + m] = _unit_rows(from_blobs([r[4] for r in rows], view.dim))
        return replace(
            view, count=n + m, labels=labels, study=study, series=series, instance=instance,
            vectors=vectors,
            by_study=_merged(view.by_study, _grouped(study[n:n + m], n)),
            by_series=_merged(view.by_series, _grouped(series[n:n + m], n)),
        )


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
        self._means: _Means | None = None
        self._means_lock = threading.Lock()
        if slice_cache is None:
            slice_cache = not isinstance(embedding, ReadOnlyEmbedding)
        self._slices = _SliceCache(self._queries, refresh_interval) if slice_cache else None

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
        ranked: list[tuple[float, tuple[int, int, int]]] = []
        if allowed is not None and not allowed:
            pass  # nothing passes the filters
        elif level == "image":
            ranked = self._rank_images(query.vectors, index, model_id, k, excluded, allowed)
        else:
            ranked, candidates = self._rank_groups(
                level, query.vectors, index, model_id, dim, k, excluded, allowed
            )
        hits = self._describe(ranked, level, k)
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
                return _Query(
                    vectors=view.unit_vectors(held[_spread(held.size, MAX_QUERY_SLICES)]),
                    info_kind=kind,
                    info_uid=uid,
                    own_study_pk=row.study_pk,
                    own_study_uid=row.study_instance_uid,
                    patient_pk=row.patient_pk if row.patient_id else None,
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
        chosen = [rows[i] for i in _spread(len(rows), MAX_QUERY_SLICES)]
        vectors = _unit_rows(from_blobs([r.blob for r in chosen], dim))
        return _Query(
            vectors=vectors,
            info_kind=kind,
            info_uid=uid,
            own_study_pk=row.study_pk,
            own_study_uid=row.study_instance_uid,
            patient_pk=row.patient_pk if row.patient_id else None,
            note=note,
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
        from sidecar.embeddings import preprocess

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
        """Embed query images with the serving model (sampled as the worker samples).

        Raises
        ------
        BadQuery
            No dataset, or one that cannot be embedded (no pixel data, bad header).
        IndexUnavailable
            Embedding is off, or the process's model is not the serving model
            (a model change is being re-embedded).
        """
        from sidecar.embeddings import preprocess

        if not datasets:
            raise BadQuery("no query image")
        if self._embedding is None:
            raise IndexUnavailable("query by image off: embedding is turned off "
                                   "(worker.enabled)")
        embedder = self._embedding.embedder
        serving = self._embedding.serving
        model_id, dim = serving.model_id, serving.dim
        if embedder is None:
            raise IndexUnavailable("query by image is unavailable: no embedding model here")
        if embedder.model_id != model_id:
            raise IndexUnavailable(
                f"query by image is unavailable: the index serving queries holds vectors of "
                f"model {model_id}, the configured model is {embedder.model_id} (a model change "
                "is being re-embedded, or the configuration names another model); query by an "
                "archived UID instead"
            )
        groups: dict[str, list[int]] = defaultdict(list)
        for i, ds in enumerate(datasets):
            if not isinstance(ds, Dataset):
                raise BadQuery(f"query image {i + 1} is not a DICOM dataset")
            groups[str(ds.get("SeriesInstanceUID", "") or "")].append(i)
        arrays: list[FloatArray] = []
        for members in groups.values():
            infos: list[preprocess.FrameInfo[tuple[int, int]]] = []
            for i in members:
                try:
                    infos.extend(preprocess.frame_infos(datasets[i], i))
                except Exception as exc:  # noqa: BLE001 - any unusable header is the query's fault
                    raise BadQuery(
                        f"query image cannot be read: {exc} (image {_sop(datasets[i])})"
                    ) from exc
            frames: dict[int, list[int]] = defaultdict(list)
            for i, frame in preprocess.sample(infos, self._cfg.preprocess):
                frames[i].append(frame)
            for i, chosen in frames.items():
                try:
                    arrays.append(preprocess.prepare(
                        datasets[i], self._cfg.preprocess, embedder.input_size,
                        frames=sorted(chosen),
                    ))
                except Exception as exc:  # noqa: BLE001 - as the worker: the image is unusable
                    raise BadQuery(
                        f"query image cannot be embedded: {exc} (image {_sop(datasets[i])})"
                    ) from exc
        if not arrays:
            raise BadQuery("the query images hold no slice to embed")
        batch = np.concatenate(arrays).astype(np.float32)
        keep = _spread(batch.shape[0], MAX_QUERY_SLICES)
        vectors = embedder.embed(batch[keep])
        if vectors.shape[1] != dim:
            raise IndexUnavailable(f"the embedder gives {vectors.shape[1]}-d vectors, the index "
                                   f"holds {dim}-d")
        first = datasets[0]

        def text(keyword: str) -> str:
            return str(first.get(keyword, "") or "").strip()

        return EmbeddedImages(
            model_id=model_id,
            vectors=_unit_rows(vectors.astype(np.float32)),
            sop_instance_uid=text("SOPInstanceUID"),
            series_instance_uid=text("SeriesInstanceUID"),
            study_instance_uid=text("StudyInstanceUID"),
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
        )

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
            vectors = vectors[_spread(vectors.shape[0], MAX_QUERY_SLICES)]
        return _Query(
            vectors=vectors,
            info_kind=kind,
            info_uid=images.sop_instance_uid or "(no SOP Instance UID)",
            own_study_pk=study_pk,
            own_study_uid=study_uid if study_pk is not None else "",
            patient_pk=patient_pk,
        )

    # ------------------------------------------------------------ ranking
    def _mean_matrix(self, model_id: str, dim: int) -> _Means:
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
            fresh: _Means | None = None
            if cached is not None and cached.model_id == model_id:
                if cached.signature == signature:
                    fresh = replace(cached, checked_at=now)
                elif signature[1] > cached.signature[1] and signature[0] >= cached.signature[0]:
                    fresh = self._merged_means(cached, signature, dim, now)
            if fresh is None:
                rows = self._queries.mean_vectors(model_id)
                keys, study_keys, matrix = _mean_rows(rows, dim)
                fresh = _Means(model_id, signature, now, keys, study_keys, matrix)
                logger.debug("loaded %d series mean vectors of model %s", keys.size, model_id)
            self._means = fresh
            return fresh

    def _merged_means(
        self, cached: _Means, signature: tuple[int, int], dim: int, now: float
    ) -> _Means | None:
        """``cached`` with the means changed since its signature; ``None``: read them all."""
        keys, study_keys, matrix = _mean_rows(
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
        return _Means(
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
    ) -> tuple[list[tuple[float, tuple[int, int, int]]], int]:
        """Candidates by mean vectors and slice ANN, re-ranked by slice vectors.

        Returns ``(score, (study, series, instance) keys of the best slice)``
        per candidate, best first, and the number of candidates.
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
                centre = _unit_rows(queries.mean(axis=0, keepdims=True))[0]
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
        if self._slices is not None:
            view = self._slices.view(model_id, dim, need=means.signature[1])
        elif level == "study":
            view = _view_of(model_id, dim, self._queries.slices(model_id, study_pks=chosen))
        else:
            view = _view_of(model_id, dim, self._queries.slices(model_id, series_pks=chosen))
        return _rerank(view, level, queries, chosen), len(chosen)

    def _rank_images(
        self,
        queries: FloatArray,
        index: VectorIndex,
        model_id: str,
        k: int,
        excluded: set[int],
        allowed_series: set[int] | None,
    ) -> list[tuple[float, tuple[int, int, int]]]:
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
            best: dict[int, tuple[float, tuple[int, int, int]]] = {}
            for label, score in zip(labels.reshape(-1), scores.reshape(-1), strict=True):
                owner = owners.get(int(label))
                if owner is None or owner[0] in excluded:
                    continue
                if allowed_series is not None and owner[1] not in allowed_series:
                    continue
                key = owner[2]
                if key not in best or float(score) > best[key][0]:
                    best[key] = (float(score), (owner[0], owner[1], owner[2]))
            if len(best) >= k or final:
                return sorted(best.values(), key=lambda item: -item[0])
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

    def _describe(
        self, ranked: list[tuple[float, tuple[int, int, int]]], level: str, k: int
    ) -> list[Hit]:
        everything = sorted(ranked, key=lambda item: -item[0])
        ranked = everything
        if len(ranked) > k:  # keep ties with the k-th: they are ordered by UID below
            last = round(ranked[k - 1][0], 6)
            ranked = [item for i, item in enumerate(ranked) if i < k or round(item[0], 6) == last]
        rows = self._queries.describe([keys for _, keys in ranked])
        if len(ranked) < len(everything) and any(keys not in rows for _, keys in ranked):
            # a hit deleted meanwhile (the slice view lags the database by up to
            # refresh_interval): describe the others too, so that k hits remain
            rows.update(self._queries.describe([keys for _, keys in everything[len(ranked):]]))
            ranked = everything
        described: list[tuple[float, CatalogueRow]] = [
            (score, rows[keys]) for score, keys in ranked if keys in rows
        ]

        def uid(row: CatalogueRow) -> str:
            if level == "study":
                return row.study_instance_uid
            if level == "series":
                return row.series_instance_uid
            return row.sop_instance_uid

        described.sort(key=lambda item: (-round(item[0], 6), uid(item[1])))
        hits: list[Hit] = []
        for rank, (score, row) in enumerate(described[:k], start=1):
            hits.append(Hit(
                rank=rank,
                score=round(float(score), 6),
                study_instance_uid=row.study_instance_uid,
                series_instance_uid=row.series_instance_uid,
                sop_instance_uid=row.sop_instance_uid,
                patient_id=row.patient_id,
                issuer_of_patient_id=row.issuer_of_patient_id,
                study_date=row.study_date,
                study_description=row.study_description,
                accession_number=row.accession_number,
                modalities_in_study=tuple(m for m in row.modalities_in_study.split("\\") if m),
                modality=row.modality,
                body_part_examined=row.body_part_examined,
                series_description=row.series_description,
                series_number=row.series_number,
                instance_number=row.instance_number,
            ))
        return hits


def _view_of(model_id: str, dim: int, rows: Sequence[SliceRow]) -> _Slices:
    """A view of some slice rows read from the database (no cache)."""
    view = _empty_slices(model_id, dim)
    return _SliceCache.append(view, [(r.label, r.study_pk, r.series_pk, r.instance_pk, r.blob)
                                     for r in rows])


def _rerank(
    view: _Slices, level: Literal["study", "series"], queries: FloatArray, chosen: list[int]
) -> list[tuple[float, tuple[int, int, int]]]:
    """Step 2 of the ranking: score each candidate with its slice vectors.

    ``score = mean_i max_j cos(q_i, v_j)``; the hit's keys are those of the
    slice of the best (query slice, slice) pair (the first such slice by label).
    """
    groups = sorted(
        ((g, rows) for g in set(chosen) if (rows := view.rows(level, g)) is not None and rows.size),
        key=lambda item: item[0],
    )
    if not groups:
        return []
    rows = np.concatenate([r for _, r in groups])
    sizes = np.asarray([r.size for _, r in groups], dtype=np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    sims = view.unit_vectors(rows) @ queries.T  # (M candidate slices, n query slices)
    group_scores = np.maximum.reduceat(sims, starts, axis=0).mean(axis=1)
    best_of_slice = sims.max(axis=1)
    group_best = np.maximum.reduceat(best_of_slice, starts)
    positions = np.arange(rows.size)
    first_best = np.minimum.reduceat(
        np.where(best_of_slice == np.repeat(group_best, sizes), positions, rows.size), starts
    )
    best_rows = rows[first_best]
    ranked = [
        (score, (study, series, instance))
        for score, study, series, instance in zip(
            group_scores.tolist(), view.study[best_rows].tolist(),
            view.series[best_rows].tolist(), view.instance[best_rows].tolist(), strict=True,
        )
    ]
    ranked.sort(key=lambda item: -item[0])
    return ranked


def _sop(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "") or "(no SOP Instance UID)")


__all__ = [
    "BadQuery",
    "EmbeddedImages",
    "EmbeddingParts",
    "Hit",
    "IndexUnavailable",
    "LEVELS",
    "Level",
    "MAX_K",
    "NotEmbedded",
    "ReadOnlyEmbedding",
    "Reference",
    "ReferenceInfo",
    "SearchError",
    "SearchFilters",
    "SearchResult",
    "SearchService",
    "ServingIndex",
    "UnknownReference",
]
