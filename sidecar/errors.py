"""Domain errors of pacs-sidecar.

Code inside the package raises these; they are translated only at the edges
(a DIMSE handler turns them into a status, the CLI into a message and an exit
code).
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base class of every error this package raises on purpose."""


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


class QueryError(SidecarError):
    """A query (C-FIND, search) that cannot be answered; the message is for the requester.

    A C-FIND handler answers subclasses it does not know with 0xC000 (unable
    to process) and the message as Error Comment.
    """


class InvalidQuery(QueryError):
    """The query identifier does not fit its information model (C-FIND 0xA900).

    Parameters
    ----------
    message
        What is wrong, short enough for an Error Comment (64 characters).
    tag
        The offending attribute, when one is to blame (Offending Element).
    """

    def __init__(self, message: str, tag: int | None = None) -> None:
        self.tag = tag
        super().__init__(message)


class QueryRefused(QueryError):
    """A valid query that cannot be answered now (C-FIND 0xA700, out of resources).

    The catalogue cannot be read, or more entities match than the configured limit.
    """


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
