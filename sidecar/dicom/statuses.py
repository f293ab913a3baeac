"""DIMSE statuses for the DICOM adapter: the named codes (sidecar.dimse) and Error Comments."""

from __future__ import annotations

from sidecar.dimse import Status as Status  # the DICOM adapter's name for it


def error_comment(text: str) -> str:
    """An Error Comment (VR LO): at most 64 characters, no backslash."""
    clean = text.replace("\\", "/").replace("\n", " ").strip()
    return clean if len(clean) <= 64 else clean[:61] + "..."
