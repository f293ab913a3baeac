"""Domain errors of pacs-sidecar: the one error vocabulary.

Each query error carries, as class attributes, its C-FIND status (``find_status``),
its C-STORE status when refusing an example image (``store_status``), its HTTP
status and its wire kind (metrics, audit, inter-process); each front door
translates by reading them. DICOM statuses are :class:`sidecar.dimse.Status` members.
"""

from __future__ import annotations

from typing import ClassVar

from sidecar.dimse import Status


class SidecarError(Exception):
    """Base class of every error this package raises on purpose."""


def is_native_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a Rust extension's panic (pyo3's ``PanicException``).

    It derives from :class:`BaseException`, not :class:`Exception`, so ``except
    Exception`` lets it through: pylibjpeg-rle panics on a damaged RLE frame (found by
    the torture fuzz campaign, issue 19: the embedding job died on it at every run).
    """
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


class ConfigError(SidecarError):
    """The configuration file or an environment override is invalid.

    Parameters
    ----------
    problems
        One line per problem, each starting with the dotted path of the setting.
    source
        Where the configuration came from (a file path), for the message.
    """

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  " + "\n  ".join(problems))


class StoreError(SidecarError):
    """Base of the errors that refuse one stored instance."""


class InvalidDataset(StoreError):
    """The dataset cannot be parsed or lacks what storage needs.

    ``kind`` selects the DICOM status family: ``"unparseable"``,
    ``"missing"`` (a required attribute is absent or empty), ``"invalid_uid"``,
    ``"mismatch"`` (dataset disagrees with the C-STORE request).
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class OutOfResources(StoreError):
    """Storage cannot accept data right now (disk watermark, I/O error)."""


class StorageFailure(StoreError):
    """Writing the file or committing its row failed; nothing was kept."""


class RejectedInstance(StoreError):
    """The instance was rejected by an IOCM rejection note and is not stored again."""


class QueryError(SidecarError):
    """A query (C-FIND, search) that cannot be answered; the message is for the requester.

    A C-FIND handler answers subclasses it does not know with 0xC000 (unable
    to process) and the message as Error Comment.
    """

    find_status: ClassVar[int] = Status.UNABLE_TO_PROCESS
    store_status: ClassVar[int] = Status.CANNOT_UNDERSTAND
    http_status: ClassVar[int] = 500
    wire_kind: ClassVar[str] = "error"

    @property
    def dicom_status(self) -> int:
        """The C-FIND status of this error (an instance may refine its class's)."""
        return self.find_status


class InvalidQuery(QueryError):
    """The query identifier does not fit its information model (C-FIND 0xA900).

    Parameters
    ----------
    message
        What is wrong, short enough for an Error Comment (64 characters).
    tag
        The offending attribute, when one is to blame (Offending Element).
    """

    find_status = Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS

    def __init__(self, message: str, tag: int | None = None) -> None:
        self.tag = tag
        super().__init__(message)


class QueryRefused(QueryError):
    """A valid query that cannot be answered now (C-FIND 0xA700, out of resources).

    The catalogue cannot be read, or more entities match than the configured limit.
    """

    find_status = Status.OUT_OF_RESOURCES


class ReferenceNotUsable(QueryError):
    """A similarity query's reference cannot be used (C-FIND 0xC001 / 0xC002).

    Parameters
    ----------
    kind
        ``"unknown"`` (not in the archive, no such example image) or
        ``"not_embedded"`` (known, no vectors of the serving model yet).
    message
        What happened, short enough for an Error Comment.
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)

    @property
    def dicom_status(self) -> int:
        """Status.UNKNOWN_REFERENCE (0xC001) or Status.REFERENCE_NOT_EMBEDDED (0xC002)."""
        return Status.UNKNOWN_REFERENCE if self.kind == "unknown" else Status.REFERENCE_NOT_EMBEDDED


class SearchError(QueryError):
    """Base of the errors of a similarity query (of no known kind: C-FIND 0xA700, HTTP 500)."""

    find_status = Status.OUT_OF_RESOURCES


class BadQuery(SearchError):
    """The query's arguments are invalid (k, level, references, filters, images)."""

    find_status = Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    http_status = 400
    wire_kind = "bad_query"


class UnknownReference(SearchError):
    """The reference UID is not in the catalogue."""

    find_status = Status.UNKNOWN_REFERENCE
    http_status = 404
    wire_kind = "unknown_reference"


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

    find_status = Status.REFERENCE_NOT_EMBEDDED
    http_status = 409
    wire_kind = "not_embedded"

    def __init__(self, message: str, state: str, counts: dict[str, int]) -> None:
        self.state = state
        self.counts = counts
        super().__init__(message)


class IndexUnavailable(SearchError):
    """No index or embedding model can answer the query in this process."""

    find_status = Status.OUT_OF_RESOURCES
    store_status = Status.OUT_OF_RESOURCES
    http_status = 503
    wire_kind = "unavailable"


#: The search errors a wire kind names (inter-process), besides ``"error"``.
SEARCH_ERRORS: tuple[type[SearchError], ...] = (
    BadQuery, UnknownReference, NotEmbedded, IndexUnavailable,
)
