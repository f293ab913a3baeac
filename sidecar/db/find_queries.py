"""Ordinary C-FIND over the catalogue: the keys it holds and the one ``SELECT`` per query.

The DICOM side (:mod:`sidecar.dicom.find`) parses an identifier into checked
:class:`Match` conditions and the keywords to return; :func:`build_select` turns
them into SQL and :func:`fetch` / :func:`fetch_matching` run it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Engine,
    FromClause,
    Row,
    Select,
    Table,
    and_,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from sidecar.db.models import INSTANCE as _INSTANCE
from sidecar.db.models import PATIENT as _PATIENT
from sidecar.db.models import SERIES as _SERIES
from sidecar.db.models import STUDY as _STUDY
from sidecar.db.repository import CatalogueUnavailable

LIKE_ESCAPE = "!"

#: Result column holding the primary key of the matched entity.
PK_LABEL = "_pk"


class KeyKind(enum.Enum):
    """How a key's values are matched."""

    TEXT = "text"  # single value (case-sensitive) or wildcard
    PN = "pn"  # single value or wildcard, case-insensitive
    UID = "uid"  # single value or list of UID
    DATE = "date"  # single value or range
    TIME = "time"  # single value or range
    INT = "int"  # single value, numeric
    MODALITIES = "modalities"  # text matching against the study's series
    RETURN_ONLY = "return"  # computed: returned, never matched


@dataclass(frozen=True)
class CatalogueKey:
    """One attribute the catalogue holds: its entity (a Q/R level name), kind and column."""

    keyword: str
    entity: str  # PATIENT, STUDY, SERIES or IMAGE
    kind: KeyKind
    column: ColumnElement[Any]  # the value returned (and matched, except MODALITIES)


@dataclass(frozen=True)
class Span:
    """A date or time value: one value (``single``) or a range, ``""`` for an open end."""

    start: str
    end: str
    single: bool = False


@dataclass(frozen=True)
class Match:
    """One key's checked condition: the entity matches when any of ``values`` does.

    Values are strings (text, PN with ``*``/``?`` wildcards, UIDs, modalities),
    ints (integer keys) or :class:`Span` (dates and times).
    """

    keyword: str
    values: tuple[Any, ...]


class FindSpec(Protocol):
    """What :func:`build_select` reads of a parsed query."""

    @property
    def level(self) -> str: ...

    @property
    def conditions(self) -> Sequence[Match]: ...

    @property
    def keywords(self) -> Sequence[str]: ...


def _count(table: FromClause, *where: ColumnElement[bool], correlate: Table) -> ColumnElement[Any]:
    return (
        select(func.count())
        .select_from(table)
        .where(*where)
        .correlate(correlate)
        .scalar_subquery()
    )


def _computed_columns() -> dict[str, ColumnElement[Any]]:
    # Aliases inside the sub-selects: the outer select may hold the same tables
    # (a SERIES query counting its study's series must not correlate to itself).
    st, se, ins = _STUDY.alias("c_study"), _SERIES.alias("c_series"), _INSTANCE.alias("c_inst")
    series_of_study = se.join(ins, ins.c.series_pk == se.c.id)
    studies_series = st.join(se, se.c.study_pk == st.c.id)
    of_patient = st.c.patient_pk == _PATIENT.c.id
    return {
        "NumberOfPatientRelatedStudies": _count(st, of_patient, correlate=_PATIENT),
        "NumberOfPatientRelatedSeries": _count(studies_series, of_patient, correlate=_PATIENT),
        "NumberOfPatientRelatedInstances": _count(
            studies_series.join(ins, ins.c.series_pk == se.c.id), of_patient, correlate=_PATIENT
        ),
        "NumberOfStudyRelatedSeries": _count(se, se.c.study_pk == _STUDY.c.id, correlate=_STUDY),
        "NumberOfStudyRelatedInstances": _count(
            series_of_study, se.c.study_pk == _STUDY.c.id, correlate=_STUDY
        ),
        "NumberOfSeriesRelatedInstances": _count(
            ins, ins.c.series_pk == _SERIES.c.id, correlate=_SERIES
        ),
    }


