"""Logging set-up: a damaged compressed file is one line in the log, not pydicom's traceback
for each decoding plugin (found by the torture fuzz campaign, issue 19)."""

from __future__ import annotations

import logging

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

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
