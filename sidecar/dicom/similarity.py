"""The similarity C-FIND branch: the private block ``PACS SIDECAR SIMILARITY`` → ranked hits.

The request/response contract (private tags, levels, filters, responses,
failures) is in docs/conformance.md and docs/design/dicom.md;
:data:`PRIVATE_TAGS` is its single source in code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydicom.datadict import add_private_dict_entries, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, PrivateBlock

from sidecar.config import QueryConfig
from sidecar.db.find_queries import PK_LABEL, fetch_matching
from sidecar.db.repository import CatalogueUnavailable
from sidecar.db.types import Engine
from sidecar.dicom.find import (
    SIMILARITY_CREATOR,
    SIMILARITY_GROUP,
    FindAnswer,
    FindQuery,
    FindRequest,
    Level,
    RowLike,
    parse_query,
    response_identifier,
)
from sidecar.errors import (
    BadQuery,
    IndexUnavailable,
    InvalidQuery,
    NotEmbedded,
    QueryError,
    QueryRefused,
    ReferenceNotUsable,
    SearchError,
    UnknownReference,
)
from sidecar.search.front import Requester, SimilarityBackend, SimilarityRequest, effective_k
from sidecar.search.types import Hit, Reference, SearchFilters, SearchResult
from sidecar.search.types import Level as SearchLevel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivateTag:
    """One element of the similarity block (element byte within the block)."""

    offset: int
    vr: str
    keyword: str
    name: str
    direction: str  # "request" or "response"

    def tag(self, slot: int = 0x10) -> int:
        """The full tag when the creator holds ``slot`` (0x10 → (0099,10xx))."""
        return (SIMILARITY_GROUP << 16) | (slot << 8) | self.offset


#: The block, in one place: pydicom's dictionary, the DCMTK dictionary file
#: (``docs/dcmtk/pacs-sidecar.dic``) and the conformance statement follow it.
PRIVATE_TAGS: Final[tuple[PrivateTag, ...]] = (
    PrivateTag(0x01, "UI", "SidecarReferenceSOPInstanceUID", "Reference SOP Instance UID",
               "request"),
    PrivateTag(0x02, "UI", "SidecarReferenceStudyInstanceUID", "Reference Study Instance UID",
               "request"),
    PrivateTag(0x03, "UI", "SidecarReferenceSeriesInstanceUID", "Reference Series Instance UID",
               "request"),
    PrivateTag(0x04, "US", "SidecarTopK", "Top K", "request"),
    PrivateTag(0x05, "CS", "SidecarIncludeSamePatient", "Include Same Patient", "request"),
    PrivateTag(0x10, "FD", "SidecarSimilarityScore", "Similarity Score", "response"),
    PrivateTag(0x11, "UL", "SidecarRank", "Rank", "response"),
    PrivateTag(0x12, "UI", "SidecarBestSOPInstanceUID", "Best Matching SOP Instance UID",
               "response"),
    PrivateTag(0x13, "UI", "SidecarBestSeriesInstanceUID", "Best Matching Series Instance UID",
               "response"),
    PrivateTag(0x14, "LO", "SidecarModelID", "Model ID", "response"),
    PrivateTag(0x15, "FD", "SidecarCalibratedScore", "Calibrated Score", "response"),
    PrivateTag(0x16, "CS", "SidecarRankedBy", "Ranked By", "response"),
)
_BY_OFFSET = {t.offset: t for t in PRIVATE_TAGS}
REF_SOP, REF_STUDY, REF_SERIES, TOP_K, SAME_PATIENT = 0x01, 0x02, 0x03, 0x04, 0x05
SCORE, RANK, BEST_SOP, BEST_SERIES, MODEL_ID = 0x10, 0x11, 0x12, 0x13, 0x14
CALIBRATED, RANKED_BY = 0x15, 0x16
#: Standard keys that become search filters (applied before ranking).
_FILTER_KEYWORDS: Final = ("Modality", "ModalitiesInStudy", "StudyDate", "BodyPartExamined")
#: Keys filled from the hit itself (the best-matching series) rather than the catalogue row.
_FROM_HIT: Final = ("Modality", "BodyPartExamined")
_LEVELS: dict[Level, SearchLevel] = {
    Level.STUDY: "study", Level.SERIES: "series", Level.IMAGE: "image",
}
_HIT_UID = {Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID",
            Level.IMAGE: "SOPInstanceUID"}
_LEVEL_ORDER: Final = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
#: Standard keys whose values a :class:`~sidecar.search.types.Hit` carries, as the
#: catalogue would give them (the search read them from it moments before).
_HIT_VALUES: Final[dict[str, Callable[[Hit], Any]]] = {
    "PatientID": lambda h: h.patient_id,
    "IssuerOfPatientID": lambda h: h.issuer_of_patient_id,
    "StudyInstanceUID": lambda h: h.study_instance_uid,
    "StudyDate": lambda h: h.study_date,
    "StudyDescription": lambda h: h.study_description,
    "AccessionNumber": lambda h: h.accession_number,
    "ModalitiesInStudy": lambda h: "\\".join(h.modalities_in_study),
    "SeriesInstanceUID": lambda h: h.series_instance_uid,
    "Modality": lambda h: h.modality,
    "BodyPartExamined": lambda h: h.body_part_examined,
    "SeriesDescription": lambda h: h.series_description,
    "SeriesNumber": lambda h: h.series_number,
    "SOPInstanceUID": lambda h: h.sop_instance_uid,
    "InstanceNumber": lambda h: h.instance_number,
}


def register_private_dictionary() -> None:
    """Add the block's elements to pydicom's private dictionary (idempotent)."""
    add_private_dict_entries(
        SIMILARITY_CREATOR,
        {t.tag(0x10): (t.vr, "1", t.name, "") for t in PRIVATE_TAGS},
    )


register_private_dictionary()


def dcmtk_dictionary() -> str:
    """The block as a DCMTK data dictionary (for ``DCMDICTPATH``; see docs/conformance.md)."""
    lines = [
        "# pacs-sidecar similarity C-FIND private block, for DCMTK tools (findscu, dcmdump).",
        "# Generated from sidecar/dicom/similarity.py (PRIVATE_TAGS); do not edit.",
        "# Use: DCMDICTPATH=/usr/share/libdcmtk17/dicom.dic:/usr/share/libdcmtk17/private.dic:"
        "THIS_FILE",
    ]
    for t in PRIVATE_TAGS:
        lines.append(
            f'(0099,"{SIMILARITY_CREATOR}",{t.offset:02X})\t{t.vr}\t{t.keyword}\t1\tPrivateTag'
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ parsing
def _block(identifier: Dataset) -> PrivateBlock:
    try:
        return identifier.private_block(SIMILARITY_GROUP, SIMILARITY_CREATOR)
    except KeyError:
        raise InvalidQuery(f"private creator {SIMILARITY_CREATOR!r} missing") from None


def _value(block: PrivateBlock, offset: int, little_endian: bool) -> Any:
    """The block element's value by its known VR (``None`` when absent or empty)."""
    tag = block.get_tag(offset)
    if tag not in block.dataset:
        return None
    elem = block.dataset[tag]
    spec = _BY_OFFSET[offset]
    value = elem.value
    if value is None or value == b"" or value == "":
        return None
    if elem.VR in ("UN", "OB") and isinstance(value, bytes):
        if spec.vr == "US":
            if len(value) != 2:
                raise InvalidQuery(f"{spec.name}: {len(value)} bytes, US needs 2", tag)
            return int.from_bytes(value, "little" if little_endian else "big")
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidQuery(f"{spec.name}: not ASCII text", tag) from None
    if spec.vr == "US":
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise InvalidQuery(f"{spec.name}: {value[:16]!r} is not a number", tag) from None
        return int(value) if value is not None else None
    text = str(value).strip(" \x00")
    return text or None


