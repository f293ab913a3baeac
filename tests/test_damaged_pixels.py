"""Damaged compressed pixel data: a PreprocessError (the worker marks the instance failed
with it) and one line in the log, never a decoder's panic escaping or pydicom's traceback
for each decoding plugin (both found by the torture fuzz campaign, issue 19)."""

from __future__ import annotations

import logging
import struct

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from sidecar.embeddings.decode import PreprocessError, read_image
from sidecar.logsetup import quiet_decoder_plugin_failures


def _damaged_jpeg2000() -> Dataset:
    path = get_testdata_file("JPEG2000.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's test file JPEG2000.dcm is not installed")
    ds = dcmread(path)
    data = bytearray(ds.PixelData)
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x5A for b in data[mid:mid + 64])
    ds.PixelData = bytes(data)
    return ds


def test_decoder_plugin_failures_are_not_logged_as_tracebacks(
        caplog: pytest.LogCaptureFixture) -> None:
    ds = _damaged_jpeg2000()
    logger = logging.getLogger("pydicom.pixels.decoders.base")
    saved = list(logger.filters)
    try:
        for f in saved:
            logger.removeFilter(f)
        with caplog.at_level(logging.WARNING), pytest.raises(PreprocessError):
            read_image(ds)
        before = [r for r in caplog.records if r.exc_info is not None]
        assert before, "pydicom no longer logs plugin failures: the filter may go"
        caplog.clear()
        quiet_decoder_plugin_failures()
        quiet_decoder_plugin_failures()  # idempotent
        with caplog.at_level(logging.WARNING), pytest.raises(PreprocessError) as err:
            read_image(ds)
        assert not [r for r in caplog.records if r.exc_info is not None]
        assert "cannot decode JPEG 2000" in str(err.value)  # the one message kept
    finally:
        for f in list(logger.filters):
            logger.removeFilter(f)
        for f in saved:
            logger.addFilter(f)


def make_rle_that_panics(ds: Dataset) -> Dataset:
    """``ds`` (pixels replaced) as 64×64 16-bit RLE whose two segments each decode to
    33 × 128 bytes, one run more than a 4,096-byte segment holds: pylibjpeg-rle panics
    (index out of bounds) instead of raising."""
    segment = bytes([0x81, 0x07]) * 33  # each pair: 0x07 repeated 128 times
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    if "file_meta" not in ds:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def test_a_decoder_panic_is_a_preprocess_error() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    make_rle_that_panics(ds)
    with pytest.raises(PreprocessError, match="cannot decode RLE Lossless pixel data"):
        read_image(ds)
