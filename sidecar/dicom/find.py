"""Ordinary C-FIND over the catalogue: identifier → SQL select → response identifiers.

Pure parts (no I/O): :func:`parse_query` turns a request identifier into a
:class:`FindQuery` (matching conditions as SQLAlchemy expressions, the keys to
return, keys that are not supported); :func:`build_select` makes the one
``SELECT`` that answers it; :func:`response_identifier` builds a Pending
response from one result row. :class:`CatalogueFind` runs them against the
process's engine in one short read and is the node's ordinary C-FIND branch.

Information models and levels (PS3.4 C.6.1, C.6.2)
---------------------------------------------------
Patient Root: ``PATIENT`` → ``STUDY`` → ``SERIES`` → ``IMAGE``; Study Root:
``STUDY`` → ``SERIES`` → ``IMAGE`` (patient attributes belong to the study
level). Queries are hierarchical: below the top level the unique key of every
higher level must be present with a value (PatientID in Patient Root,
StudyInstanceUID, SeriesInstanceUID). Non-unique keys of higher levels are
accepted, matched against the parent entity and returned (lenient, as most
archives are). A unique key of a *lower* level with a value is refused.

Matching (PS3.4 C.2.2.2)
------------------------
* **Single value**: exact and case-sensitive, except person names (PN), which
  match case-insensitively (the standard allows it and users expect it; on
  SQLite only ASCII letters fold, on PostgreSQL all letters do). Integer keys
  (IS, US) compare as numbers.
* **Wildcards** ``*`` and ``?`` for text VRs (AE, CS, LO, PN, SH, ...): a case-
  sensitive pattern (SQLite ``GLOB``, elsewhere ``LIKE``), case-insensitive
  ``LIKE``/``ILIKE`` for PN. SQL's own wildcards ``%``, ``_`` and the escape
  characters in a value are escaped, so they match literally. A lone ``*``
  is universal matching for any key (a common client habit).
* **Range** for DA and TM: ``A-B``, ``A-`` and ``-B``, inclusive; a time bound
  with fewer digits covers its whole unit (``-1200`` includes 12:00:59).
  Entities with an empty value never match a range. Date and time are matched
  independently (no combined datetime matching is negotiated).
* **List of UID**: a backslash-separated list matches any of its UIDs.
* **Multiple values** of other keys (``CT\\MR``) match when any value does.
* **Universal**: an empty value matches everything and asks for the key.
* **ModalitiesInStudy** matches a study when one of its series' Modality
  matches; sequence matching is not supported.

Keys the catalogue does not hold (InstitutionName, sequences, ...) are
returned with a zero-length value and every Pending response then carries
status 0xFF01 ("one or more Optional Keys were not supported"); so do
computed keys (NumberOfStudyRelatedSeries, ...) given with a value, which are
return keys only. Private elements are neither matched nor returned.

Responses carry only the keys asked for, plus QueryRetrieveLevel,
RetrieveAETitle (``dicom.retrieve_ae_title``: the PACS, so tools retrieve from
the system of record) and SpecificCharacterSet when the request had one or a
returned value needs more than ASCII (then the request's character set if it
can encode the values, else ``ISO_IR 192``, UTF-8).

The similarity branch
---------------------
An identifier whose private block ``PACS SIDECAR SIMILARITY`` is present
(:func:`is_similarity_query`) is not an ordinary query: the node hands it to
its similarity branch, any callable ``FindRequest -> FindAnswer`` (see
:class:`FindBranch`). Such a branch can reuse :func:`parse_query` (with
``hierarchical=False``: a similarity query names no parent UIDs) for the
standard filter keys, :func:`build_select` for candidate keys and
:func:`response_identifier` for the standard part of its responses.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
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
from sidecar.dicom.statuses import Status
from sidecar.errors import InvalidQuery, QueryRefused

logger = logging.getLogger(__name__)

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

#: Private creator of the similarity block (issue 4; see docs/conformance.md).
SIMILARITY_CREATOR = "PACS SIDECAR SIMILARITY"
SIMILARITY_GROUP = 0x0099


_TAG_SPECIFIC_CHARACTER_SET = 0x00080005
_TAG_QUERY_RETRIEVE_LEVEL = 0x00080052
_TAG_RETRIEVE_AE_TITLE = 0x00080054
#: Set by the SCP in every response whatever the request says.
_ANSWERED_BY_SCP = frozenset(
    {_TAG_SPECIFIC_CHARACTER_SET, _TAG_QUERY_RETRIEVE_LEVEL, _TAG_RETRIEVE_AE_TITLE}
)
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_LIKE_ESCAPE = "!"
_DATE_RE = re.compile(r"\d{8}")
_TIME_RE = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


class Level(enum.StrEnum):
    """Query/Retrieve levels, top to bottom."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


