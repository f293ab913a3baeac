"""Worker time of one series vector: a 300-slice 512² CT series read from disk.

Run: ``.venv/bin/python bench/volume_cost.py [--slices 300] [--repeats 3]``. Writes the
series (uint16, Explicit VR Little Endian, 0.7 mm pixels, 1 mm slices) to a temporary
folder, then times what the worker's volume step does for it
(:class:`sidecar.embeddings.volume_worker.VolumeWorker`): read the headers, plan,
read the needed slices, window, resample, embed the nine planes with the built-in
model at ``embedding.threads`` (1). Prints each stage and the median of the repeats
(the first repeat reads from a cold page cache only if the caller dropped it).
Issue 22's goal: at most 1 s on this 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.config import Config  # noqa: E402
from sidecar.embeddings.model import load_embedder  # noqa: E402
from sidecar.embeddings.volume_worker import series_volume_vector  # noqa: E402


def write_series(folder: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.45 * size) ** 2
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180.0, -180.0, float(k)]
        ds.InstanceNumber, ds.RescaleIntercept, ds.RescaleSlope = k + 1, -1024, 1
        pixels = np.where(body, 1064 + rng.integers(-40, 40, (size, size)), 24)
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = Config()
    embedder = load_embedder(cfg.embedding)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_series(Path(tmp), args.slices, args.size)
        totals = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            headers = [(i, pydicom.dcmread(p, stop_before_pixels=True))
                       for i, p in enumerate(paths)]
            t1 = time.perf_counter()
            built = series_volume_vector(headers, lambda i, _f: pydicom.dcmread(paths[i]),
                                         cfg, embedder)
            t2 = time.perf_counter()
            assert built.vector is not None, built.reason
            totals.append(t2 - t0)
            print(f"repeat {rep + 1}: headers {t1 - t0:.2f} s, volume and planes {t2 - t1:.2f} s, "
                  f"total {t2 - t0:.2f} s (spacing {built.spacing_mm:.2f} mm)")
    print(f"series vector of {args.slices} slices {args.size}^2: median "
          f"{statistics.median(totals):.2f} s (goal <= 1 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
