"""Read-only catalogue queries of the similarity search service (``sidecar.search.service``).

Nothing here writes: every function opens a connection, reads and closes it.
Vectors come back as the stored float16 blobs; the caller unpacks them.
Keys passed in lists are sent in chunks so that a long candidate list never
exceeds the database's limit on bound parameters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import ColumnElement, Engine, exists, func, select

from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import PATIENT as _PATIENT
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import SERIES_VECTOR as _SERIES_VEC
from sidecar.db.models import SLICE_VECTOR as _SLICE
from sidecar.db.models import STUDY as _STUDY
from sidecar.db.models import (
    InstanceState,
)

_CHUNK = 900  # bound parameters per IN list (SQLite allows 32766, older builds 999)

RefKind = Literal["instance", "series", "study"]


def _chunks(values: Iterable[int]) -> Iterator[list[int]]:
    items = sorted({int(v) for v in values})
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


@dataclass(frozen=True)
class ReferenceRow:
    """Where a reference UID sits in the catalogue.

    ``series_pk`` is set for instance and series references, ``instance_pk``,
    ``file_path`` and ``instance_number`` for instance references only.
    """

    study_pk: int
    study_instance_uid: str
    study_stable: bool
    patient_pk: int
    patient_id: str
    issuer_of_patient_id: str
    series_pk: int | None = None
    instance_pk: int | None = None
    file_path: str = ""
    instance_number: int | None = None


@dataclass
class StateSummary:
    """Instance states under a reference, with an example error or skip reason."""

    counts: Counter[str] = field(default_factory=Counter)
    error: str = ""
    skip_reason: str = ""


@dataclass(frozen=True)
class SliceRow:
    """One stored slice vector and where it belongs."""

    label: int
    study_pk: int
    series_pk: int
    instance_pk: int
    frame: int
    position_mm: float | None
    instance_number: int | None
    blob: bytes


@dataclass(frozen=True)
class CatalogueRow:
    """The catalogue attributes shown for a hit (study, series and instance)."""

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
class CatalogueFilter:
    """Hit filters in catalogue terms (``None`` or empty: no condition).

    Attributes
    ----------
    modalities
        Upper-case modalities; a series matches one of them, a study matches
        when one of its series does (ModalitiesInStudy, "any of").
    date_from, date_to
        Inclusive ``YYYYMMDD`` bounds on StudyDate; studies without a date
        do not match a date condition.
    body_part_like
        A SQL LIKE pattern (upper case, ``!`` escapes) on BodyPartExamined; a
        study matches when one of its series does.
    """

    modalities: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    body_part_like: str | None = None

    @property
    def empty(self) -> bool:
        """No condition at all."""
        return not (self.modalities or self.date_from or self.date_to or self.body_part_like)


class SearchQueries:
    """The catalogue reads of the search service, on the process's engine.

    Parameters
    ----------
    engine
        The process's engine.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # ------------------------------------------------------------ references
    def reference(self, kind: RefKind, uid: str) -> ReferenceRow | None:
        """Locate an instance, series or study by its UID; ``None`` when unknown."""
        q = (
            select(
                _STUDY.c.id, _STUDY.c.study_instance_uid, _STUDY.c.stable, _PATIENT.c.id,
                _PATIENT.c.patient_id, _PATIENT.c.issuer_of_patient_id, _SERIES.c.id,
                _INSTANCE.c.id, _INSTANCE.c.file_path, _INSTANCE.c.instance_number,
            )
            .join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
            .join(_SERIES, _SERIES.c.study_pk == _STUDY.c.id)
            .join(_INSTANCE, _INSTANCE.c.series_pk == _SERIES.c.id, isouter=kind != "instance")
        )
        if kind == "study":
            q = q.where(_STUDY.c.study_instance_uid == uid)
        elif kind == "series":
            q = q.where(_SERIES.c.series_instance_uid == uid)
        else:
            q = q.where(_INSTANCE.c.sop_instance_uid == uid)
        with self._engine.connect() as conn:
            # every study row has a series (rows are created with their first instance)
            row = conn.execute(q.limit(1)).first()
        if row is None:
            return None
        return ReferenceRow(
            study_pk=int(row[0]),
            study_instance_uid=str(row[1]),
            study_stable=bool(row[2]),
            patient_pk=int(row[3]),
            patient_id=str(row[4] or ""),
            issuer_of_patient_id=str(row[5] or ""),
            series_pk=int(row[6]) if kind != "study" else None,
            instance_pk=int(row[7]) if kind == "instance" else None,
            file_path=str(row[8] or "") if kind == "instance" else "",
            instance_number=(
                int(row[9]) if kind == "instance" and row[9] is not None else None
            ),
        )

    def study_by_uid(self, study_instance_uid: str) -> int | None:
        """Key of a study, or ``None``."""
        with self._engine.connect() as conn:
            pk = conn.execute(
                select(_STUDY.c.id).where(_STUDY.c.study_instance_uid == study_instance_uid)
            ).scalar()
        return None if pk is None else int(pk)

    def patient_by_id(self, patient_id: str, issuer: str) -> int | None:
        """Key of the patient with this PatientID and issuer, or ``None``."""
        with self._engine.connect() as conn:
            pk = conn.execute(
                select(_PATIENT.c.id).where(
                    _PATIENT.c.patient_id == patient_id,
                    _PATIENT.c.issuer_of_patient_id == issuer,
                )
            ).scalar()
        return None if pk is None else int(pk)

    def studies_of_patient(self, patient_pk: int) -> set[int]:
        """Keys of every study of a patient."""
        with self._engine.connect() as conn:
            return {
                int(pk) for pk in conn.execute(
                    select(_STUDY.c.id).where(_STUDY.c.patient_pk == patient_pk)
                ).scalars()
            }

    def states(
        self, *, study_pk: int | None = None, series_pk: int | None = None,
        instance_pk: int | None = None,
    ) -> StateSummary:
        """Instance states under a study, a series or one instance."""
        q = select(_INSTANCE.c.state, func.count(), func.max(_INSTANCE.c.error),
                   func.max(_INSTANCE.c.skip_reason))
        if instance_pk is not None:
            q = q.where(_INSTANCE.c.id == instance_pk)
        elif series_pk is not None:
            q = q.where(_INSTANCE.c.series_pk == series_pk)
        else:
            q = q.join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk).where(
                _SERIES.c.study_pk == study_pk
            )
        summary = StateSummary()
        with self._engine.connect() as conn:
            for state, count, error, reason in conn.execute(q.group_by(_INSTANCE.c.state)):
                name = InstanceState(state).value
                summary.counts[name] = int(count)
                if name == InstanceState.FAILED.value:
                    summary.error = str(error or "")
                if name == InstanceState.SKIPPED.value:
                    summary.skip_reason = str(reason or "")
        return summary

    def models_with_vectors(
        self, *, study_pk: int | None = None, series_pk: int | None = None,
        instance_pk: int | None = None,
    ) -> set[str]:
        """Model ids that have slice vectors under a study, series or instance."""
        q = select(_SLICE.c.model_id).distinct()
        if instance_pk is not None:
            q = q.where(_SLICE.c.instance_pk == instance_pk)
        elif series_pk is not None:
            q = q.where(_SLICE.c.series_pk == series_pk)
        else:
            q = q.where(_SLICE.c.study_pk == study_pk)
        with self._engine.connect() as conn:
            return {str(m) for m in conn.execute(q).scalars()}

    # --------------------------------------------------------------- vectors
    def slices(
        self,
        model_id: str,
        *,
        study_pks: Iterable[int] | None = None,
        series_pks: Iterable[int] | None = None,
        instance_pk: int | None = None,
    ) -> list[SliceRow]:
        """Stored slice vectors of a model under studies, series or one instance.

        Exactly one of ``study_pks``, ``series_pks`` and ``instance_pk`` is used
        (in that order of precedence). Rows come ordered by label.
        """
        base = (
            select(
                _SLICE.c.id, _SLICE.c.study_pk, _SLICE.c.series_pk, _SLICE.c.instance_pk,
                _SLICE.c.frame, _SLICE.c.position_mm, _INSTANCE.c.instance_number,
                _SLICE.c.vector,
            )
            .join(_INSTANCE, _INSTANCE.c.id == _SLICE.c.instance_pk)
            .where(_SLICE.c.model_id == model_id, _SLICE.c.frame >= 0)
        )
        if study_pks is not None:
            column, keys = _SLICE.c.study_pk, list(study_pks)
        elif series_pks is not None:
            column, keys = _SLICE.c.series_pk, list(series_pks)
        elif instance_pk is not None:
            column, keys = _SLICE.c.instance_pk, [instance_pk]
        else:
            raise ValueError("slices() needs study_pks, series_pks or instance_pk")
        out: list[SliceRow] = []
        with self._engine.connect() as conn:
            for chunk in _chunks(keys):
                for row in conn.execute(base.where(column.in_(chunk))):
                    out.append(SliceRow(
                        label=int(row[0]), study_pk=int(row[1]), series_pk=int(row[2]),
                        instance_pk=int(row[3]), frame=int(row[4]),
                        position_mm=None if row[5] is None else float(row[5]),
                        instance_number=None if row[6] is None else int(row[6]),
                        blob=bytes(row[7]),
                    ))
        out.sort(key=lambda r: r.label)
        return out

    def studies_with_means(self, model_id: str) -> set[int]:
        """Keys of the studies that have series mean vectors of a model."""
        with self._engine.connect() as conn:
            return {int(pk) for pk in conn.execute(
                select(_SERIES_VEC.c.study_pk).where(_SERIES_VEC.c.model_id == model_id).distinct()
            ).scalars()}

    def slice_table(
        self, model_id: str, *, after: int = 0, batch: int = 20000
    ) -> Iterator[list[tuple[int, int, int, int, bytes]]]:
        """Every (label, study key, series key, instance key, blob) of a model, by label.

        Only rows with a key above ``after``; in batches of ``batch`` rows, each
        batch read with its own short connection (no long read transaction).
        """
        last = after
        while True:
            q = (
                select(_SLICE.c.id, _SLICE.c.study_pk, _SLICE.c.series_pk,
                       _SLICE.c.instance_pk, _SLICE.c.vector)
                .where(_SLICE.c.model_id == model_id, _SLICE.c.frame >= 0, _SLICE.c.id > last)
                .order_by(_SLICE.c.id)
                .limit(batch)
            )
            with self._engine.connect() as conn:
                rows = [(int(a), int(b), int(c), int(d), bytes(e))
                        for a, b, c, d, e in conn.execute(q)]
            if not rows:
                return
            yield rows
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def slice_owners(self, labels: Iterable[int]) -> dict[int, tuple[int, int, int, int]]:
        """label -> (study key, series key, instance key, frame) of existing rows."""
        out: dict[int, tuple[int, int, int, int]] = {}
        with self._engine.connect() as conn:
            for chunk in _chunks(labels):
                for label, study, series, inst, frame in conn.execute(
                    select(_SLICE.c.id, _SLICE.c.study_pk, _SLICE.c.series_pk,
                           _SLICE.c.instance_pk, _SLICE.c.frame).where(_SLICE.c.id.in_(chunk))
                ):
                    out[int(label)] = (int(study), int(series), int(inst), int(frame))
        return out

    def slice_places(self, labels: Iterable[int]) -> dict[int, tuple[str, int]]:
        """label -> (SOP Instance UID, frame) of the slice vectors that still exist."""
        out: dict[int, tuple[str, int]] = {}
        q = select(_SLICE.c.id, _INSTANCE.c.sop_instance_uid, _SLICE.c.frame).join(
            _INSTANCE, _INSTANCE.c.id == _SLICE.c.instance_pk
        )
        with self._engine.connect() as conn:
            for chunk in _chunks(labels):
                for label, sop, frame in conn.execute(q.where(_SLICE.c.id.in_(chunk))):
                    out[int(label)] = (str(sop), int(frame))
        return out

    def slice_labels(
        self, model_id: str, *, study_pks: Iterable[int] | None = None,
        series_pks: Iterable[int] | None = None,
    ) -> list[int]:
        """Labels of a model's slice vectors under some studies (or series)."""
        column = _SLICE.c.study_pk if study_pks is not None else _SLICE.c.series_pk
        keys = study_pks if study_pks is not None else (series_pks or [])
        out: list[int] = []
        with self._engine.connect() as conn:
            for chunk in _chunks(keys):
                out.extend(int(x) for x in conn.execute(
                    select(_SLICE.c.id).where(_SLICE.c.model_id == model_id, column.in_(chunk))
                ).scalars())
        return sorted(out)

    def mean_vectors(self, model_id: str) -> list[tuple[int, int, bytes]]:
        """Every (series key, study key, blob) of a model's series mean vectors."""
        q = select(_SERIES_VEC.c.series_pk, _SERIES_VEC.c.study_pk, _SERIES_VEC.c.vector)
        q = q.where(_SERIES_VEC.c.model_id == model_id).order_by(_SERIES_VEC.c.series_pk)
        with self._engine.connect() as conn:
            return [(int(a), int(b), bytes(c)) for a, b, c in conn.execute(q)]

    def series_means_after(self, model_id: str, after: int) -> list[tuple[int, int, bytes]]:
        """(series key, study key, blob) of the series means that changed after slice ``after``.

        A series' slice vectors and its mean are committed together, so the
        series with a slice vector of the model keyed above ``after`` are the
        ones whose mean was added or recomputed since.
        """
        changed = (
            select(_SLICE.c.series_pk)
            .where(_SLICE.c.model_id == model_id, _SLICE.c.id > after)
            .distinct()
        )
        q = select(_SERIES_VEC.c.series_pk, _SERIES_VEC.c.study_pk, _SERIES_VEC.c.vector).where(
            _SERIES_VEC.c.model_id == model_id, _SERIES_VEC.c.series_pk.in_(changed)
        )
        with self._engine.connect() as conn:
            return [(int(a), int(b), bytes(c)) for a, b, c in conn.execute(q)]

    def mean_signature(self, model_id: str) -> tuple[int, int]:
        """(number of series mean vectors of the model, highest slice vector key).

        Slice keys are never reused, so a new series or a replaced file moves
        the second number; a deleted study moves the first.
        """
        count = (
            select(func.count()).select_from(_SERIES_VEC).where(_SERIES_VEC.c.model_id == model_id)
        ).scalar_subquery()
        top = select(func.coalesce(func.max(_SLICE.c.id), 0)).scalar_subquery()
        with self._engine.connect() as conn:
            row = conn.execute(select(count, top)).one()
        return int(row[0]), int(row[1])

    # --------------------------------------------------------------- filters
    def allowed_studies(self, flt: CatalogueFilter) -> set[int]:
        """Keys of the studies that pass a filter (every study when it is empty)."""
        conds: list[ColumnElement[bool]] = []
        if flt.date_from:
            conds.append(_STUDY.c.study_date >= flt.date_from)
        if flt.date_to:
            conds.append(_STUDY.c.study_date <= flt.date_to)
        if flt.date_from or flt.date_to:
            conds.append(_STUDY.c.study_date != "")
        series_conds = self._series_conds(flt)
        if series_conds:
            conds.append(exists(
                select(_SERIES.c.id).where(_SERIES.c.study_pk == _STUDY.c.id, *series_conds)
            ))
        with self._engine.connect() as conn:
            return {int(pk) for pk in conn.execute(select(_STUDY.c.id).where(*conds)).scalars()}

    def allowed_series(self, flt: CatalogueFilter) -> set[int]:
        """Keys of the series that pass a filter (every series when it is empty)."""
        conds = self._series_conds(flt)
        q = select(_SERIES.c.id)
        if flt.date_from or flt.date_to:
            q = q.join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
            conds.append(_STUDY.c.study_date != "")
            if flt.date_from:
                conds.append(_STUDY.c.study_date >= flt.date_from)
            if flt.date_to:
                conds.append(_STUDY.c.study_date <= flt.date_to)
        with self._engine.connect() as conn:
            return {int(pk) for pk in conn.execute(q.where(*conds)).scalars()}

    @staticmethod
    def _series_conds(flt: CatalogueFilter) -> list[ColumnElement[bool]]:
        conds: list[ColumnElement[bool]] = []
        if flt.modalities:
            conds.append(func.upper(_SERIES.c.modality).in_(list(flt.modalities)))
        if flt.body_part_like:
            conds.append(
                func.upper(_SERIES.c.body_part_examined).like(flt.body_part_like, escape="!")
            )
        return conds

    # -------------------------------------------------------------- describe
    def describe(
        self, triples: Sequence[tuple[int, int, int]]
    ) -> dict[tuple[int, int, int], CatalogueRow]:
        """Catalogue attributes of (study key, series key, instance key) triples."""
        wanted = set(triples)
        out: dict[tuple[int, int, int], CatalogueRow] = {}
        q = (
            select(
                _STUDY.c.id, _SERIES.c.id, _INSTANCE.c.id,
                _STUDY.c.study_instance_uid, _SERIES.c.series_instance_uid,
                _INSTANCE.c.sop_instance_uid, _PATIENT.c.patient_id,
                _PATIENT.c.issuer_of_patient_id, _STUDY.c.study_date,
                _STUDY.c.study_description, _STUDY.c.accession_number,
                _STUDY.c.modalities_in_study, _SERIES.c.modality, _SERIES.c.body_part_examined,
                _SERIES.c.series_description, _SERIES.c.series_number,
                _INSTANCE.c.instance_number,
            )
            .join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_pk)
            .join(_STUDY, _STUDY.c.id == _SERIES.c.study_pk)
            .join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
        )
        with self._engine.connect() as conn:
            for chunk in _chunks(t[2] for t in wanted):
                for row in conn.execute(q.where(_INSTANCE.c.id.in_(chunk))):
                    key = (int(row[0]), int(row[1]), int(row[2]))
                    if key not in wanted:
                        continue
                    out[key] = CatalogueRow(
                        study_instance_uid=str(row[3]), series_instance_uid=str(row[4]),
                        sop_instance_uid=str(row[5]), patient_id=str(row[6] or ""),
                        issuer_of_patient_id=str(row[7] or ""), study_date=str(row[8] or ""),
                        study_description=str(row[9] or ""),
                        accession_number=str(row[10] or ""),
                        modalities_in_study=tuple(m for m in str(row[11] or "").split("\\")
                                                  if m),
                        modality=str(row[12] or ""),
                        body_part_examined=str(row[13] or ""),
                        series_description=str(row[14] or ""),
                        series_number=None if row[15] is None else int(row[15]),
                        instance_number=None if row[16] is None else int(row[16]),
                    )
        return out


__all__ = [
    "CatalogueFilter",
    "CatalogueRow",
    "ReferenceRow",
    "SearchQueries",
    "SliceRow",
    "StateSummary",
]