def _key_table() -> dict[str, CatalogueKey]:
    p, st, se, i = _PATIENT.c, _STUDY.c, _SERIES.c, _INSTANCE.c
    K = KeyKind  # noqa: N806 - short alias for the table below
    keys = [
        CatalogueKey("PatientName", "PATIENT", K.PN, p.patient_name),
        CatalogueKey("PatientID", "PATIENT", K.TEXT, p.patient_id),
        CatalogueKey("IssuerOfPatientID", "PATIENT", K.TEXT, p.issuer_of_patient_id),
        CatalogueKey("PatientBirthDate", "PATIENT", K.DATE, p.patient_birth_date),
        CatalogueKey("PatientSex", "PATIENT", K.TEXT, p.patient_sex),
        CatalogueKey("StudyInstanceUID", "STUDY", K.UID, st.study_instance_uid),
        CatalogueKey("StudyDate", "STUDY", K.DATE, st.study_date),
        CatalogueKey("StudyTime", "STUDY", K.TIME, st.study_time),
        CatalogueKey("AccessionNumber", "STUDY", K.TEXT, st.accession_number),
        CatalogueKey("StudyID", "STUDY", K.TEXT, st.study_id),
        CatalogueKey("StudyDescription", "STUDY", K.TEXT, st.study_description),
        CatalogueKey("ReferringPhysicianName", "STUDY", K.PN, st.referring_physician_name),
        CatalogueKey("ModalitiesInStudy", "STUDY", K.MODALITIES, st.modalities_in_study),
        CatalogueKey("SeriesInstanceUID", "SERIES", K.UID, se.series_instance_uid),
        CatalogueKey("Modality", "SERIES", K.TEXT, se.modality),
        CatalogueKey("SeriesNumber", "SERIES", K.INT, se.series_number),
        CatalogueKey("SeriesDescription", "SERIES", K.TEXT, se.series_description),
        CatalogueKey("BodyPartExamined", "SERIES", K.TEXT, se.body_part_examined),
        CatalogueKey("SOPInstanceUID", "IMAGE", K.UID, i.sop_instance_uid),
        CatalogueKey("SOPClassUID", "IMAGE", K.UID, i.sop_class_uid),
        CatalogueKey("InstanceNumber", "IMAGE", K.INT, i.instance_number),
        CatalogueKey("Rows", "IMAGE", K.INT, i.rows),
        CatalogueKey("Columns", "IMAGE", K.INT, i.columns),
        CatalogueKey("NumberOfFrames", "IMAGE", K.INT, i.number_of_frames),
        CatalogueKey("AvailableTransferSyntaxUID", "IMAGE", K.UID, i.transfer_syntax_uid),
    ]
    entity = {
        "NumberOfPatientRelatedStudies": "PATIENT",
        "NumberOfPatientRelatedSeries": "PATIENT",
        "NumberOfPatientRelatedInstances": "PATIENT",
        "NumberOfStudyRelatedSeries": "STUDY",
        "NumberOfStudyRelatedInstances": "STUDY",
        "NumberOfSeriesRelatedInstances": "SERIES",
    }
    keys += [
        CatalogueKey(kw, entity[kw], K.RETURN_ONLY, col) for kw, col in _computed_columns().items()
    ]
    return {k.keyword: k for k in keys}


#: Every key the catalogue answers, by keyword.
KEYS: dict[str, CatalogueKey] = _key_table()


# ------------------------------------------------------------------- wildcards
class dicom_wildcard(FunctionElement[bool]):  # noqa: N801 - SQL function style
    """Case-sensitive wildcard match: ``dicom_wildcard(column, like, glob)``.

    Rendered as ``column GLOB glob`` on SQLite (whose ``LIKE`` ignores ASCII
    case) and ``column LIKE like ESCAPE '!'`` elsewhere (case-sensitive on
    PostgreSQL). Both patterns are bound parameters; each dialect uses one.
    """

    type = Boolean()
    inherit_cache = True
    name = "dicom_wildcard"