@dataclass(frozen=True)
class ParsedSimilarity:
    """A similarity identifier, understood.

    ``standard`` is the identifier's standard part parsed as an ordinary
    C-FIND at the same level (return keys, and the conditions of keys that
    are not search filters).
    """

    request: SimilarityRequest
    level: Level
    standard: FindQuery
    post_filter: bool
    keys_from_hit: tuple[str, ...]
    hit_only: bool = False


def parse_similarity(identifier: Dataset, model: str) -> ParsedSimilarity:
    """Parse a similarity C-FIND identifier.

    Raises
    ------
    InvalidQuery
        Missing creator, no reference or more than one, a malformed UID, top-K
        or include-same-patient value, a PATIENT level, or a bad standard key.
    """
    block = _block(identifier)
    little = bool(getattr(identifier, "original_encoding", (True, True))[1] is not False)
    refs = {off: _value(block, off, little) for off in (REF_SOP, REF_STUDY, REF_SERIES)}
    given = {off: v for off, v in refs.items() if v}
    if len(given) != 1:
        raise InvalidQuery(
            "give one reference: (0099,xx01), (0099,xx02) or (0099,xx03)"
            if given else "no reference UID in (0099,xx01), (0099,xx02) or (0099,xx03)",
            block.get_tag(REF_SOP),
        )
    ((offset, uid),) = given.items()
    try:
        if offset == REF_SOP:
            reference = Reference.instance(uid)
        elif offset == REF_STUDY:
            reference = Reference.study(uid)
        else:
            reference = Reference.series(uid)
    except BadQuery:
        raise InvalidQuery(f"{_BY_OFFSET[offset].name} is not a valid UID",
                           block.get_tag(offset)) from None
    k = _value(block, TOP_K, little)
    if k is not None and not 0 <= k <= 0xFFFF:
        raise InvalidQuery("top-K out of range", block.get_tag(TOP_K))
    same = _value(block, SAME_PATIENT, little)
    if same is not None and str(same).upper() not in ("YES", "NO"):
        raise InvalidQuery("include same patient must be YES or NO", block.get_tag(SAME_PATIENT))

    # The standard part: no private elements; the filter keys become return keys.
    standard = Dataset()
    filters: dict[str, str] = {}
    for elem in identifier:
        if elem.tag.group == SIMILARITY_GROUP:
            continue
        keyword = keyword_for_tag(int(elem.tag))
        if keyword in _FILTER_KEYWORDS:
            values = elem.value if elem.VM > 1 else [elem.value]
            text = "\\".join(str(v).strip() for v in values if v not in (None, ""))
            if text:
                filters[keyword] = text
            standard.add(DataElement(elem.tag, elem.VR, None))
            continue
        standard.add(elem)
    std = parse_query(standard, model, hierarchical=False)
    if std.level is Level.PATIENT:
        raise InvalidQuery("similarity queries rank STUDY, SERIES or IMAGE level",
                           0x00080052)
    modalities = "\\".join(x for x in (filters.get("Modality"), filters.get("ModalitiesInStudy"))
                           if x)
    search_filters = SearchFilters(
        modalities=tuple(m for m in modalities.split("\\") if m),
        study_date=filters.get("StudyDate", ""),
        body_part=filters.get("BodyPartExamined", ""),
    )
    try:
        search_filters.catalogue()  # validate now: a bad filter is the identifier's fault
    except BadQuery as exc:
        raise InvalidQuery(str(exc)) from None
    from_hit = tuple(kw for kw in _FROM_HIT if kw in standard)
    unsupported = tuple(u for u in std.unsupported if u not in from_hit)
    std = FindQuery(std.model, std.level, std.conditions, std.returns, unsupported,
                    std.character_set)
    return ParsedSimilarity(
        request=SimilarityRequest(
            reference=reference,
            k=k,
            level=_LEVELS[std.level],
            include_same_patient=str(same or "NO").upper() == "YES",
            filters=search_filters,
        ),
        level=std.level,
        standard=std,
        post_filter=bool(std.conditions),
        keys_from_hit=from_hit,
        hit_only=not std.conditions and all(
            rk.key is None or _from_hit_alone(rk.key.keyword, Level(rk.key.entity), std.level)
            for rk in std.returns
        ),
    )