_MODEL_LEVELS: dict[str, tuple[Level, ...]] = {
    PATIENT_ROOT_FIND: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
    STUDY_ROOT_FIND: (Level.STUDY, Level.SERIES, Level.IMAGE),
}
_MODEL_NAMES = {PATIENT_ROOT_FIND: "Patient Root", STUDY_ROOT_FIND: "Study Root"}
_UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}


def model_name(model: str) -> str:
    """``Study Root``/``Patient Root`` for a FIND SOP Class UID (else the UID)."""
    return _MODEL_NAMES.get(model, model)


class _Kind(enum.Enum):
    TEXT = "text"  # single value (case-sensitive) or wildcard
    PN = "pn"  # single value or wildcard, case-insensitive
    UID = "uid"  # single value or list of UID
    DATE = "date"  # single value or range
    TIME = "time"  # single value or range
    INT = "int"  # single value, numeric
    MODALITIES = "modalities"  # text matching against the study's series
    RETURN_ONLY = "return"  # computed: returned, never matched


@dataclass(frozen=True)
class _Key:
    keyword: str
    entity: Level  # the entity the attribute describes
    kind: _Kind
    column: ColumnElement[Any]  # the value returned (and matched, except MODALITIES)

    @property
    def tag(self) -> BaseTag:
        return Tag(self.keyword)


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


def _key_table() -> dict[str, _Key]:
    p, st, se, i = _PATIENT.c, _STUDY.c, _SERIES.c, _INSTANCE.c
    computed = _computed_columns()
    keys = [
        _Key("PatientName", Level.PATIENT, _Kind.PN, p.patient_name),
        _Key("PatientID", Level.PATIENT, _Kind.TEXT, p.patient_id),
        _Key("IssuerOfPatientID", Level.PATIENT, _Kind.TEXT, p.issuer_of_patient_id),
        _Key("PatientBirthDate", Level.PATIENT, _Kind.DATE, p.patient_birth_date),
        _Key("PatientSex", Level.PATIENT, _Kind.TEXT, p.patient_sex),
        _Key("StudyInstanceUID", Level.STUDY, _Kind.UID, st.study_instance_uid),
        _Key("StudyDate", Level.STUDY, _Kind.DATE, st.study_date),
        _Key("StudyTime", Level.STUDY, _Kind.TIME, st.study_time),
        _Key("AccessionNumber", Level.STUDY, _Kind.TEXT, st.accession_number),
        _Key("StudyID", Level.STUDY, _Kind.TEXT, st.study_id),
        _Key("StudyDescription", Level.STUDY, _Kind.TEXT, st.study_description),
        _Key("ReferringPhysicianName", Level.STUDY, _Kind.PN, st.referring_physician_name),
        _Key("ModalitiesInStudy", Level.STUDY, _Kind.MODALITIES, st.modalities_in_study),
        _Key("SeriesInstanceUID", Level.SERIES, _Kind.UID, se.series_instance_uid),
        _Key("Modality", Level.SERIES, _Kind.TEXT, se.modality),
        _Key("SeriesNumber", Level.SERIES, _Kind.INT, se.series_number),
        _Key("SeriesDescription", Level.SERIES, _Kind.TEXT, se.series_description),
        _Key("BodyPartExamined", Level.SERIES, _Kind.TEXT, se.body_part_examined),
        _Key("SOPInstanceUID", Level.IMAGE, _Kind.UID, i.sop_instance_uid),
        _Key("SOPClassUID", Level.IMAGE, _Kind.UID, i.sop_class_uid),
        _Key("InstanceNumber", Level.IMAGE, _Kind.INT, i.instance_number),
        _Key("Rows", Level.IMAGE, _Kind.INT, i.rows),
        _Key("Columns", Level.IMAGE, _Kind.INT, i.columns),
        _Key("NumberOfFrames", Level.IMAGE, _Kind.INT, i.number_of_frames),
        _Key("AvailableTransferSyntaxUID", Level.IMAGE, _Kind.UID, i.transfer_syntax_uid),
    ]
    entity = {
        "NumberOfPatientRelatedStudies": Level.PATIENT,
        "NumberOfPatientRelatedSeries": Level.PATIENT,
        "NumberOfPatientRelatedInstances": Level.PATIENT,
        "NumberOfStudyRelatedSeries": Level.STUDY,
        "NumberOfStudyRelatedInstances": Level.STUDY,
        "NumberOfSeriesRelatedInstances": Level.SERIES,
    }
    keys += [_Key(kw, entity[kw], _Kind.RETURN_ONLY, col) for kw, col in computed.items()]
    return {k.keyword: k for k in keys}


