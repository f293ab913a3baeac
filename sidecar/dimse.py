"""Named DIMSE statuses: the only place status numbers appear.

References: DICOM PS3.4 Annex B.2.3 (Storage), C.4.1.1.4 (C-FIND), PS3.7 Annex C
(general codes).
pynetdicom's own applications use 0xC210/0xC211 for "cannot decode" and
"unhandled exception"; we keep those meanings. The bottom layer, so that the
domain errors (``sidecar.errors``) name the status they are answered with.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """DIMSE status codes returned by this node."""

    SUCCESS = 0x0000
    # Failure: refused, out of resources (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700
    # Failure: data set does not match SOP class (PS3.4 B.2.3)
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Failure: cannot understand (PS3.4 B.2.3, 0xC000-0xCFFF)
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_DECODE_DATASET = 0xC210
    UNHANDLED_EXCEPTION = 0xC211
    # General failures (PS3.7 C)
    PROCESSING_FAILURE = 0x0110
    INVALID_SOP_INSTANCE = 0x0117
    # Failure, refused: the instance was rejected by an IOCM rejection note (the code
    # dcm4chee answers, "Subsequent occurrence of rejected object")
    SUBSEQUENT_OCCURRENCE_OF_REJECTED = 0xA770
    # Refused: not authorised (PS3.7 C.5): the peer lacks the permission (allowed_peers)
    NOT_AUTHORIZED = 0x0124

    # C-FIND (PS3.4 C.4.1.1.4). Same numbers as above, C-FIND meanings:
    # 0xA700 refused, out of resources (catalogue unavailable, too many matches);
    # 0xA900 identifier does not match SOP class (bad level, missing unique key);
    # 0xC000-0xCFFF unable to process.
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000
    # Similarity C-FIND, unable to process (docs/conformance.md): the reference
    # is not in the archive (nor an example image); the reference is known but
    # has no vectors of the serving model yet (pending, failed or skipped).
    UNKNOWN_REFERENCE = 0xC001
    REFERENCE_NOT_EMBEDDED = 0xC002
    # Cancel: matching terminated by a C-CANCEL request
    CANCEL = 0xFE00
    # Pending: a match follows; with a warning when an optional key was not supported
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
