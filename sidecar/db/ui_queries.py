"""Read-only catalogue queries of the radiologists' page (``sidecar.http.ui``).

Finding studies reuses the ordinary C-FIND ``SELECT`` (:func:`find_queries.build_select`
with study-level :class:`~sidecar.db.find_queries.Match` conditions), so the page
matches exactly as a C-FIND with the same keys would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select

from sidecar.db.find_queries import Match, Span, build_select
from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import SLICE_VECTOR as _SLICE
from sidecar.db.models import STUDY as _STUDY

_CHUNK = 900
_STUDY_KEYS = (
    "StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyDescription",
    "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)


@dataclass(frozen=True)
class StudyFind:
    """A study-level C-FIND spec (:class:`~sidecar.db.find_queries.FindSpec`)."""

    conditions: tuple[Match, ...]
    level: str = "STUDY"
    keywords: tuple[str, ...] = _STUDY_KEYS


@dataclass(frozen=True)
class StudyRow:
    """A study as the page lists it."""

    study_instance_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    study_description: str
    accession_number: str
    modalities: tuple[str, ...]
    series: int
    instances: int


@dataclass(frozen=True)
class SeriesRow:
    """A series of a study, for the study's metadata."""

    series_instance_uid: str
    series_number: int | None
    modality: str
    body_part_examined: str
    series_description: str
    instances: int