#: Every key the catalogue answers, by keyword.
KEYS: dict[str, _Key] = _key_table()
_KEYS_BY_TAG: dict[int, _Key] = {int(k.tag): k for k in KEYS.values()}
_UNIQUE_TAGS = {int(Tag(kw)): level for level, kw in _UNIQUE_KEY.items()}


def supported_keys() -> list[str]:
    """Keywords of the keys matched and returned from the catalogue (for documentation)."""
    return sorted(KEYS)


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
        f"ESCAPE '{_LIKE_ESCAPE}'"
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
        elif ch in ("%", "_", _LIKE_ESCAPE):
            out.append(_LIKE_ESCAPE + ch)
        else:
            out.append(ch)
    return "".join(out)


def glob_pattern(value: str) -> str:
    """A DICOM value (``*``, ``?`` wildcards) as an SQLite GLOB pattern."""
    return "".join("[[]" if ch == "[" else ch for ch in value)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# ------------------------------------------------------------------- queries
@dataclass(frozen=True)
class ReturnKey:
    """One key of the request identifier to be returned in every response.

    ``key`` is ``None`` for a key the catalogue does not hold: it is returned
    with a zero-length value.
    """

    tag: int
    vr: str
    key: _Key | None


@dataclass(frozen=True)
class FindQuery:
    """A parsed C-FIND request identifier.

    Attributes
    ----------
    model
        FIND SOP Class UID (Patient Root or Study Root).
    level
        The Query/Retrieve level.
    conditions
        Matching conditions (ANDed) on the catalogue tables.
    returns
        The keys to return, in request order.
    unsupported
        Keywords (or tags) of keys not supported for matching or return; any
        means Pending responses carry 0xFF01 instead of 0xFF00.
    character_set
        The request's Specific Character Set terms (empty when absent).
    """

    model: str
    level: Level
    conditions: tuple[ColumnElement[bool], ...] = ()
    returns: tuple[ReturnKey, ...] = ()
    unsupported: tuple[str, ...] = ()
    character_set: tuple[str, ...] = ()

    @property
    def pending_status(self) -> Status:
        """0xFF00, or 0xFF01 when an optional key was not supported."""
        return Status.PENDING_WARNING if self.unsupported else Status.PENDING