def _from_hit_alone(keyword: str, key_level: Level, level: Level) -> bool:
    """Whether the hit itself gives a return key's value at a query level."""
    if keyword in _FROM_HIT:
        return True
    return keyword in _HIT_VALUES and (
        _LEVEL_ORDER.index(key_level) <= _LEVEL_ORDER.index(level)
    )


# ------------------------------------------------------------------- errors
def search_error_to_query_error(exc: SearchError, reference: Reference) -> QueryError:
    """The C-FIND failure for a search error, with an Error Comment that fits 64 characters.

    * :class:`BadQuery` → :class:`InvalidQuery` (0xA900)
    * :class:`UnknownReference` → ``ReferenceNotUsable("unknown")`` (0xC001)
    * :class:`NotEmbedded` → ``ReferenceNotUsable("not_embedded")`` (0xC002)
    * :class:`IndexUnavailable` → :class:`QueryRefused` (0xA700)
    """
    kind = reference.kind
    if isinstance(exc, BadQuery):
        return InvalidQuery(str(exc))
    if isinstance(exc, UnknownReference):
        return ReferenceNotUsable("unknown", f"unknown reference {kind}: not in the archive")
    if isinstance(exc, NotEmbedded):
        state = exc.state
        if state == "failed":
            text = f"reference {kind} not embedded: embedding failed"
        elif state == "skipped":
            text = f"reference {kind} is not an image (not embedded)"
        elif state == "embedded":
            text = f"reference {kind} not embedded by the serving model yet"
        else:
            text = f"reference {kind} not embedded yet (pending)"
        return ReferenceNotUsable("not_embedded", text)
    if isinstance(exc, IndexUnavailable):
        return QueryRefused(str(exc))
    return QueryRefused(str(exc))