@dataclass(frozen=True)
class StudyDetail:
    """A study with its series."""

    study: StudyRow
    series: tuple[SeriesRow, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SliceRef:
    """One slice of a stored instance: its SOP Instance UID, 0-based frame and series."""

    sop_instance_uid: str
    frame: int
    series_instance_uid: str


def _study_row(m: dict[str, object]) -> StudyRow:
    return StudyRow(
        study_instance_uid=str(m["StudyInstanceUID"]),
        patient_name=str(m["PatientName"] or ""),
        patient_id=str(m["PatientID"] or ""),
        study_date=str(m["StudyDate"] or ""),
        study_description=str(m["StudyDescription"] or ""),
        accession_number=str(m["AccessionNumber"] or ""),
        modalities=tuple(x for x in str(m["ModalitiesInStudy"] or "").split("\\") if x),
        series=int(str(m["NumberOfStudyRelatedSeries"] or 0)),
        instances=int(str(m["NumberOfStudyRelatedInstances"] or 0)),
    )


class UiQueries:
    """The page's catalogue reads, on the process's engine (each opens a short connection).

    A missing series or instance number (or slice position) sorts first, as SQLite
    sorts NULL; said explicitly, as PostgreSQL would sort it last."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def find_studies(
        self, *, patient_id: str = "", accession_number: str = "", study_uid: str = "",
        date_from: str | None = None, date_to: str | None = None, modality: str = "",
        limit: int = 200,
    ) -> tuple[list[StudyRow], bool]:
        """Studies matching like a study-level C-FIND with these keys (``*``/``?`` wildcards
        in PatientID and AccessionNumber), at most ``limit``; and whether there are more.

        Values must be checked by the caller (UID syntax, dates ``YYYYMMDD``).
        """
        conds: list[Match] = []
        if patient_id:
            conds.append(Match("PatientID", (patient_id,)))
        if accession_number:
            conds.append(Match("AccessionNumber", (accession_number,)))
        if study_uid:
            conds.append(Match("StudyInstanceUID", (study_uid,)))
        if date_from or date_to:
            conds.append(Match("StudyDate", (Span(date_from or "", date_to or ""),)))
        if modality:
            conds.append(Match("ModalitiesInStudy", (modality,)))
        stmt = build_select(StudyFind(tuple(conds))).limit(limit + 1)
        with self._engine.connect() as conn:
            rows = [_study_row(dict(r._mapping)) for r in conn.execute(stmt)]
        return rows[:limit], len(rows) > limit

    def study(self, study_uid: str) -> StudyDetail | None:
        """The study with this UID and its series, or ``None``."""
        found, _ = self.find_studies(study_uid=study_uid, limit=1)
        if not found:
            return None
        count = func.count(_INSTANCE.c.id)
        q = (
            select(_SERIES.c.series_instance_uid, _SERIES.c.series_number, _SERIES.c.modality,
                   _SERIES.c.body_part_examined, _SERIES.c.series_description, count)
            .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
            .join(_INSTANCE, _INSTANCE.c.series_pk == _SERIES.c.id, isouter=True)
            .where(_STUDY.c.study_instance_uid == study_uid)
            .group_by(_SERIES.c.id)
            .order_by(_SERIES.c.series_number.nulls_first(), _SERIES.c.id)
        )
        with self._engine.connect() as conn:
            series = tuple(
                SeriesRow(str(r[0]), None if r[1] is None else int(r[1]), str(r[2] or ""),
                          str(r[3] or ""), str(r[4] or ""), int(r[5]))
                for r in conn.execute(q)
            )
        return StudyDetail(found[0], series)

    def study_slices(self, study_uid: str, model_id: str | None) -> list[SliceRef]:
        """The study's embedded slices under ``model_id`` (by series, then position);
        without any (not embedded yet, no model): frame 0 of each instance."""
        rows: list[SliceRef] = []
        with self._engine.connect() as conn:
            if model_id:
                q = (
                    select(_INSTANCE.c.sop_instance_uid, _SLICE.c.frame,
                           _SERIES.c.series_instance_uid)
                    .join(_INSTANCE, _INSTANCE.c.id == _SLICE.c.instance_pk)
                    .join(_SERIES, _SERIES.c.id == _SLICE.c.series_pk)
                    .join(_STUDY, _STUDY.c.id == _SLICE.c.study_pk)
                    .where(_STUDY.c.study_instance_uid == study_uid,
                           _SLICE.c.model_id == model_id, _SLICE.c.frame >= 0)
                    .order_by(_SERIES.c.series_number.nulls_first(), _SERIES.c.id,
                              _SLICE.c.position_mm.nulls_first(),
                              _INSTANCE.c.instance_number.nulls_first(), _SLICE.c.frame,
                              _SLICE.c.id)
                )
                rows = [SliceRef(str(a), int(b), str(c)) for a, b, c in conn.execute(q)]
            if not rows:
                q = (
                    select(_INSTANCE.c.sop_instance_uid, _SERIES.c.series_instance_uid)
                    .join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk)
                    .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                    .where(_STUDY.c.study_instance_uid == study_uid, _INSTANCE.c.rows.is_not(None))
                    .order_by(_SERIES.c.series_number.nulls_first(), _SERIES.c.id,
                              _INSTANCE.c.instance_number.nulls_first(), _INSTANCE.c.id)
                )
                rows = [SliceRef(str(a), 0, str(b)) for a, b in conn.execute(q)]
        return rows

    def instance_files(self, sops: Iterable[str]) -> dict[str, InstanceFile]:
        """SOP Instance UID -> where its file is (or was, when released) of stored instances."""
        wanted = sorted(set(sops))
        out: dict[str, InstanceFile] = {}
        with self._engine.connect() as conn:
            for i in range(0, len(wanted), _CHUNK):
                chunk: Sequence[str] = wanted[i : i + _CHUNK]
                q = (select(_INSTANCE.c.sop_instance_uid, _INSTANCE.c.file_path,
                            _INSTANCE.c.number_of_frames, _STUDY.c.study_instance_uid,
                            _SERIES.c.series_instance_uid, _INSTANCE.c.released_at)
                     .join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk)
                     .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
                     .where(_INSTANCE.c.sop_instance_uid.in_(chunk)))
                for sop, path, frames, study, series, released in conn.execute(q):
                    out[str(sop)] = InstanceFile(str(path), int(frames or 1), str(study),
                                                 str(series), released is not None)
        return out


@dataclass(frozen=True)
class InstanceFile:
    """A stored instance's file (catalogue path), frames, UIDs, and whether it was released."""

    file_path: str
    frames: int
    study_instance_uid: str
    series_instance_uid: str
    released: bool = False


__all__ = ["InstanceFile", "SeriesRow", "SliceRef", "StudyDetail", "StudyFind", "StudyRow",
           "UiQueries"]
