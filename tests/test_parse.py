"""Header parsing and the checks that decide whether a dataset is stored."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from sidecar.archive.parse import IMAGE_SOP_CLASSES, extract_meta, is_valid_uid, read_header
from sidecar.db.repository import InstanceMeta
from sidecar.errors import InvalidDataset
from tests.conftest import CT_IMAGE_STORAGE, make_ct, make_sr, part10

EVRLE = str(ExplicitVRLittleEndian)
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Validation warnings from pydicom about the deliberately broken values below.
ignore_pydicom_warnings = pytest.mark.filterwarnings("ignore::UserWarning")


def parse(ds: Dataset, **expected: str) -> InstanceMeta:
    return extract_meta(read_header(part10(ds)), EVRLE, **expected)


def kind_of(ds: Dataset, **expected: str) -> str:
    with pytest.raises(InvalidDataset) as info:
        parse(ds, **expected)
    return info.value.kind




# ---------------------------------------------------------------- happy path
def test_read_header_defers_the_pixel_data() -> None:
    ds = make_ct(rows=64, cols=64)
    header = read_header(part10(ds))
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    assert header.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    raw = header.get_item(0x7FE00010, keep_deferred=True)
    assert raw.length == 64 * 64 * 2
    assert raw.value is None  # deferred: not copied out of the buffer


def test_extract_meta_reads_every_catalogue_attribute() -> None:
    ds = make_ct(instance_number=7, rows=32, cols=48, patient_id="P-1", patient_name="Doe^Jane")
    ds.IssuerOfPatientID = "HOSP"
    ds.ReferringPhysicianName = "Ref^Doc"
    meta = parse(ds)
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta == InstanceMeta(
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=CT_IMAGE_STORAGE,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        transfer_syntax_uid=EVRLE,
        patient_id="P-1",
        issuer_of_patient_id="HOSP",
        patient_name="Doe^Jane",
        patient_birth_date="19700101",
        patient_sex="O",
        study_date="20240131",
        study_time="101010",
        accession_number="ACC001",
        study_id="1",
        study_description="CT HEAD",
        referring_physician_name="Ref^Doc",
        modality="CT",
        series_number=2,
        series_description="AXIAL",
        body_part_examined="HEAD",
        instance_number=7,
        number_of_frames=1,
        rows=32,
        columns=48,
        embeddable=True,
        skip_reason="",
    )


def test_transfer_syntax_is_the_one_given() -> None:
    ds = make_ct()
    meta = extract_meta(read_header(part10(ds)), str(ImplicitVRLittleEndian))
    assert meta.transfer_syntax_uid == str(ImplicitVRLittleEndian)


def test_optional_attributes_may_be_absent() -> None:
    ds = make_ct()
    for kw in ("PatientID", "StudyDate", "AccessionNumber", "SeriesNumber", "InstanceNumber",
               "BodyPartExamined", "Modality"):
        delattr(ds, kw)
    meta = parse(ds)
    assert meta.patient_id == ""
    assert meta.series_number is None
    assert meta.instance_number is None
    assert meta.modality == ""
    assert meta.embeddable


def test_long_text_is_truncated_to_the_column_size() -> None:
    ds = make_ct()
    ds.StudyDescription = "X" * 64
    ds.AccessionNumber = "A" * 16
    meta = parse(ds)
    assert meta.study_description == "X" * 64
    assert meta.accession_number == "A" * 16


# ------------------------------------------------------------ missing UIDs
@pytest.mark.parametrize("keyword", UID_KEYWORDS)
def test_missing_uid(keyword: str) -> None:
    ds = make_ct()
    delattr(ds, keyword)
    with pytest.raises(InvalidDataset, match=keyword) as info:
        parse(ds)
    assert info.value.kind == "missing"


@pytest.mark.parametrize("keyword", UID_KEYWORDS)
def test_empty_uid(keyword: str) -> None:
    ds = make_ct()
    setattr(ds, keyword, "")
    assert kind_of(ds) == "missing"


# ------------------------------------------------------------ invalid UIDs
BAD_UIDS = [
    "1.2/3",
    "../../../etc/passwd",
    "1.2.840..1",
    ".1.2",
    "1.2.",
    "1.2.abc",
    "1.2.3e4",
    "1.2 .3",
    "/1.2.3",
    "1." + "2" * 63,  # 65 characters
]


@ignore_pydicom_warnings
@pytest.mark.parametrize("keyword", UID_KEYWORDS)
@pytest.mark.parametrize("bad", BAD_UIDS)
def test_invalid_uid(keyword: str, bad: str) -> None:
    ds = make_ct()
    setattr(ds, keyword, bad)
    assert kind_of(ds) == "invalid_uid"


def test_is_valid_uid() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert is_valid_uid("1.2.03")  # leading zeros happen in the field
    assert is_valid_uid("7")
    assert is_valid_uid("1." + "2" * 62)  # exactly 64
    for bad in BAD_UIDS + ["", "..", "1\\2", "1.2\n.3", "１.２"]:
        assert not is_valid_uid(bad), bad


def test_is_valid_uid_rejects_a_trailing_newline() -> None:
    assert not is_valid_uid("1.2.3\n")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "data", [b"\x00" * 128 + b"DICM", b"\x00" * 128 + b"DICM" + b"\xff" * 64]
)
def test_empty_or_broken_part10_body_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidDataset) as info:
        extract_meta(read_header(data), EVRLE)
    assert info.value.kind in ("unparseable", "missing")


def test_uid_with_trailing_padding_is_accepted() -> None:
    ds = make_ct()
    meta = extract_meta(read_header(part10(ds)), EVRLE)
    assert meta.sop_class_uid == CT_IMAGE_STORAGE  # pydicom strips the NUL pad of UI


# ---------------------------------------------------------------- mismatch
def test_sop_class_mismatch() -> None:
    ds = make_ct()
    assert kind_of(ds, expected_sop_class_uid=MR_IMAGE_STORAGE) == "mismatch"


def test_sop_instance_mismatch() -> None:
    ds = make_ct()
    assert kind_of(ds, expected_sop_instance_uid=generate_uid()) == "mismatch"


def test_matching_expected_values_pass() -> None:
    ds = make_ct()
    meta = parse(
        ds,
        expected_sop_class_uid=CT_IMAGE_STORAGE + " ",
        expected_sop_instance_uid=ds.SOPInstanceUID + " ",
    )
    assert meta.sop_instance_uid == ds.SOPInstanceUID


# ------------------------------------------------------------- unparseable
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is not DICOM at all",
        b"\x00" * 128 + b"XXXX" + b"\x02\x00\x10\x00UI\x14\x00",
        bytes(range(256)) * 4,
    ],
)
def test_garbage_is_unparseable(data: bytes) -> None:
    with pytest.raises(InvalidDataset) as info:
        read_header(data)
    assert info.value.kind == "unparseable"


# -------------------------------------------------------- pixel data length
@pytest.mark.parametrize("length", [0, 2, 100, 64 * 64 * 2 - 2, 4000])
def test_native_pixel_data_shorter_than_the_image(length: int) -> None:
    ds = make_ct(rows=64, cols=64)
    ds.PixelData = b"\x01" * length
    with pytest.raises(InvalidDataset, match=f"Pixel Data is {length} bytes") as info:
        parse(ds)
    assert info.value.kind == "mismatch"


def test_native_pixel_data_multiframe_needs_every_frame() -> None:
    ds = make_ct(rows=16, cols=16)
    ds.NumberOfFrames = 3
    ds.PixelData = b"\x00" * (16 * 16 * 2 * 2)  # two frames only
    assert kind_of(ds) == "mismatch"
    ds.PixelData = b"\x00" * (16 * 16 * 2 * 3)
    meta = parse(ds)
    assert meta.number_of_frames == 3


def test_native_pixel_data_colour_needs_every_sample() -> None:
    ds = make_ct(rows=8, cols=8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = b"\x00" * (8 * 8)  # one sample per pixel
    assert kind_of(ds) == "mismatch"
    ds.PixelData = b"\x00" * (8 * 8 * 3)
    assert parse(ds).embeddable


def test_pixel_data_without_rows_is_a_mismatch() -> None:
    ds = make_ct()
    del ds.Rows
    assert kind_of(ds) == "mismatch"


def test_exact_and_longer_native_pixel_data_pass() -> None:
    ds = make_ct(rows=10, cols=10)
    assert parse(ds).rows == 10
    ds.PixelData = b"\x00" * (10 * 10 * 2 + 2)  # trailing padding is allowed
    assert parse(ds).embeddable


def test_encapsulated_pixel_data_is_not_length_checked() -> None:
    from pydicom.encaps import encapsulate

    ds = make_ct(rows=64, cols=64)
    ds.PixelData = encapsulate([b"\xff\xd8 tiny jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta = extract_meta(read_header(part10(ds)), str(JPEGBaseline8Bit))
    assert meta.embeddable


@pytest.mark.parametrize("missing", [2, 100, 8000])
def test_truncated_pixel_data_is_refused(missing: int) -> None:
    data = part10(make_ct(rows=64, cols=64))
    with pytest.raises(InvalidDataset) as info:
        extract_meta(read_header(data[:-missing]), EVRLE)
    assert info.value.kind in ("mismatch", "unparseable")


# ---------------------------------------------------------- image classes
def test_image_sop_classes() -> None:
    assert CT_IMAGE_STORAGE in IMAGE_SOP_CLASSES
    assert MR_IMAGE_STORAGE in IMAGE_SOP_CLASSES
    assert "1.2.840.10008.5.1.4.1.1.2.1" in IMAGE_SOP_CLASSES  # Enhanced CT
    assert "1.2.840.10008.5.1.4.1.1.1.1" in IMAGE_SOP_CLASSES  # DX for presentation
    assert "1.2.840.10008.5.1.4.1.1.7" in IMAGE_SOP_CLASSES  # Secondary Capture
    not_images = {
        "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
        "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
        "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
        "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
        "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
        "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
        "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
        "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
        "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic",
    }
    for uid, name in not_images.items():
        assert uid not in IMAGE_SOP_CLASSES, name


def test_image_class_without_pixel_data_is_not_embeddable() -> None:
    ds = make_ct()
    del ds.PixelData
    meta = parse(ds)
    assert not meta.embeddable
    assert meta.skip_reason == "no pixel data"


def test_non_image_class_is_not_embeddable() -> None:
    ds = make_sr()
    meta = parse(ds)
    assert meta.sop_class_uid == BASIC_TEXT_SR
    assert not meta.embeddable
    assert meta.skip_reason == "non-image SOP class"
    assert meta.rows is None


def test_non_image_class_with_pixel_data_is_still_not_embeddable() -> None:
    ds = make_sr()
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 8
    ds.PixelData = np.zeros(16, dtype=np.uint8).tobytes()
    assert not parse(ds).embeddable