@compiles(dicom_wildcard)
def _compile_wildcard_like(element: dicom_wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    column, like, _glob = list(element.clauses)
    return (
        f"{compiler.process(column, **kw)} LIKE {compiler.process(like, **kw)} "
        f"ESCAPE '{LIKE_ESCAPE}'"
    )


@compiles(dicom_wildcard, "sqlite")
def _compile_wildcard_glob(element: dicom_wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    column, _like, glob = list(element.clauses)
    return f"{compiler.process(column, **kw)} GLOB {compiler.process(glob, **kw)}"


def like_pattern(value: str) -> str:
    """A DICOM value (``*``, ``?`` wildcards) as a LIKE pattern escaped with ``!``."""
    out: list[str] = []
    for ch in value:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + ch)
        else:
            out.append(ch)
    return "".join(out)


def glob_pattern(value: str) -> str:
    """A DICOM value (``*``, ``?`` wildcards) as an SQLite GLOB pattern."""
    return "".join("[[]" if ch == "[" else ch for ch in value)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# ------------------------------------------------------------------ conditions
def _text_condition(column: ColumnElement[Any], value: str, *, pn: bool) -> ColumnElement[bool]:
    if pn:
        return column.ilike(like_pattern(value), escape=LIKE_ESCAPE)
    if _has_wildcard(value):
        return dicom_wildcard(column, like_pattern(value), glob_pattern(value))
    return column == value


def _span_condition(column: ColumnElement[Any], span: Span, *, time: bool) -> ColumnElement[bool]:
    if span.single:
        return column == span.start
    conds: list[ColumnElement[bool]] = [column != ""]  # unknown values never match a range
    if span.start:
        conds.append(column >= span.start)
    if span.end:
        # A time bound with fewer digits covers its whole unit: -1200 takes 12:00:59.
        conds.append(column <= (span.end + "~" if time else span.end))
    return and_(*conds)


def condition(match: Match) -> ColumnElement[bool]:
    """The SQL condition of one :class:`Match`."""
    key = KEYS[match.keyword]
    values = match.values
    if key.kind in (KeyKind.UID, KeyKind.INT):
        return key.column == values[0] if len(values) == 1 else key.column.in_(values)
    if key.kind in (KeyKind.DATE, KeyKind.TIME):
        time = key.kind is KeyKind.TIME
        return or_(*(_span_condition(key.column, v, time=time) for v in values))
    if key.kind is KeyKind.MODALITIES:
        se = _SERIES.alias("m_series")
        match_any = or_(*(_text_condition(se.c.modality, v, pn=False) for v in values))
        return exists(
            select(se.c.id).where(se.c.study_pk == _STUDY.c.id, match_any).correlate(_STUDY)
        )
    pn = key.kind is KeyKind.PN
    return or_(*(_text_condition(key.column, v, pn=pn) for v in values))


# --------------------------------------------------------------------- selects
_LEVEL_PK: dict[str, ColumnElement[Any]] = {
    "PATIENT": _PATIENT.c.id,
    "STUDY": _STUDY.c.id,
    "SERIES": _SERIES.c.id,
    "IMAGE": _INSTANCE.c.id,
}


def _from_clause(level: str) -> FromClause:
    if level == "PATIENT":
        return _PATIENT
    study = _STUDY.join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
    if level == "STUDY":
        return study
    series = _SERIES.join(study, _STUDY.c.id == _SERIES.c.study_pk)
    if level == "SERIES":
        return series
    return _INSTANCE.join(series, _SERIES.c.id == _INSTANCE.c.series_pk)


def build_select(spec: FindSpec) -> Select[Any]:
    """The ``SELECT`` answering ``spec``: one row per matching entity.

    Columns: the entity's primary key labelled :data:`PK_LABEL`, then every
    requested key labelled with its keyword. Rows come in the order the
    entities were first stored.
    """
    pk = _LEVEL_PK[spec.level]
    columns: list[ColumnElement[Any]] = [pk.label(PK_LABEL)]
    columns += [KEYS[kw].column.label(kw) for kw in spec.keywords]
    return (
        select(*columns)
        .select_from(_from_clause(spec.level))
        .where(*(condition(m) for m in spec.conditions))
        .order_by(pk)
    )


def _unavailable(exc: SQLAlchemyError) -> CatalogueUnavailable:
    name = exc.__class__.__name__
    return CatalogueUnavailable(f"catalogue unavailable ({name})", name)


def fetch(engine: Engine, spec: FindSpec, *, limit: int = 0) -> Sequence[Row[Any]]:
    """Every row of :func:`build_select` (at most ``limit``; 0: all), in one short read.

    Raises
    ------
    CatalogueUnavailable
        The catalogue could not be read.
    """
    stmt = build_select(spec)
    if limit:
        stmt = stmt.limit(limit)
    try:
        with engine.connect() as conn:
            return conn.execute(stmt).all()
    except SQLAlchemyError as exc:
        raise _unavailable(exc) from exc


def fetch_matching(
    engine: Engine, spec: FindSpec, keyword: str, values: Sequence[str]
) -> dict[str, Row[Any]]:
    """The rows of :func:`build_select` whose ``keyword`` is one of ``values``, by that value.

    Raises
    ------
    CatalogueUnavailable
        The catalogue could not be read.
    """
    column = KEYS[keyword].column
    stmt = build_select(spec).where(column.in_(values)).add_columns(column.label("_hit_uid"))
    try:
        with engine.connect() as conn:
            found = conn.execute(stmt).all()
    except SQLAlchemyError as exc:
        raise _unavailable(exc) from exc
    return {str(r._mapping["_hit_uid"]): r for r in found}
