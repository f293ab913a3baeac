"""Named DIMSE statuses: the only place status numbers appear.

References: DICOM PS3.4 Annex B.2.3 (Storage), PS3.7 Annex C (general codes).
pynetdicom's own applications use 0xC210/0xC211 for "cannot decode" and
"unhandled exception"; we keep those meanings.
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


def error_comment(text: str) -> str:
    """An Error Comment (VR LO): at most 64 characters, no backslash."""
    clean = text.replace("\\", "/").replace("\n", " ").strip()
    return clean if len(clean) <= 64 else clean[:61] + "..."