# ----------------------------------------------------------------- responses
class SimilarityFind:
    """The similarity C-FIND branch of a :class:`~sidecar.dicom.node.DicomNode`.

    Parameters
    ----------
    backend
        Answers the search (:class:`sidecar.search.front.QueryService` in the main
        process, :class:`sidecar.search.ipc.QueryClient` in a receiver process).
    engine
        The process's engine, to read the requested standard keys of the hits.
    query_config
        The ``query`` section (top-K default and cap).
    retrieve_ae_title
        RetrieveAETitle of every response.
    """

    def __init__(self, backend: SimilarityBackend, engine: Engine, query_config: QueryConfig, *,
                 retrieve_ae_title: str) -> None:
        self._backend = backend
        self._engine = engine
        self._query_cfg = query_config
        self.retrieve_ae_title = retrieve_ae_title

    def __call__(self, request: FindRequest) -> FindAnswer:
        """Answer a similarity identifier (see the module documentation)."""
        parsed = parse_similarity(request.identifier, request.model)
        req = parsed.request
        wanted = effective_k(self._query_cfg, req.k)
        if parsed.post_filter:  # rank as many as allowed, then match the other keys
            req = SimilarityRequest(req.reference, self._query_cfg.max_k, req.level,
                                    req.include_same_patient, req.filters)
        requester = Requester("dicom", request.calling_ae_title, request.calling_host)
        try:
            result = self._backend.search(req, requester)
        except SearchError as exc:
            logger.debug("similarity query refused: %s", exc)
            raise search_error_to_query_error(exc, req.reference) from exc
        hits: Sequence[Hit] = result.hits
        rows = self._rows(parsed, hits)
        if parsed.post_filter:
            hits = [h for h in hits if self._hit_uid(parsed.level, h) in rows][:wanted]
        return FindAnswer(
            level=parsed.level,
            identifiers=self._responses(parsed, result, hits, rows),
            count=len(hits),
            pending=parsed.standard.pending_status,
        )

    @staticmethod
    def _hit_uid(level: Level, hit: Hit) -> str:
        if level is Level.STUDY:
            return hit.study_instance_uid
        if level is Level.SERIES:
            return hit.series_instance_uid
        return hit.sop_instance_uid

    def _rows(self, parsed: ParsedSimilarity, hits: Sequence[Hit]) -> dict[str, RowLike]:
        """Catalogue rows of the hits with the requested keys (and the standard conditions).

        When every requested key is one the hits carry (UIDs, patient ID,
        study date and description, accession number, modalities, series
        attributes) the rows are made from the hits, without another
        catalogue read.
        """
        if not hits:
            return {}
        if parsed.hit_only:
            return {self._hit_uid(parsed.level, h): _HitRow.of(h) for h in hits}
        level = parsed.level
        uids = [self._hit_uid(level, h) for h in hits]
        try:
            found = fetch_matching(self._engine, parsed.standard, _HIT_UID[level], uids)
        except CatalogueUnavailable as exc:
            logger.error("similarity C-FIND catalogue read failed: %s", exc.cause)
            raise QueryRefused(str(exc)) from exc
        return {uid: row for uid, row in found.items()}

    def _responses(
        self, parsed: ParsedSimilarity, result: SearchResult, hits: Sequence[Hit],
        rows: Mapping[str, RowLike],
    ) -> Iterator[Dataset]:
        present = [(h, rows[u]) for h in hits if (u := self._hit_uid(parsed.level, h)) in rows]
        for rank, (hit, row) in enumerate(present, start=1):  # a hit deleted meanwhile is skipped
            ds = response_identifier(parsed.standard, row, self.retrieve_ae_title)
            for keyword in parsed.keys_from_hit:
                value = hit.modality if keyword == "Modality" else hit.body_part_examined
                ds[keyword].value = value or None
            block = ds.private_block(SIMILARITY_GROUP, SIMILARITY_CREATOR, create=True)
            block.add_new(SCORE, "FD", float(hit.score))
            block.add_new(RANK, "UL", rank)
            block.add_new(BEST_SOP, "UI", hit.sop_instance_uid)
            block.add_new(BEST_SERIES, "UI", hit.series_instance_uid)
            block.add_new(MODEL_ID, "LO", result.model_id)
            if hit.calibrated_score is not None:
                block.add_new(CALIBRATED, "FD", float(hit.calibrated_score))
            block.add_new(RANKED_BY, "CS", hit.ranked_by.upper())
            yield ds


@dataclass(frozen=True)
class _HitRow:
    """A hit seen as a catalogue row: the values :func:`response_identifier` reads, by keyword."""

    _mapping: Mapping[str, Any]

    @classmethod
    def of(cls, hit: Hit) -> _HitRow:
        return cls({keyword: value(hit) for keyword, value in _HIT_VALUES.items()})


__all__ = [
    "PK_LABEL",
    "PRIVATE_TAGS",
    "ParsedSimilarity",
    "PrivateTag",
    "SimilarityFind",
    "dcmtk_dictionary",
    "parse_similarity",
    "register_private_dictionary",
    "search_error_to_query_error",
]
