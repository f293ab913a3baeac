"""Decoding one DICOM instance: header facts per frame and pixels in modality units.

``read_image`` decodes the chosen frames (every transfer syntax with an installed
codec), turns colour into grey (and keeps it as RGB on request), applies the
modality LUT and returns what
windowing needs per frame (:class:`FrameMeta`). The header helpers here
(frame count, position along the slice normal, spacing, rescale, file window)
are shared with slice sampling. Errors are :class:`PreprocessError`;
:class:`MissingCodecError` names the optional package that would decode the data.
The rules are in docs/design/embeddings.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom.uid as dicom_uid
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, convert_color_space

from sidecar.errors import SidecarError, is_native_panic

__all__ = [
    "DecodedImage",
    "FrameMeta",
    "MissingCodecError",
    "PreprocessError",
    "frame_positions",
    "instance_number",
    "number_of_frames",
    "read_image",
]

F32 = NDArray[np.float32]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_RGB_LIKE = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}
)
_SUPPORTED_PHOTOMETRIC = _GREY | _RGB_LIKE | {"PALETTE COLOR"}
_LUMA = (0.299, 0.587, 0.114)

_LIBJPEG = "pylibjpeg-libjpeg (pip install pylibjpeg pylibjpeg-libjpeg)"
_OPENJPEG = "pylibjpeg-openjpeg (pip install pylibjpeg pylibjpeg-openjpeg)"
_CODEC_PACKAGES: dict[str, str] = {
    dicom_uid.JPEGBaseline8Bit: _LIBJPEG,
    dicom_uid.JPEGExtended12Bit: _LIBJPEG,
    dicom_uid.JPEGLossless: _LIBJPEG,
    dicom_uid.JPEGLosslessSV1: _LIBJPEG,
    dicom_uid.JPEGLSLossless: "pyjpegls (pip install pyjpegls) or " + _LIBJPEG,
    dicom_uid.JPEGLSNearLossless: "pyjpegls (pip install pyjpegls) or " + _LIBJPEG,
    dicom_uid.JPEG2000Lossless: _OPENJPEG,
    dicom_uid.JPEG2000: _OPENJPEG,
    dicom_uid.HTJ2KLossless: _OPENJPEG,
    dicom_uid.HTJ2KLosslessRPCL: _OPENJPEG,
    dicom_uid.HTJ2K: _OPENJPEG,
    dicom_uid.RLELossless: "pylibjpeg-rle (pip install pylibjpeg pylibjpeg-rle)",
}


class PreprocessError(SidecarError):
    """The pixels of a dataset cannot be turned into model input.

    The message names what is wrong: no pixel data, an unsupported
    photometric interpretation or transfer syntax, undecodable data.
    """


class MissingCodecError(PreprocessError):
    """The transfer syntax needs an optional decoder package that is not installed.

    Parameters
    ----------
    transfer_syntax
        The transfer syntax UID of the dataset.
    package
        The package (and how to install it) that would decode it.
    detail
        What pydicom reports about its missing plugins.
    """

    def __init__(self, transfer_syntax: str, package: str, detail: str = "") -> None:
        self.transfer_syntax = transfer_syntax
        self.package = package
        name = dicom_uid.UID(transfer_syntax).name
        extra = f" (pydicom: {detail})" if detail else ""
        super().__init__(
            f"cannot decode {name} ({transfer_syntax}) pixel data: it needs the optional "
            f"package {package}{extra}"
        )

@dataclass(frozen=True)
class FrameMeta:
    """What windowing needs to know about one decoded frame.

    Attributes
    ----------
    modality
        The Modality attribute, upper case ("" when absent).
    modality_units
        True when the values passed a rescale or modality LUT (e.g. HU for
        CT); named window presets apply only then.
    invert
        True for MONOCHROME1 (low values are bright).
    file_window
        The file's first (center, width), or ``None``.
    position_mm
        Position along the slice normal in mm, or ``None``.
    """

    modality: str
    modality_units: bool
    invert: bool
    file_window: tuple[float, float] | None
    position_mm: float | None


@dataclass(frozen=True)
class DecodedImage:
    """Grey frames after the modality LUT, with what the later steps need.

    Attributes
    ----------
    frames
        ``(F, H, W)`` float32 in modality units (grey) or luminance (colour).
    indices
        The frame numbers (0-based) of ``frames`` in the instance.
    photometric
        Photometric Interpretation of the file, e.g. ``"MONOCHROME1"``, ``"RGB"``.
    spacing
        ``(row, column)`` spacing in mm (centre to centre of adjacent rows,
        columns), or ``None`` when the file gives none.
    meta
        One :class:`FrameMeta` per frame.
    padding
        ``(F, H, W)`` True where a pixel is Pixel Padding Value, or ``None``.
    rgb
        ``(F, H, W, 3)`` float32 RGB in stored units when colour was asked for
        and the image is colour (YBR_FULL and YBR_FULL_422 converted; JPEG 2000's
        YBR_ICT and YBR_RCT are RGB once decoded), else ``None``.
    """

    frames: F32
    indices: tuple[int, ...]
    photometric: str
    spacing: tuple[float, float] | None
    meta: tuple[FrameMeta, ...]
    padding: NDArray[np.bool_] | None
    rgb: F32 | None = None


# --------------------------------------------------------------------------- header helpers


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` finite floats from a DICOM multi-value, or ``None``."""
    if value is None:
        return None
    try:
        items = (
            list(value)
            if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes)
            else [value]
        )
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _first_float(value: Any) -> float | None:
    """The first value of a (possibly multi-valued) number, or ``None``."""
    if value is None:
        return None
    try:
        if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes):
            if len(value) == 0:
                return None
            value = value[0]
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The item of a functional-group macro for ``frame``: per-frame, then shared."""
    for groups, idx in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(groups)
        if seq is None or len(seq) <= idx:
            continue
        inner = seq[idx].get(sequence)
        if inner is not None and len(inner) > 0:
            item: Dataset = inner[0]
            return item
    return None


def number_of_frames(ds: Dataset) -> int:
    raw = ds.get("NumberOfFrames")
    if raw in (None, ""):
        return 1
    try:
        n = int(raw)
    except (TypeError, ValueError) as exc:
        raise PreprocessError(f"invalid Number of Frames {raw!r}") from exc
    if n < 1:
        raise PreprocessError(f"invalid Number of Frames {raw!r}")
    return n


def _spacing(ds: Dataset, frame: int) -> tuple[float, float] | None:
    item = _group_item(ds, frame, "PixelMeasuresSequence")
    candidates = [
        item.get("PixelSpacing") if item is not None else None,
        ds.get("PixelSpacing"),
        ds.get("ImagerPixelSpacing"),
    ]
    for value in candidates:
        pair = _floats(value, 2)
        if pair is not None and pair[0] > 0 and pair[1] > 0:
            return pair[0], pair[1]
    return None


def _rescale(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) for ``frame``, or ``None`` when the file has none."""
    item = _group_item(ds, frame, "PixelValueTransformationSequence")
    for source in (item, ds):
        if source is None:
            continue
        slope = _first_float(source.get("RescaleSlope"))
        intercept = _first_float(source.get("RescaleIntercept"))
        if slope is not None and intercept is not None:
            return slope, intercept
    return None


