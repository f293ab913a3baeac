"""Slice pre-processing: decoding, windowing, fitting and slice sampling.

Synthetic images are built in code with known values; real files come from
../shared/data (skipped when absent) and pydicom's bundled test files.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import MPEG2MPML, JPEG2000Lossless

from sidecar.config import EmbeddingConfig, PreprocessConfig, WindowPreset
from sidecar.embeddings.decode import FrameMeta, MissingCodecError, PreprocessError, read_image
from sidecar.embeddings.pixels import fit, window
from sidecar.embeddings.preprocess import FrameInfo, frame_infos, prepare, sample
from sidecar.errors import SidecarError
from sidecar.training.npz import image_dataset, round_trip
from tests.conftest import make_ct

# The tests were calibrated at 1.5 mm; the shipped default (2.5 mm) is checked separately.
CFG = PreprocessConfig(pixel_spacing_mm=1.5)


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> Iterator[None]:
    # Some real test files carry invalid values that pydicom warns about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _image(
    arr: np.ndarray[Any, Any],
    *,
    modality: str = "MR",
    photometric: str = "MONOCHROME2",
    spacing: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
) -> Dataset:
    """A dataset holding ``arr`` (uint16 grey or uint8 RGB) in Explicit VR LE."""
    rows, cols = arr.shape[:2]
    ds = make_ct(rows=rows, cols=cols)
    ds.Modality = modality
    ds.PhotometricInterpretation = photometric
    for kw in ("PixelSpacing", "RescaleSlope", "RescaleIntercept"):
        del ds[kw]
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if arr.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    else:
        ds.PixelData = np.ascontiguousarray(arr, dtype=np.uint16).tobytes()
    return ds


def _meta(modality: str = "MR", **kw: Any) -> FrameMeta:
    args: dict[str, Any] = {
        "modality": modality,
        "modality_units": False,
        "invert": False,
        "file_window": None,
        "position_mm": None,
    }
    args.update(kw)
    return FrameMeta(**args)


def _disc(n: int, spacing: float, radius_mm: float, center_mm: tuple[float, float] = (0, 0)):
    """An n×n image (value 1000 inside a disc, 0 outside), centre offset in mm (row, col)."""
    yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2.0) * spacing
    inside = (yy - center_mm[0]) ** 2 + (xx - center_mm[1]) ** 2 <= radius_mm**2
    return np.where(inside, 1000, 0).astype(np.uint16)


def _bbox(mask: np.ndarray[Any, Any]) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


# ----------------------------------------------------------------------- real files


def _ct_files(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "dicom" / "dcm_qa_ct" / "In" / "GE").glob("*.dcm"))
    assert len(files) == 28
    return files


def test_nine_transfer_syntaxes_give_identical_output(shared_data: Path) -> None:
    files = sorted((shared_data / "dicom" / "dcm_qa_ts" / "In").glob("*.dcm"))
    assert len(files) == 9
    datasets = [pydicom.dcmread(f) for f in files]
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}
    assert len(syntaxes) == 7  # two JPEG lossless and two JPEG-LS variants
    outputs = [prepare(ds, CFG, 128) for ds in datasets]
    assert outputs[0].shape == (1, 128, 128)
    assert outputs[0].dtype == np.float32
    assert 0.0 <= outputs[0].min() and outputs[0].max() <= 1.0
    assert outputs[0].std() > 0.1  # a real image, not a blank
    for f, out in zip(files, outputs, strict=True):
        assert np.array_equal(out, outputs[0]), f.name


def test_ct_soft_tissue_window_values(shared_data: Path) -> None:
    ds = pydicom.dcmread(_ct_files(shared_data)[14])  # mid-brain slice
    image = read_image(ds)
    hu, pad, meta = image.frames[0], image.padding, image.meta[0]
    assert pad is not None  # GE marks the outside of the reconstruction circle (-1500)
    assert meta.modality == "CT" and meta.modality_units and not meta.invert
    out = window(hu, meta, CFG, pad[0])
    assert out.dtype == np.float32 and out.shape == (512, 512)
    # Soft tissue: center 40, width 400 -> [-160, 240] HU onto [0, 1].
    assert np.all(out[pad[0]] == 0)
    assert np.all(out[hu < -160] == 0)  # air around the head
    assert np.all(out[hu > 240] == 1)  # bone
    tissue = (hu > -160) & (hu < 240)
    np.testing.assert_allclose(out[tissue], (hu[tissue] + 160) / 400, atol=1e-6)
    # Brain parenchyma (about 20-35 HU here) in the middle of the head.
    middle = out[200:312, 200:312]
    assert 0.44 < float(np.median(middle)) < 0.50
    assert float(out[256, 256]) == pytest.approx((float(hu[256, 256]) + 160) / 400, abs=1e-6)
    # Saturation: air + outside the FOV ~55 %, skull ~6 %.
    assert 0.45 < float((out == 0).mean()) < 0.65
    assert 0.02 < float((out == 1).mean()) < 0.12


def test_ct_brain_window_and_file_window(shared_data: Path) -> None:
    ds = pydicom.dcmread(_ct_files(shared_data)[14])
    image = read_image(ds)
    hu, pad, meta = image.frames[0], image.padding, image.meta[0]
    assert pad is not None
    brain_cfg = PreprocessConfig(modality_window={"CT": "brain"})
    brain = window(hu, meta, brain_cfg, pad[0])  # center 40, width 80 -> [0, 80] HU
    soft = window(hu, meta, CFG, pad[0])
    middle = brain[200:312, 200:312]
    assert 0.25 < float(np.median(middle)) < 0.45  # parenchyma ~26 HU / 80
    assert np.all(brain[hu >= 80] == 1) and np.all(brain[hu <= 0] == 0)
    # The narrower window saturates more and spreads grey/white matter further.
    assert (brain == 1).mean() > (soft == 1).mean()
    assert np.std(middle) > 2 * np.std(soft[200:312, 200:312])
    # The file's own window (35/85 on this slice) only when configured.
    assert meta.file_window == (35.0, 85.0)
    assert np.array_equal(window(hu, meta, CFG, pad[0]), soft)
    filed = window(hu, meta, PreprocessConfig(use_file_window=True), pad[0])
    tissue = (hu > -7.5) & (hu < 77.5)
    np.testing.assert_allclose(filed[tissue], (hu[tissue] + 7.5) / 85, atol=1e-6)


def test_ct_fit_keeps_head_centred_and_aspect(shared_data: Path) -> None:
    ds = pydicom.dcmread(_ct_files(shared_data)[14])
    image = read_image(ds)
    assert image.spacing == pytest.approx((0.4882812, 0.4882812))
    pad = image.padding[0] if image.padding is not None else None
    native = window(image.frames[0], image.meta[0], CFG, pad)
    # 224 px at 1.5 mm = 336 mm holds the whole 250 mm field of view: nothing cropped.
    out = prepare(ds, CFG, 224)[0]
    assert np.array_equal(out, fit(native, image.spacing, CFG, 224))
    r0, r1, c0, c1 = _bbox(native > 0.25)  # skin, bone and brain; not air, not the holder
    o0, o1, oc0, oc1 = _bbox(out > 0.25)
    s_in, s_out = 0.4882812, 1.5
    # Same physical size (within an output pixel or so each way) ...
    assert (o1 - o0) * s_out == pytest.approx((r1 - r0) * s_in, abs=2 * s_out)
    assert (oc1 - oc0) * s_out == pytest.approx((c1 - c0) * s_in, abs=2 * s_out)
    # ... hence the same aspect ratio ...
    assert (o1 - o0) / (oc1 - oc0) == pytest.approx((r1 - r0) / (c1 - c0), rel=0.03)
    # ... and the same offset from the image centre: the head stays where it was.
    native_centre = np.array([(r0 + r1) / 2 - 255.5, (c0 + c1) / 2 - 255.5]) * s_in
    out_centre = np.array([(o0 + o1) / 2 - 111.5, (oc0 + oc1) / 2 - 111.5]) * s_out
    np.testing.assert_allclose(out_centre, native_centre, atol=1.5 * s_out)
    assert np.all(np.abs(out_centre) < 0.1 * 224 * s_out)  # roughly centred
    # The margins beyond the field of view are black padding.
    assert out[:20].max() == 0 and out[-20:].max() == 0


def test_shipped_defaults_keep_the_whole_head(shared_data: Path) -> None:
    """Default input size and spacing (128 px x 2.5 mm = 320 mm) crop no part of a head."""
    cfg, size = PreprocessConfig(), EmbeddingConfig().input_size
    for path in _ct_files(shared_data)[::5]:
        out = prepare(pydicom.dcmread(path), cfg, size)[0]
        r0, r1, c0, c1 = _bbox(out > 0.25)
        assert r0 > 0 and c0 > 0 and r1 < size - 1 and c1 < size - 1, path.name
        # The head spans a sensible part of the input (about 160-220 mm of 320).
        assert 0.4 < (r1 - r0) / size < 0.8


def test_ct_series_sampling_with_tilt_and_variable_spacing(shared_data: Path) -> None:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in _ct_files(shared_data)]
    infos = [info for ds in headers for info in frame_infos(ds, str(ds.SOPInstanceUID))]
    assert [i.order for i in infos] == [(n, 0) for n in range(1, 29)]
    positions = [i.position_mm for i in infos]
    assert all(p is not None for p in positions)
    gaps = np.diff(np.array(positions, dtype=float))
    # Gantry tilt 18.5 deg: table steps of 4.22 mm are 4.0 mm along the slice normal.
    z = [float(ds.ImagePositionPatient[2]) for ds in headers]
    assert z[1] - z[0] == pytest.approx(4.22, abs=0.01)
    np.testing.assert_allclose(gaps[:13], 4.0, atol=0.01)
    np.testing.assert_allclose(gaps[14:], 7.0, atol=0.01)
    assert gaps[13] == pytest.approx(1.08, abs=0.01)  # the odd step between the two parts

    uid_pos = {i.key: i.position_mm for i in infos}
    chosen = sample(list(reversed(infos)), CFG)  # input order does not matter
    assert chosen == sample(infos, CFG)
    chosen_pos = [uid_pos[k] for k in chosen]
    assert chosen_pos == sorted(chosen_pos)
    assert chosen[0] == infos[0].key and chosen[-1] == infos[-1].key
    assert 20 <= len(chosen) < 28  # skips some 4 mm slices, keeps every 7 mm one
    assert {i.key for i in infos[14:]} <= set(chosen)
    steps = np.diff(np.array(chosen_pos, dtype=float))
    assert steps.min() > 3.9 and steps.max() < 8.1

    assert len(sample(infos, PreprocessConfig(slice_spacing_mm=0))) == 28
    eight = sample(infos, PreprocessConfig(max_slices_per_series=8))
    assert len(eight) == 8 and eight[0] == infos[0].key and eight[-1] == infos[-1].key
    eight_steps = np.diff(np.array([uid_pos[k] for k in eight], dtype=float))
    assert np.all(np.abs(eight_steps - 144.09 / 7) < 7.0)


def test_enhanced_multiframe_ct_frames_and_codecs(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "dicomParser-testImages" / "encapsulated" / "multi-frame"
    reference = pydicom.dcmread(folder / "CT0012.explicit_little_endian.dcm")
    image = read_image(reference)
    assert image.frames.shape == (2, 512, 512) and image.indices == (0, 1)
    # Per-frame functional groups: rescale (-1024) from the shared group, spacing,
    # the frame VOI window and per-frame positions.
    assert image.meta[0].modality_units
    assert float(image.frames.min()) >= -1024
    assert image.spacing == pytest.approx((0.388672, 0.388672))
    assert image.meta[0].file_window == (49.0, 102.0)
    infos = frame_infos(reference, "ct0012")
    assert [i.position_mm for i in infos] == [159.0, 149.0]  # normal (0, 0, -1)
    assert [i.key for i in infos] == [("ct0012", 0), ("ct0012", 1)]
    assert sample(infos, PreprocessConfig(slice_spacing_mm=0)) == [("ct0012", 1), ("ct0012", 0)]
    out = prepare(reference, CFG, 64)
    assert out.shape == (2, 64, 64) and not np.array_equal(out[0], out[1])
    assert np.array_equal(prepare(reference, CFG, 64, frames=[1])[0], out[1])
    for name in (
        "CT0012.fragmented_no_bot_jpeg_lossless.57.dcm",
        "CT0012.fragmented_no_bot_jpeg_ls.80.dcm",
        "CT0012.not_fragmented_bot_rle.dcm",
    ):
        assert np.array_equal(prepare(pydicom.dcmread(folder / name), CFG, 64), out), name


def test_multiframe_colour_ultrasound(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "dicomParser-testImages" / "encapsulated" / "multi-frame"
    rgb = pydicom.dcmread(folder / "IM00001.implicit_little_endian.dcm")
    ybr_jpeg = pydicom.dcmread(folder / "IM00001.fragmented_no_bot_jpeg_baseline.50.dcm")
    assert rgb.PhotometricInterpretation == "RGB" and int(rgb.NumberOfFrames) == 8
    a, b = prepare(rgb, CFG, 96), prepare(ybr_jpeg, CFG, 96)
    assert a.shape == b.shape == (8, 96, 96)
    assert float(np.abs(a - b).mean()) < 0.01  # lossy JPEG (YCbCr) vs the RGB original
    # Frames without positions are sampled in frame order.
    infos = frame_infos(rgb, "us")
    assert all(i.position_mm is None for i in infos)
    keys = sample(infos, PreprocessConfig(max_slices_per_series=3))
    assert keys == [("us", 0), ("us", 3), ("us", 7)]  # 3.5 is a tie: the lower one


# ----------------------------------------------------------------------- synthetic images


def test_rescale_slope_intercept_applied() -> None:
    arr = np.full((8, 8), 1064, dtype=np.uint16)  # stored 1064
    arr[0, 0] = 0
    ds = _image(arr, modality="CT", rescale=(2.0, -2088.0))
    image = read_image(ds)
    assert image.meta[0].modality_units
    assert image.frames[0, 1, 1] == pytest.approx(40.0)  # 1064 * 2 - 2088 HU
    assert image.frames[0, 0, 0] == pytest.approx(-2088.0)
    out = window(image.frames[0], image.meta[0], CFG)
    assert out[1, 1] == pytest.approx(0.5)  # 40 HU is the centre of soft tissue
    assert out[0, 0] == 0.0
    # Without rescale the values are not HU: the CT preset does not apply.
    plain = read_image(_image(arr, modality="CT"))
    assert not plain.meta[0].modality_units
    assert plain.frames[0, 1, 1] == 1064.0


def test_make_ct_fixture_in_hounsfield_units() -> None:
    ds = make_ct(rows=16, cols=16, seed=3)
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(16, 16)
    image = read_image(ds)
    np.testing.assert_array_equal(image.frames[0], stored.astype(np.float32) - 1024)
    assert image.spacing == (0.5, 0.5)
    assert image.meta[0].position_mm == 1.0


def test_padding_value_excluded_and_black() -> None:
    arr = np.tile(np.arange(100, 164, dtype=np.uint16), (64, 1))
    arr[:, :8] = 0
    ds = _image(arr)
    ds.PixelPaddingValue = 0
    image = read_image(ds)
    assert image.padding is not None and int(image.padding.sum()) == 64 * 8
    out = window(image.frames[0], image.meta[0], CFG, image.padding[0])
    assert np.all(out[:, :8] == 0)
    assert out[:, 8:].min() == 0.0 and out[:, 8:].max() == 1.0  # stats ignore the padding
    assert out[0, 8:].mean() == pytest.approx(0.5, abs=0.02)


def test_percentile_scaling_for_mr() -> None:
    rng = np.random.default_rng(1)
    frame = rng.permutation(np.arange(10000, dtype=np.float32)).reshape(100, 100)
    frame[0, 0], frame[0, 1] = -1e6, 1e6  # outliers do not stretch the scale
    cfg = PreprocessConfig(percentile_low=1, percentile_high=99)
    out = window(frame, _meta("MR"), cfg)
    lo, hi = np.percentile(frame, [1, 99])
    assert out.dtype == np.float32
    assert out[0, 0] == 0.0 and out[0, 1] == 1.0
    mid = frame == 5000
    assert float(out[mid][0]) == pytest.approx((5000 - lo) / (hi - lo), abs=1e-6)
    assert (out == 0).mean() == pytest.approx(0.01, abs=0.002)
    assert (out == 1).mean() == pytest.approx(0.01, abs=0.002)
    # The CT preset is not used for MR, nor a file window unless configured.
    meta = _meta("MR", file_window=(100.0, 10.0))
    assert np.array_equal(window(frame, meta, cfg), out)
    filed = window(frame, meta, PreprocessConfig(use_file_window=True))
    assert filed[frame == 100][0] == pytest.approx(0.5)
    # A constant frame is all black rather than a division by zero.
    assert np.all(window(np.full((4, 4), 7.0), _meta(), CFG) == 0)


def test_named_window_per_modality() -> None:
    hu = np.array([[-1000.0, -600.0, 40.0, 400.0, 3000.0]], dtype=np.float32)
    cfg = PreprocessConfig(
        windows={"lung": WindowPreset(center=-600, width=1500)}, modality_window={"CT": "lung"}
    )
    out = window(hu, _meta("CT", modality_units=True), cfg)
    np.testing.assert_allclose(out[0], [(-1000 + 1350) / 1500, 0.5, 1390 / 1500, 1.0, 1.0])


def test_monochrome1_is_inverted() -> None:
    arr = np.tile(np.arange(0, 128, dtype=np.uint16) * 10, (128, 1))
    mono2 = prepare(_image(arr, photometric="MONOCHROME2"), CFG, 64)[0]
    mono1 = prepare(_image(arr, photometric="MONOCHROME1"), CFG, 64)[0]
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2[:, 0].mean() < 0.05 and mono2[:, -1].mean() > 0.95  # high = bright
    assert mono1[:, 0].mean() > 0.95
    image = read_image(_image(arr, photometric="MONOCHROME1"))
    assert image.meta[0].invert and image.photometric == "MONOCHROME1"


def test_rgb_becomes_luminance() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[0, 3] = (255, 255, 255)
    image = read_image(_image(rgb, modality="OT", photometric="RGB"))
    assert image.frames.shape == (1, 4, 4)
    np.testing.assert_allclose(
        image.frames[0, 0], [0.299 * 255, 0.587 * 255, 0.114 * 255, 255.0], rtol=1e-5
    )
    assert not image.meta[0].modality_units and not image.meta[0].invert


def test_pydicom_colour_files_to_grey() -> None:
    rle = read_image(pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")))
    ybr = read_image(pydicom.dcmread(get_testdata_file("SC_rgb_dcmtk_+eb+cy+n1.dcm")))
    assert rle.frames.shape == ybr.frames.shape == (1, 100, 100)
    # Same picture: RGB RLE vs lossy JPEG in YBR_FULL (Y taken directly).
    assert float(np.abs(rle.frames - ybr.frames).mean()) < 3.0
    two = read_image(pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm")))
    assert two.frames.shape == (2, 100, 100)
    palette = read_image(pydicom.dcmread(get_testdata_file("examples_palette.dcm")))
    assert palette.frames.shape == (1, 350, 800) and palette.frames.std() > 1


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm",
     "SC_rgb_gdcm_KY.dcm"],
)
def test_three_channel_input_keeps_colour_in_rgb_order(name: str) -> None:
    # The same picture as RGB RLE and as YBR_FULL / YBR_FULL_422 / JPEG 2000: the same RGB input.
    fitted = PreprocessConfig(pixel_spacing_mm=0)  # the 100 px picture fills 64 px: 1.5625 px each
    reference = prepare(pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")), fitted, 64,
                        channels=3)
    other = prepare(pydicom.dcmread(get_testdata_file(name)), fitted, 64, channels=3)
    assert reference.shape == other.shape == (1, 3, 64, 64)
    assert float(np.abs(reference - other).mean()) < 0.01
    # Bands of 10 source rows: red (0-9), green (20-29), blue (40-49), grey 64 (70-79).
    for row, channel in ((3, 0), (16, 1), (29, 2)):
        pixel = reference[0, :, row, 32]
        assert pixel[channel] > 0.9 and np.delete(pixel, channel).max() < 0.1, (row, pixel)
    grey = reference[0, :, 48, 32]  # one window for the three channels: grey stays grey
    assert np.ptp(grey) < 0.01 and 0.1 < grey[0] < 0.4


def test_three_channel_input_replicates_grey_and_one_channel_sees_luminance() -> None:
    ct = make_ct(rows=96, cols=80, seed=3)
    grey = prepare(ct, CFG, 64)
    rgb = prepare(ct, CFG, 64, channels=3)
    assert grey.shape == (1, 64, 64) and rgb.shape == (1, 3, 64, 64)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, c], grey)
    colour = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert prepare(colour, CFG, 32, channels=3).shape == (2, 3, 32, 32)
    luminance = prepare(colour, CFG, 32)
    assert luminance.shape == (2, 32, 32)
    # Colour picture, one-channel model: the luminance path of before.
    image = read_image(colour)
    assert image.rgb is None  # not asked for
    np.testing.assert_array_equal(
        luminance[0], fit(window(image.frames[0], image.meta[0], CFG), image.spacing, CFG, 32)
    )
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        prepare(ct, CFG, 64, channels=2)


def test_small_images_are_a_bilinear_upscale_of_their_percentile_window() -> None:
    # A 28 px Secondary Capture (no spacing, as MedMNIST images are sent): the product's fit is
    # exactly torch's bilinear upscale (align_corners=False) of the windowed pixels; no block
    # averaging, padding or half-pixel shift loses anything (measured on the val splits:
    # docs/design/embeddings.md, "Small images").
    torch = pytest.importorskip("torch")
    pixels = np.random.default_rng(5).integers(0, 256, (28, 28), dtype=np.uint8)
    ds = image_dataset(pixels, key="small", patient_id="P")
    ours = prepare(round_trip(ds), PreprocessConfig(), 128)[0]
    lo, hi = np.percentile(pixels.astype(np.float32), (0.5, 99.5))
    windowed = np.clip((pixels.astype(np.float32) - lo) / (hi - lo), 0, 1)
    upscaled = torch.nn.functional.interpolate(
        torch.from_numpy(windowed)[None, None], size=128, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, np.clip(upscaled, 0, 1), atol=1e-5)


def test_resampled_scale_is_physical() -> None:
    # 512² at 0.5 mm (256 mm) -> 1.5 mm -> 128² (192 mm, centre crop).
    radius = 40.0
    ds = _image(_disc(512, 0.5, radius), spacing=(0.5, 0.5))
    out = prepare(ds, CFG, 128)[0]
    assert out.shape == (128, 128)
    measured = math.sqrt(float(out.sum()) / math.pi)  # area -> radius, in output pixels
    assert measured == pytest.approx(radius / 1.5, abs=0.5)
    rows, cols = np.nonzero(out > 0.5)
    assert rows.mean() == pytest.approx(63.5, abs=0.3)
    assert cols.mean() == pytest.approx(63.5, abs=0.3)
    # An off-centre disc stays at its physical offset.
    off = prepare(_image(_disc(512, 0.5, 20.0, (30.0, -45.0)), spacing=(0.5, 0.5)), CFG, 128)[0]
    rows, cols = np.nonzero(off > 0.5)
    assert rows.mean() == pytest.approx(63.5 + 30 / 1.5, abs=0.3)
    assert cols.mean() == pytest.approx(63.5 - 45 / 1.5, abs=0.3)
    # The same disc at another native spacing gives the same output size.
    coarse = prepare(_image(_disc(200, 1.2, radius), spacing=(1.2, 1.2)), CFG, 128)[0]
    assert math.sqrt(float(coarse.sum()) / math.pi) == pytest.approx(radius / 1.5, abs=0.5)


def test_fit_keeps_aspect_ratio_without_spacing() -> None:
    frame = np.ones((256, 128), dtype=np.float32)  # 2:1, no spacing: fitted
    out = fit(frame, None, CFG, 64)
    assert out.shape == (64, 64)
    r0, r1, c0, c1 = _bbox(out > 0.5)
    assert (r0, r1) == (0, 63) and (c0, c1) == (16, 47)
    assert np.all(out[:, 16:48] == 1.0) and out[:, :16].max() == 0 and out[:, 48:].max() == 0
    # Anisotropic pixels: 128 x 128 pixels of 1.0 x 0.5 mm are 128 x 64 mm.
    keep = PreprocessConfig(pixel_spacing_mm=0)
    aniso = fit(np.ones((128, 128), dtype=np.float32), (1.0, 0.5), keep, 64)
    assert _bbox(aniso > 0.5) == (0, 63, 16, 47)
    # pixel_spacing_mm = 0 keeps the whole image: the 512² disc is fitted, not cropped.
    whole = fit(_disc(512, 0.5, 100.0).astype(np.float32) / 1000, (0.5, 0.5), keep, 128)
    assert math.sqrt(float(whole.sum()) / math.pi) == pytest.approx(100 / 2.0, abs=0.5)


def test_downsampling_is_anti_aliased() -> None:
    # Gratings finer than the 3 mm Nyquist period of 1.5 mm pixels must come out as
    # (nearly) flat grey, not as moiré: plain linear interpolation keeps their full
    # amplitude (std 0.354); the box pre-filter (3 x 3 here) removes most of it.
    xx = np.arange(512, dtype=np.float32)
    for period_px, limit in ((2.5, 0.1), (4.0, 0.15)):
        grating = np.tile(0.5 + 0.5 * np.sin(2 * np.pi * xx / period_px), (512, 1))
        out = fit(grating.astype(np.float32), (0.5, 0.5), CFG, 128)
        assert float(out.std()) < limit, period_px
        assert float(out.mean()) == pytest.approx(0.5, abs=0.02)
    # A coarse 24 mm-period pattern passes nearly unchanged.
    coarse = np.tile(0.5 + 0.5 * np.sin(2 * np.pi * xx / 48.0), (512, 1)).astype(np.float32)
    assert float(fit(coarse, (0.5, 0.5), CFG, 128).std()) > 0.3


def test_tiny_field_of_view_is_fitted_not_shrunk_to_a_dot() -> None:
    tile = np.ones((10, 10), dtype=np.float32)  # a 5 µm microscopy tile
    out = fit(tile, (0.0005, 0.0005), CFG, 32)
    assert np.all(out == 1.0)


def test_deterministic_and_frame_selection() -> None:
    ds = _image(_disc(300, 0.7, 50.0) + 50, spacing=(0.7, 0.7))
    a, b = prepare(ds, CFG, 128), prepare(copy.deepcopy(ds), CFG, 128)
    assert np.array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (1, 128, 128)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(prepare(ds, CFG, 128, frames=[0]), a)


# ----------------------------------------------------------------------- errors


def test_no_pixel_data_raises_domain_error() -> None:
    ds = make_ct()
    del ds.PixelData
    with pytest.raises(PreprocessError, match="no pixel data") as info:
        prepare(ds, CFG, 64)
    assert isinstance(info.value, SidecarError)


def test_bad_inputs_raise_domain_errors() -> None:
    ds = make_ct(rows=8, cols=8)
    ds.PhotometricInterpretation = "CMYK"
    with pytest.raises(PreprocessError, match="unsupported Photometric Interpretation 'CMYK'"):
        read_image(ds)
    ds = make_ct(rows=8, cols=8)
    with pytest.raises(PreprocessError, match="frame 1 out of range"):
        read_image(ds, frames=[1])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(PreprocessError, match="no pixel decoder"):
        read_image(ds)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(PreprocessError, match="Transfer Syntax"):
        read_image(ds)
    ds = make_ct(rows=8, cols=8)
    ds.PixelData = ds.PixelData[:-10]  # truncated
    with pytest.raises(PreprocessError, match="cannot decode"):
        read_image(ds)


def test_missing_codec_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(MissingCodecError, match="pylibjpeg-openjpeg") as info:
        prepare(ds, CFG, 64)
    assert info.value.transfer_syntax == JPEG2000Lossless
    assert isinstance(info.value, PreprocessError)


# ----------------------------------------------------------------------- sampling


def _series(positions: list[float | None]) -> list[FrameInfo[int]]:
    return [FrameInfo(key=i, position_mm=p, order=(i + 1, 0)) for i, p in enumerate(positions)]


def test_sample_long_series_is_capped_and_spread() -> None:
    infos = _series([float(i) for i in range(600)])  # 600 slices at 1 mm
    chosen = sample(infos, PreprocessConfig(slice_spacing_mm=5, max_slices_per_series=32))
    assert len(chosen) == 32
    assert chosen[0] == 0 and chosen[-1] == 599
    steps = np.diff(chosen)
    assert steps.min() >= 19 and steps.max() <= 20  # 599 / 31 = 19.3 mm apart
    # Uncapped, every ~5 mm.
    many = sample(infos, PreprocessConfig(slice_spacing_mm=5, max_slices_per_series=1000))
    assert len(many) == 120
    assert set(np.diff(many).tolist()) <= {5, 6}


def test_sample_short_series_keeps_every_slice() -> None:
    infos = _series([5.0 * i for i in range(10)])
    assert sample(infos, CFG) == list(range(10))
    assert sample(infos, PreprocessConfig(slice_spacing_mm=0)) == list(range(10))
    four = PreprocessConfig(slice_spacing_mm=0, max_slices_per_series=4)
    assert sample(infos, four) == [0, 3, 6, 9]
    assert sample(_series([12.0]), CFG) == [0]
    assert sample([], CFG) == []
    # All slices within less than one spacing: the middle one.
    assert sample(_series([0.0, 1.0, 2.0]), CFG) == [1]


def test_sample_sorts_unordered_input_by_position() -> None:
    positions = [5.0 * i for i in range(40)]  # 0 .. 195 mm
    ordered = [FrameInfo(key=f"s{int(p)}", position_mm=p) for p in positions]
    rng = np.random.default_rng(7)
    shuffled = [ordered[i] for i in rng.permutation(len(ordered))]
    cfg = PreprocessConfig(slice_spacing_mm=10, max_slices_per_series=100)
    chosen = sample(shuffled, cfg)
    assert chosen == sample(ordered, cfg)
    assert len(chosen) == 20 and chosen[0] == "s0" and chosen[-1] == "s195"
    picked = [int(k[1:]) for k in chosen]
    assert picked == sorted(picked) and set(np.diff(picked).tolist()) <= {10, 15}
    # Descending positions (feet first) too.
    assert sample(_series([-5.0 * i for i in range(10)]), CFG) == list(range(9, -1, -1))


def test_sample_falls_back_to_order_when_positions_missing() -> None:
    infos = [FrameInfo(key=k, position_mm=None, order=(k, 0)) for k in (7, 3, 9, 1, 5)]
    assert sample(infos, CFG) == [1, 3, 5, 7, 9]
    assert sample(infos, PreprocessConfig(max_slices_per_series=3)) == [1, 5, 9]
    # One position missing: positions are not trusted, order decides.
    mixed = _series([0.0, 50.0, None, 10.0])
    assert sample(mixed, PreprocessConfig(max_slices_per_series=4)) == [0, 1, 2, 3]


def test_frame_infos_single_frame_without_geometry() -> None:
    ds = make_ct(instance_number=4)
    assert frame_infos(ds, "u") == [FrameInfo(key=("u", 0), position_mm=4.0, order=(4, 0))]
    del ds.ImagePositionPatient
    assert frame_infos(ds, "u")[0].position_mm is None
