"""The query vocabulary of similarity search: references, filters, hits, results, the one ``Level``.

See docs/design/search.md for the method.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from sidecar.db.find_queries import like_pattern
from sidecar.db.search_queries import CatalogueFilter, CatalogueRow
from sidecar.errors import BadQuery

Level = Literal["study", "series", "image"]
LEVELS: Final[tuple[str, ...]] = get_args(Level)
MAX_K: Final = 1000
"""Most hits one query may ask for."""
MAX_QUERY_SLICES: Final = 128
"""Most query slices used (evenly spread over the reference's slices)."""
_UID_RE: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RE: Final = re.compile(r"^\d{8}$")

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


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


def clean_uid(value: str | None, name: str) -> str | None:
    """``value`` stripped of spaces and NULs (``None`` when empty), checked as a UID.

    Raises
    ------
    BadQuery
        Not a UID (digits and dots, at most 64 characters); ``name`` says which.
    """
    return _clean_uid(value, name)


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
            body_like = like_pattern(body.upper())
        return CatalogueFilter(tuple(sorted(set(mods))), low, high, body_like)


@dataclass(frozen=True)
class SliceMatch:
    """Why a hit matched: its best (query slice, hit slice) pair.

    Attributes
    ----------
    cosine
        Cosine similarity of the pair (the best over every pair of the hit).
    query_slice
        Row of the query vector (0-based, in the order the query slices were used).
    hit_sop_instance_uid, hit_frame
        The hit's slice: its instance (the hit's ``sop_instance_uid``) and
        0-based frame.
    query_sop_instance_uid, query_frame
        The query slice's stored instance and frame when the reference is an
        archived instance, series or study; ``""`` and ``None`` for query images.
    """

    cosine: float
    query_slice: int
    hit_sop_instance_uid: str
    hit_frame: int
    query_sop_instance_uid: str = ""
    query_frame: int | None = None


@dataclass(frozen=True)
class Hit(CatalogueRow):
    """One ranked answer: its rank and score, and the catalogue row it describes.

    ``series_instance_uid`` and ``sop_instance_uid`` are the best-matching
    series and instance of the hit (the hit series itself at series level,
    the hit instance at image level). ``modality`` and ``body_part_examined``
    are those of that series; ``modalities_in_study`` the study's. ``match``
    is the best (query slice, hit slice) pair, when known.
    """

    rank: int
    score: float
    match: SliceMatch | None = None
    calibrated_score: float | None = None
    ranked_by: str = "slices"

    @classmethod
    def of(cls, rank: int, score: float, row: CatalogueRow,
           match: SliceMatch | None = None, *, calibrated_score: float | None = None,
           ranked_by: str = "slices") -> Hit:
        """The hit ranked ``rank`` with ``score``, described by ``row``."""
        return cls(rank=rank, score=score, match=match, calibrated_score=calibrated_score,
                   ranked_by=ranked_by, **{f.name: getattr(row, f.name) for f in fields(row)})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary: rank and scores first, the row's fields, then ``match``."""
        data: dict[str, Any] = {"rank": self.rank, "score": self.score,
                                "calibrated_score": self.calibrated_score,
                                "ranked_by": self.ranked_by}
        for f in fields(CatalogueRow):
            data[f.name] = getattr(self, f.name)
        data["modalities_in_study"] = list(self.modalities_in_study)
        data["match"] = None if self.match is None else asdict(self.match)
        return data


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
        data["hits"] = [hit.to_dict() for hit in self.hits]
        return data


__all__ = [
    "EmbeddedImages",
    "Hit",
    "LEVELS",
    "Level",
    "MAX_K",
    "Reference",
    "ReferenceInfo",
    "SearchFilters",
    "SearchResult",
    "SliceMatch",
    "clean_uid",
]