def _file_window(ds: Dataset, frame: int) -> tuple[float, float] | None:
    item = _group_item(ds, frame, "FrameVOILUTSequence")
    for source in (item, ds):
        if source is None:
            continue
        center = _first_float(source.get("WindowCenter"))
        width = _first_float(source.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            return center, width
    return None


def _normal(iop: tuple[float, ...] | None) -> NDArray[np.float64] | None:
    if iop is None:
        return None
    n = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        return None
    out: NDArray[np.float64] = n / norm
    return out


def frame_positions(ds: Dataset, n_frames: int) -> list[float | None]:
    """Position of every frame along its slice normal (mm), ``None`` where unknown."""
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return [None if geo is None else float(np.dot(_normal(geo[1]), geo[0]))  # type: ignore[arg-type]
                for geo in frame_geometry(ds, n_frames)]
    top_iop = _floats(ds.get("ImageOrientationPatient"), 6)
    top_ipp = _floats(ds.get("ImagePositionPatient"), 3)
    normal = _normal(top_iop)
    if normal is None or top_ipp is None:
        return [None] * n_frames
    base = float(np.dot(normal, top_ipp))
    if n_frames == 1:
        return [base]
    offsets = _floats(ds.get("GridFrameOffsetVector"), n_frames)
    if offsets is None:
        return [None] * n_frames  # frames of a legacy multi-frame: no per-frame geometry
    return [base + o for o in offsets]


def frame_geometry(
    ds: Dataset, n_frames: int
) -> list[tuple[tuple[float, ...], tuple[float, ...]] | None]:
    """(ImagePositionPatient, ImageOrientationPatient) of every frame, ``None`` where unknown.

    Per-frame and shared functional groups first (Enhanced objects), then the
    top-level attributes; a single-frame object's own position. Frames of a
    legacy multi-frame object without per-frame geometry are ``None``.
    """
    top_iop = _floats(ds.get("ImageOrientationPatient"), 6)
    top_ipp = _floats(ds.get("ImagePositionPatient"), 3)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        out: list[tuple[tuple[float, ...], tuple[float, ...]] | None] = []
        for f in range(n_frames):
            pos_item = _group_item(ds, f, "PlanePositionSequence")
            ori_item = _group_item(ds, f, "PlaneOrientationSequence")
            ipp = None if pos_item is None else _floats(pos_item.get("ImagePositionPatient"), 3)
            iop = None if ori_item is None else _floats(ori_item.get("ImageOrientationPatient"), 6)
            iop = iop or top_iop
            out.append(None if ipp is None or iop is None or _normal(iop) is None
                       else (ipp, iop))
        return out
    if top_iop is None or top_ipp is None or _normal(top_iop) is None:
        return [None] * n_frames
    if n_frames == 1:
        return [(top_ipp, top_iop)]
    return [None] * n_frames


def pixel_spacing(ds: Dataset, frame: int = 0) -> tuple[float, float] | None:
    """``(row, column)`` spacing in mm of ``frame`` (functional groups first), or ``None``."""
    return _spacing(ds, frame)


def instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


# --------------------------------------------------------------------------- decoding


def _decoder_for(ds: Dataset) -> tuple[Decoder, str]:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "") if meta is not None else "").strip()
    if not ts:
        raise PreprocessError("the file meta has no Transfer Syntax UID: cannot decode pixels")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise PreprocessError(
            f"no pixel decoder for transfer syntax {dicom_uid.UID(ts).name} ({ts})"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        package = _CODEC_PACKAGES.get(ts, "a pydicom decoding plugin")
        raise MissingCodecError(ts, package, missing)
    return decoder, ts


def _padding_mask(ds: Dataset, stored: NDArray[Any]) -> NDArray[np.bool_] | None:
    value = _first_float(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _first_float(ds.get("PixelPaddingRangeLimit"))
    if limit is None:
        mask: NDArray[np.bool_] = stored == value
    else:
        lo, hi = min(value, limit), max(value, limit)
        mask = (stored >= lo) & (stored <= hi)
    return mask if bool(mask.any()) else None


def read_image(
    ds: Dataset, frames: Sequence[int] | None = None, *, colour: bool = False
) -> DecodedImage:
    """Decode frames to grey float32 in modality units (and RGB, on request).

    Parameters
    ----------
    ds
        A dataset with file meta (for the transfer syntax) and pixel data.
    frames
        0-based frame numbers to decode (others are not decoded), or ``None``
        for every frame. The requested frames are held in memory together as
        float32: pass the sampled frames of a large multi-frame object.
    colour
        Also return colour images as RGB (:attr:`DecodedImage.rgb`).

    Returns
    -------
    DecodedImage
        ``frames`` of shape ``(len(frames), rows, columns)``.

    Raises
    ------
    PreprocessError
        No pixel data, no or unknown transfer syntax, unsupported photometric
        interpretation, a frame number out of range, or data that does not decode.
    MissingCodecError
        The transfer syntax needs an optional package that is not installed.
    """
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        what = f" ({dicom_uid.UID(str(sop)).name})" if sop else ""
        raise PreprocessError(f"the dataset{what} has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if "PixelData" in ds and not photometric:
        raise PreprocessError("the dataset has Pixel Data but no Photometric Interpretation")
    if "PixelData" in ds and photometric not in _SUPPORTED_PHOTOMETRIC:
        raise PreprocessError(
            f"unsupported Photometric Interpretation {photometric!r}; "
            f"supported: {', '.join(sorted(_SUPPORTED_PHOTOMETRIC))}"
        )
    if not photometric:
        photometric = "MONOCHROME2"  # float pixel data is always grey
    decoder, ts = _decoder_for(ds)
    n_frames = number_of_frames(ds)
    wanted = list(range(n_frames)) if frames is None else [int(f) for f in frames]
    for f in wanted:
        if not 0 <= f < n_frames:
            raise PreprocessError(f"frame {f} out of range: the instance has {n_frames} frame(s)")
    if not wanted:
        raise PreprocessError("no frames requested")

    try:
        if len(wanted) == n_frames and wanted == list(range(n_frames)):
            arr, info = decoder.as_array(ds, raw=True)
            if n_frames == 1:
                arr = arr[np.newaxis]
        else:
            parts = [decoder.as_array(ds, index=f, raw=True) for f in wanted]
            arr = np.stack([p[0] for p in parts])
            info = parts[0][1]
        decoded_pi = str(info.get("photometric_interpretation", photometric)).upper()
        samples = int(info.get("samples_per_pixel", 1))
        if samples == 1 and photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            decoded_pi, samples = "RGB", 3
    except PreprocessError:
        raise
    except BaseException as exc:  # decoders raise many types; all mean "cannot decode"
        if not isinstance(exc, Exception) and not is_native_panic(exc):
            raise  # KeyboardInterrupt, SystemExit
        others = "; ".join(decoder.missing_dependencies)
        hint = f" (decoders not installed that might: {others})" if others else ""
        raise PreprocessError(
            f"cannot decode {dicom_uid.UID(ts).name} pixel data{hint}: {type(exc).__name__}: {exc}"
        ) from exc

    padding: NDArray[np.bool_] | None = None
    rgb: F32 | None = None
    rescaled = False
    if samples == 3:
        if arr.ndim != 4:
            raise PreprocessError(f"unexpected decoded shape {arr.shape} for colour data")
        if colour:
            rgb = _as_rgb(arr, decoded_pi)
        if decoded_pi.startswith("YBR"):
            grey = arr[..., 0].astype(np.float32)  # Y is the luminance
        else:
            grey = (
                arr[..., 0].astype(np.float32) * np.float32(_LUMA[0])
                + arr[..., 1].astype(np.float32) * np.float32(_LUMA[1])
                + arr[..., 2].astype(np.float32) * np.float32(_LUMA[2])
            )
        invert = False
    elif samples == 1:
        if arr.ndim != 3:
            raise PreprocessError(f"unexpected decoded shape {arr.shape} for grey data")
        invert = photometric == "MONOCHROME1"
        padding = _padding_mask(ds, arr)
        try:
            grey, rescaled = _modality_lut(ds, arr, wanted)
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise PreprocessError(f"invalid Modality LUT: {type(exc).__name__}: {exc}") from exc
    else:
        raise PreprocessError(f"unsupported Samples per Pixel {samples}")

    if grey.shape[1] < 1 or grey.shape[2] < 1:
        raise PreprocessError(f"empty image {grey.shape[1]}x{grey.shape[2]}")
    modality = str(ds.get("Modality", "")).strip().upper()
    positions = frame_positions(ds, n_frames)
    meta = tuple(
        FrameMeta(
            modality=modality,
            modality_units=rescaled,
            invert=invert,
            file_window=_file_window(ds, f) if samples == 1 else None,
            position_mm=positions[f],
        )
        for f in wanted
    )
    return DecodedImage(
        frames=np.ascontiguousarray(grey, dtype=np.float32),
        indices=tuple(wanted),
        photometric=photometric,
        spacing=_spacing(ds, wanted[0]),
        meta=meta,
        padding=padding,
        rgb=rgb,
    )


def _as_rgb(arr: NDArray[Any], decoded_pi: str) -> F32 | None:
    """``(F, H, W, 3)`` RGB float32 from decoded colour samples, or ``None`` if unsupported."""
    if decoded_pi in ("YBR_FULL", "YBR_FULL_422"):
        if arr.dtype != np.uint8:
            return None
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif decoded_pi not in ("RGB", "YBR_ICT", "YBR_RCT"):  # YBR_PARTIAL_*: grey is used
        return None
    return np.ascontiguousarray(arr, dtype=np.float32)


def _modality_lut(ds: Dataset, arr: NDArray[Any], wanted: list[int]) -> tuple[F32, bool]:
    """Apply rescale (per frame) or a Modality LUT Sequence; say whether one applied."""
    lut = ds.get("ModalityLUTSequence")
    if lut and lut[0].get("LUTDescriptor") and lut[0].get("LUTData"):
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32), True
    out = arr.astype(np.float32)
    rescaled = False
    for i, f in enumerate(wanted):
        params = _rescale(ds, f)
        if params is None:
            continue
        rescaled = True
        slope, intercept = params
        if slope != 1.0:
            out[i] *= np.float32(slope)
        if intercept != 0.0:
            out[i] += np.float32(intercept)
    return out, rescaled