def _element_values(elem: DataElement) -> list[str]:
    """The non-empty values of a request element as strings (backslash-split)."""
    value = elem.value
    if value is None:
        return []
    items: Iterable[Any] = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        text = "" if item is None else str(item).strip()
        if text:
            out.append(text)
    return out


def _parse_level(identifier: Dataset, model: str) -> Level:
    levels = _MODEL_LEVELS.get(model)
    if levels is None:
        raise InvalidQuery(f"unsupported information model {model}")
    if _TAG_QUERY_RETRIEVE_LEVEL not in identifier:
        raise InvalidQuery("QueryRetrieveLevel is missing", _TAG_QUERY_RETRIEVE_LEVEL)
    values = _element_values(identifier[_TAG_QUERY_RETRIEVE_LEVEL])
    raw = values[0].upper() if len(values) == 1 else ""
    if raw not in {lv.value for lv in levels}:
        shown = "\\".join(values) or "empty"
        raise InvalidQuery(
            f"QueryRetrieveLevel {shown[:16]} is invalid for {model_name(model)}",
            _TAG_QUERY_RETRIEVE_LEVEL,
        )
    return Level(raw)


def _entity_level(entity: Level, model: str) -> Level:
    """The level an entity's attributes belong to in ``model``."""
    if entity is Level.PATIENT and model == STUDY_ROOT_FIND:
        return Level.STUDY
    return entity


def _rank(level: Level) -> int:
    return list(Level).index(level)


def _text_condition(column: ColumnElement[Any], value: str, *, pn: bool) -> ColumnElement[bool]:
    if pn:
        return column.ilike(like_pattern(value), escape=_LIKE_ESCAPE)
    if _has_wildcard(value):
        return dicom_wildcard(column, like_pattern(value), glob_pattern(value))
    return column == value


def _date_value(value: str, keyword: str, tag: int) -> str:
    if len(value) == 10 and value[4] == value[7] == ".":  # ACR-NEMA YYYY.MM.DD
        value = value.replace(".", "")
    if not _DATE_RE.fullmatch(value):
        raise InvalidQuery(f"{keyword}: {value[:20]!r} is not a date or date range", tag)
    return value


def _time_value(value: str, keyword: str, tag: int) -> str:
    value = value.replace(":", "")  # ACR-NEMA HH:MM:SS
    if not _TIME_RE.fullmatch(value):
        raise InvalidQuery(f"{keyword}: {value[:20]!r} is not a time or time range", tag)
    return value


def _range_condition(
    column: ColumnElement[Any], value: str, key: _Key, tag: int
) -> ColumnElement[bool]:
    parse = _date_value if key.kind is _Kind.DATE else _time_value
    if "-" not in value:
        return column == parse(value, key.keyword, tag)
    if value.count("-") != 1:
        raise InvalidQuery(f"{key.keyword}: {value[:20]!r} is not a valid range", tag)
    start, end = (part.strip() for part in value.split("-"))
    conds: list[ColumnElement[bool]] = [column != ""]  # unknown values never match a range
    if start:
        conds.append(column >= parse(start, key.keyword, tag))
    if end:
        end = parse(end, key.keyword, tag)
        # A time bound with fewer digits covers its whole unit: -1200 takes 12:00:59.
        conds.append(column <= (end + "~" if key.kind is _Kind.TIME else end))
    return and_(*conds)


