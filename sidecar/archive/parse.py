"""Parse and check the header of a received dataset, without decoding pixels.

Everything the catalogue needs comes from the header; the pixel data is
deferred (never copied or decoded here), so this is cheap enough for the
network thread.
"""

from __future__ import annotations

import re
from io import BytesIO

import pydicom.uid
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from sidecar.db.repository import InstanceMeta
from sidecar.errors import InvalidDataset

# A UID is digits and dots, at most 64 characters (PS3.5 9.1). We accept
# components with leading zeros (common in the field) but nothing else:
# these strings become directory and file names.
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")

# DICOS (security screening) and DICONDE (non-destructive evaluation) image
# classes: not among the storage classes the node accepts (pynetdicom's).
_NOT_MEDICAL = ("1.2.840.10008.5.1.4.1.1.501.", "1.2.840.10008.5.1.4.1.1.601.")

#: SOP classes whose pixels we embed: image storage classes, without video.
IMAGE_SOP_CLASSES: frozenset[str] = frozenset(
    str(uid)
    for name, uid in vars(pydicom.uid).items()
    if isinstance(uid, UID) and not name.startswith("_")
    if name.endswith("ImageStorage") or "ImageStorageFor" in name
    if not name.startswith("Video") and not uid.startswith(_NOT_MEDICAL)
)

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float Pixel Data


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid UID that is safe as a file name."""
    return 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - a malformed optional value is not fatal
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except Exception:  # noqa: BLE001 - malformed IS/US in an optional attribute
        return None


def _check_not_truncated(ds: Dataset, size: int) -> None:
    """Refuse a dataset whose (not yet converted) value runs past the end of the data.

    Offsets of a deflated dataset are in the inflated stream, which zlib has
    already checked, so it is skipped here.
    """
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            continue
        if tell + length > size:
            if tag in _PIXEL_TAGS:
                raise InvalidDataset(
                    "mismatch", f"Pixel Data is truncated: {size - tell} of {length} bytes present"
                )
            raise InvalidDataset(
                "unparseable", f"dataset truncated in {tag}: {size - tell} of {length} bytes"
            )


def read_header(data: bytes) -> Dataset:
    """Parse a Part-10 byte string, deferring every large value.

    Raises
    ------
    InvalidDataset
        ``kind="unparseable"`` when pydicom cannot read it.
    """
    try:
        # Reading walks every element's tag and length (so a truncated or
        # structurally broken dataset fails here); values are converted lazily
        # and only the few we need ever are.
        ds = dcmread(BytesIO(data), defer_size=1024)
        _check_not_truncated(ds, len(data))
    except InvalidDataset:
        raise
    except InvalidDicomError as exc:
        raise InvalidDataset("unparseable", f"not a DICOM dataset: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad input
        raise InvalidDataset("unparseable", f"cannot parse dataset: {exc}") from exc
    return ds


def _is_encapsulated(transfer_syntax_uid: str) -> bool:
    try:
        return bool(UID(transfer_syntax_uid).is_compressed)
    except Exception:  # noqa: BLE001 - unknown transfer syntax: do not judge
        return True


def _check_native_pixel_length(ds: Dataset, frames: int) -> None:
    """Refuse native Pixel Data shorter than Rows x Columns x frames needs."""
    if 0x7FE00010 not in ds:
        return
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits, spp = _int(ds, "BitsAllocated"), _int(ds, "SamplesPerPixel") or 1
    if not rows or not cols or not bits:
        raise InvalidDataset("mismatch", "Pixel Data without Rows, Columns or BitsAllocated")
    expected = (rows * cols * frames * spp * bits + 7) // 8
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    length = getattr(raw, "length", None)
    if length is None:  # already converted: measure the value
        length = len(getattr(raw, "value", b"") or b"")
    if 0 <= length < expected and length != 0xFFFFFFFF:
        raise InvalidDataset(
            "mismatch", f"Pixel Data is {length} bytes, image needs {expected}"
        )


def extract_meta(
    ds: Dataset,
    transfer_syntax_uid: str,
    *,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> InstanceMeta:
    """Check the identifying attributes and build the catalogue record.

    Parameters
    ----------
    ds
        The parsed dataset (pixels deferred).
    transfer_syntax_uid
        The transfer syntax the bytes are encoded in.
    expected_sop_class_uid, expected_sop_instance_uid
        Affected SOP Class/Instance UID of the C-STORE request, when there is one.

    Raises
    ------
    InvalidDataset
        ``missing`` (a required UID is absent or empty), ``invalid_uid``
        (a UID is not digits and dots), ``mismatch`` (the dataset disagrees
        with the request).
    """
    uids: dict[str, str] = {}
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(ds, kw, limit=1024).rstrip("\x00 ")
        if not value:
            raise InvalidDataset("missing", f"{kw} is missing or empty")
        if not is_valid_uid(value):
            raise InvalidDataset("invalid_uid", f"{kw} is not a valid UID")
        uids[kw] = value
    if expected_sop_class_uid and uids["SOPClassUID"] != expected_sop_class_uid.strip():
        raise InvalidDataset("mismatch", "SOPClassUID differs from Affected SOP Class UID")
    if expected_sop_instance_uid and uids["SOPInstanceUID"] != expected_sop_instance_uid.strip():
        raise InvalidDataset("mismatch", "SOPInstanceUID differs from Affected SOP Instance UID")

    has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
    sop_class = uids["SOPClassUID"]
    embeddable = sop_class in IMAGE_SOP_CLASSES and has_pixels
    skip_reason = ""
    if not embeddable:
        if sop_class not in IMAGE_SOP_CLASSES:
            skip_reason = "non-image SOP class"
        else:
            skip_reason = "no pixel data"

    frames = _int(ds, "NumberOfFrames") or 1
    if has_pixels and not _is_encapsulated(transfer_syntax_uid):
        _check_native_pixel_length(ds, frames)
    return InstanceMeta(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=sop_class,
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName", 324),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_id=_text(ds, "StudyID", 16),
        study_description=_text(ds, "StudyDescription"),
        referring_physician_name=_text(ds, "ReferringPhysicianName", 324),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined", 16),
        instance_number=_int(ds, "InstanceNumber"),
        number_of_frames=max(frames, 1),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        embeddable=embeddable,
        skip_reason=skip_reason,
    )
