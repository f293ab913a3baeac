"""Ordinary C-FIND over the catalogue: identifier → checked conditions → response identifiers.

Pure parts (no I/O): :func:`parse_query` turns a request identifier into a
:class:`FindQuery` (matching conditions as :class:`~sidecar.db.find_queries.Match`
data, the keys to return, keys that are not supported);
:func:`sidecar.db.find_queries.build_select` makes the one ``SELECT`` that
answers it; :func:`response_identifier` builds a Pending response from one
result row. :class:`CatalogueFind` runs the query in one short read and is the
node's ordinary C-FIND branch.

Matching rules, levels, unsupported keys and the similarity branch: docs/design/dicom.md.
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
from pydicom.tag import Tag

from sidecar.db.find_queries import KEYS, CatalogueKey, KeyKind, Match, Span, fetch
from sidecar.db.repository import CatalogueUnavailable
from sidecar.db.types import Engine, Row
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


_KEYS_BY_TAG: dict[int, CatalogueKey] = {int(Tag(kw)): k for kw, k in KEYS.items()}
_UNIQUE_TAGS = {int(Tag(kw)): level for level, kw in _UNIQUE_KEY.items()}


def supported_keys() -> list[str]:
    """Keywords of the keys matched and returned from the catalogue (for documentation)."""
    return sorted(KEYS)


# ------------------------------------------------------------------- queries
@dataclass(frozen=True)
class ReturnKey:
    """One key of the request identifier to be returned in every response.

    ``key`` is ``None`` for a key the catalogue does not hold: it is returned
    with a zero-length value.
    """

    tag: int
    vr: str
    key: CatalogueKey | None


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
        Matching conditions (ANDed) on the catalogue's keys.
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
    conditions: tuple[Match, ...] = ()
    returns: tuple[ReturnKey, ...] = ()
    unsupported: tuple[str, ...] = ()
    character_set: tuple[str, ...] = ()

    @property
    def keywords(self) -> list[str]:
        """The catalogue keys to return, in request order, each once."""
        return list(dict.fromkeys(r.key.keyword for r in self.returns if r.key is not None))

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


def _entity_level(entity: str, model: str) -> Level:
    """The level an entity's attributes belong to in ``model``."""
    if entity == Level.PATIENT and model == STUDY_ROOT_FIND:
        return Level.STUDY
    return Level(entity)


def _rank(level: Level) -> int:
    return list(Level).index(level)


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


def _span(value: str, key: CatalogueKey, tag: int) -> Span:
    parse = _date_value if key.kind is KeyKind.DATE else _time_value
    if "-" not in value:
        return Span(parse(value, key.keyword, tag), "", single=True)
    if value.count("-") != 1:
        raise InvalidQuery(f"{key.keyword}: {value[:20]!r} is not a valid range", tag)
    start, end = (part.strip() for part in value.split("-"))
    return Span(
        parse(start, key.keyword, tag) if start else "",
        parse(end, key.keyword, tag) if end else "",
    )


def _int_value(value: str, keyword: str, tag: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidQuery(f"{keyword}: {value[:20]!r} is not an integer", tag) from None


def _condition(key: CatalogueKey, values: list[str], tag: int) -> Match | None:
    """The matching condition of one key with non-empty ``values`` (None: universal)."""
    if "*" in values:  # a lone "*" is universal matching, whatever the VR
        return None
    if key.kind is KeyKind.INT:
        return Match(key.keyword, tuple(_int_value(v, key.keyword, tag) for v in values))
    if key.kind in (KeyKind.DATE, KeyKind.TIME):
        return Match(key.keyword, tuple(_span(v, key, tag) for v in values))
    return Match(key.keyword, tuple(values))


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
    conditions: list[Match] = []
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
        if key.kind is KeyKind.RETURN_ONLY:
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


# ------------------------------------------------------------------ responses
def _response_value(key: CatalogueKey, value: Any) -> Any:
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
    """A Pending response identifier for one result row of the query's ``SELECT``."""
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
        limit = self._max_results + 1 if self._max_results else 0
        try:
            rows = fetch(self._engine, query, limit=limit)
        except CatalogueUnavailable as exc:
            logger.error("C-FIND catalogue read failed: %s", exc.cause)
            logger.debug("C-FIND catalogue read failed", exc_info=True)
            raise QueryRefused(str(exc)) from exc
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