def _int_value(value: str, keyword: str, tag: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidQuery(f"{keyword}: {value[:20]!r} is not an integer", tag) from None


def _condition(key: _Key, values: list[str], tag: int) -> ColumnElement[bool] | None:
    """The matching condition of one key with non-empty ``values`` (None: universal)."""
    if "*" in values:  # a lone "*" is universal matching, whatever the VR
        return None
    if key.kind is _Kind.UID:
        return key.column == values[0] if len(values) == 1 else key.column.in_(values)
    if key.kind is _Kind.INT:
        numbers = [_int_value(v, key.keyword, tag) for v in values]
        return key.column == numbers[0] if len(numbers) == 1 else key.column.in_(numbers)
    if key.kind in (_Kind.DATE, _Kind.TIME):
        return or_(*(_range_condition(key.column, v, key, tag) for v in values))
    if key.kind is _Kind.MODALITIES:
        se = _SERIES.alias("m_series")
        match = or_(*(_text_condition(se.c.modality, v, pn=False) for v in values))
        return exists(
            select(se.c.id).where(se.c.study_pk == _STUDY.c.id, match).correlate(_STUDY)
        )
    pn = key.kind is _Kind.PN
    return or_(*(_text_condition(key.column, v, pn=pn) for v in values))


def parse_query(identifier: Dataset, model: str, *, hierarchical: bool = True) -> FindQuery:
    """Parse a C-FIND request identifier.

    Parameters
    ----------
    identifier
        The decoded request identifier.
    model
        The FIND SOP Class UID (Patient Root or Study Root).
    hierarchical
        Require the unique keys of every level above the query level (PS3.4
        C.4.1.3.1.1). ``False`` makes them optional filters, as a relational
        query or a similarity query needs.

    Raises
    ------
    InvalidQuery
        QueryRetrieveLevel missing or invalid for the model, a required unique
        key missing or empty, a unique key of a lower level with a value, or a
        value that cannot be matched (a bad date, time, range or number). The
        exception's ``tag`` names the offending attribute.
    """
    level = _parse_level(identifier, model)
    levels = _MODEL_LEVELS[model]
    rank = _rank(level)
    conditions: list[ColumnElement[bool]] = []
    returns: list[ReturnKey] = []
    unsupported: list[str] = []
    character_set: tuple[str, ...] = ()
    try:
        elements = list(identifier)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad values
        raise InvalidQuery(f"cannot decode identifier: {exc.__class__.__name__}") from exc
    for elem in elements:
        tag = int(elem.tag)
        if tag == _TAG_SPECIFIC_CHARACTER_SET:
            character_set = tuple(_element_values(elem))
            continue
        if tag in _ANSWERED_BY_SCP or elem.tag.element == 0 or elem.tag.group < 0x0008:
            continue  # group lengths and command/meta groups carry no keys
        if elem.tag.is_private:
            unsupported.append(f"({elem.tag.group:04X},{elem.tag.element:04X})")
            continue
        key = _KEYS_BY_TAG.get(tag)
        values = [] if elem.VR == "SQ" else _element_values(elem)
        if key is None or _rank(_entity_level(key.entity, model)) > rank:
            # Not in the catalogue, or below the query level.
            if values and tag in _UNIQUE_TAGS and _rank(_UNIQUE_TAGS[tag]) > rank:
                raise InvalidQuery(
                    f"{keyword_for_tag(tag)} is below the {level.value} level", tag
                )
            unsupported.append(keyword_for_tag(tag) or f"({elem.tag.group:04X},"
                               f"{elem.tag.element:04X})")
            returns.append(ReturnKey(tag, elem.VR, None))
            continue
        returns.append(ReturnKey(tag, dictionary_VR(tag), key))
        if not values:
            continue  # universal matching: a return key
        if key.kind is _Kind.RETURN_ONLY:
            unsupported.append(key.keyword)  # computed keys are not matched
            continue
        cond = _condition(key, values, tag)
        if cond is not None:
            conditions.append(cond)
    if hierarchical:
        present = {r.key.keyword: r for r in returns if r.key is not None}
        for upper in levels[: levels.index(level)]:
            kw = _UNIQUE_KEY[upper]
            if kw not in present or not _element_values(identifier[kw]):
                raise InvalidQuery(f"{kw} is required at {level.value} level", int(Tag(kw)))
    return FindQuery(
        model=model,
        level=level,
        conditions=tuple(conditions),
        returns=tuple(returns),
        unsupported=tuple(unsupported),
        character_set=character_set,
    )


_LEVEL_PK: dict[Level, ColumnElement[Any]] = {
    Level.PATIENT: _PATIENT.c.id,
    Level.STUDY: _STUDY.c.id,
    Level.SERIES: _SERIES.c.id,
    Level.IMAGE: _INSTANCE.c.id,
}

#: Result column holding the primary key of the matched entity.
PK_LABEL = "_pk"


def _from_clause(level: Level) -> FromClause:
    if level is Level.PATIENT:
        return _PATIENT
    study = _STUDY.join(_PATIENT, _PATIENT.c.id == _STUDY.c.patient_pk)
    if level is Level.STUDY:
        return study
    series = _SERIES.join(study, _STUDY.c.id == _SERIES.c.study_pk)
    if level is Level.SERIES:
        return series
    return _INSTANCE.join(series, _SERIES.c.id == _INSTANCE.c.series_pk)


def build_select(query: FindQuery) -> Select[Any]:
    """The ``SELECT`` answering ``query``: one row per matching entity.

    Columns: the entity's primary key labelled :data:`PK_LABEL`, then every
    supported requested key labelled with its keyword. Rows come in the order
    the entities were first stored.
    """
    pk = _LEVEL_PK[query.level]
    columns: list[ColumnElement[Any]] = [pk.label(PK_LABEL)]
    seen: set[str] = set()
    for rk in query.returns:
        if rk.key is not None and rk.key.keyword not in seen:
            seen.add(rk.key.keyword)
            columns.append(rk.key.column.label(rk.key.keyword))
    return (
        select(*columns)
        .select_from(_from_clause(query.level))
        .where(*query.conditions)
        .order_by(pk)
    )


# ------------------------------------------------------------------ responses
def _response_value(key: _Key, value: Any) -> Any:
    if value is None or value == "":
        return None
    if key.keyword == "ModalitiesInStudy":
        mods = [m for m in str(value).split("\\") if m]
        return mods or None
    return value


def _needs_more_than_ascii(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        out += [v for v in items if isinstance(v, str) and not v.isascii()]
    return out


def response_character_set(requested: Sequence[str], texts: Sequence[str]) -> list[str] | None:
    """The Specific Character Set of a response.

    ``texts`` are the response's non-ASCII text values. With none, the
    request's character set is echoed (``None`` when it had none). Otherwise
    the request's single-byte character set is kept when it can encode them,
    else UTF-8 (``ISO_IR 192``) is used.
    """
    if not texts:
        return list(requested) or None
    if len(requested) == 1 or (len(requested) == 2 and not requested[0]):
        term = requested[-1]
        codec = python_encoding.get(term)
        if codec and "2022" not in term:
            try:
                for text in texts:
                    text.encode(codec)
            except (UnicodeEncodeError, LookupError):
                pass
            else:
                return [term]
    return ["ISO_IR 192"]


class RowLike(Protocol):
    """What :func:`response_identifier` reads of a row: values by key keyword."""

    @property
    def _mapping(self) -> Mapping[Any, Any]: ...


def response_identifier(query: FindQuery, row: RowLike, retrieve_ae_title: str) -> Dataset:
    """A Pending response identifier for one result row of :func:`build_select`."""
    mapping = row._mapping
    values: dict[int, tuple[str, Any]] = {}
    for rk in query.returns:
        if rk.key is None:
            values[rk.tag] = (rk.vr, [] if rk.vr == "SQ" else None)
        else:
            values[rk.tag] = (rk.vr, _response_value(rk.key, mapping[rk.key.keyword]))
    ds = Dataset()
    charset = response_character_set(
        query.character_set, _needs_more_than_ascii(v for _, v in values.values())
    )
    if charset:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    ds.QueryRetrieveLevel = query.level.value
    ds.RetrieveAETitle = retrieve_ae_title
    for tag, (vr, value) in values.items():
        ds.add(DataElement(tag, vr, value))
    return ds


# ------------------------------------------------------------------- branches
@dataclass(frozen=True)
class FindRequest:
    """One C-FIND request as a branch (ordinary or similarity) sees it.

    Attributes
    ----------
    identifier
        The decoded request identifier.
    model
        The FIND SOP Class UID of the presentation context.
    calling_ae_title, calling_host
        Who asks (for logs and audit).
    """

    identifier: Dataset
    model: str
    calling_ae_title: str = ""
    calling_host: str = ""


@dataclass
class FindAnswer:
    """What a branch answers: Pending identifiers, produced lazily or not.

    The node sends each identifier with ``pending`` status, checks for
    C-CANCEL between them, and ends with Success. A branch reports failures
    by raising :class:`sidecar.errors.QueryError` subclasses, before or while
    the identifiers are produced.
    """

    level: Level
    identifiers: Iterable[Dataset]
    count: int | None = None  # number of matches when known up front
    pending: Status = Status.PENDING


class FindBranch(Protocol):
    """A C-FIND branch: answers a request or raises a ``QueryError``."""

    def __call__(self, request: FindRequest) -> FindAnswer:
        """Answer ``request``."""


def is_similarity_query(identifier: Dataset) -> bool:
    """True when the identifier carries the ``PACS SIDECAR SIMILARITY`` private block.

    Any private creator slot (0099,0010)-(0099,00FF) counts, so a client that
    reserves another block for the same creator is recognised too.
    """
    for elem in identifier.group_dataset(SIMILARITY_GROUP):
        if 0x10 <= elem.tag.element <= 0xFF:
            try:
                values = _element_values(elem)
            except Exception:  # noqa: BLE001 - an undecodable creator is not ours
                continue
            if values and values[0].strip() == SIMILARITY_CREATOR:
                return True
    return False


class CatalogueFind:
    """The ordinary C-FIND branch: parse, one short read, lazily built responses.

    Parameters
    ----------
    engine
        The process's engine.
    max_results
        Most matches answered (``dicom.max_find_results``); a query with more
        is refused (0xA700) so that the requester narrows it rather than
        receiving a silently truncated list. 0: no limit.
    retrieve_ae_title
        RetrieveAETitle of every response.
    """

    def __init__(self, engine: Engine, *, max_results: int, retrieve_ae_title: str) -> None:
        self._engine = engine
        self._max_results = max_results
        self.retrieve_ae_title = retrieve_ae_title

    def fetch(self, query: FindQuery) -> Sequence[Row[Any]]:
        """Every matching row, read in one short transaction.

        Raises
        ------
        QueryRefused
            The catalogue could not be read, or more than ``max_results`` match.
        """
        stmt = build_select(query)
        if self._max_results:
            stmt = stmt.limit(self._max_results + 1)
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(stmt).all()
        except SQLAlchemyError as exc:
            logger.error("C-FIND catalogue read failed: %s", exc.__class__.__name__)
            logger.debug("C-FIND catalogue read failed", exc_info=True)
            raise QueryRefused(f"catalogue unavailable ({exc.__class__.__name__})") from exc
        if self._max_results and len(rows) > self._max_results:
            raise QueryRefused(f"more than {self._max_results} matches: narrow the query")
        return rows

    def __call__(self, request: FindRequest) -> FindAnswer:
        """Answer an ordinary query (see the module documentation for the rules)."""
        query = parse_query(request.identifier, request.model)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "C-FIND %s keys %s, unsupported %s", query.level.value,
                [keyword_for_tag(r.tag) for r in query.returns], list(query.unsupported),
            )
        rows = self.fetch(query)
        retrieve = self.retrieve_ae_title
        return FindAnswer(
            level=query.level,
            identifiers=_lazy(lambda row: response_identifier(query, row, retrieve), rows),
            count=len(rows),
            pending=query.pending_status,
        )


def _lazy(build: Callable[[Row[Any]], Dataset], rows: Iterable[Row[Any]]) -> Iterator[Dataset]:
    for row in rows:
        yield build(row)
