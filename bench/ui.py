"""Benchmark of the radiologists' page: server time of a study page with 20 hits.

Run with ``make bench-ui``. Builds a scratch archive of ``--studies`` CT studies
(one series of ``--slices`` 256 x 256 slices each, smooth random anatomy), stores
them through ``InstanceStore.store`` (what C-STORE calls), embeds them with the
configured model (the shipped SliceNetV1 unless ``--tiny``) by the worker's own
job, starts ``sidecar serve``'s composition root (``Sidecar``) with the HTTP API,
and requests ``/ui/studies/<uid>?k=20``:

* the first request, which renders and caches every thumbnail it shows
  (6 key slices + 2 per hit);
* then ``--repeat`` requests with the thumbnails cached: p50, p95 and max of the
  time from sending the request to the last byte over loopback (keep-alive), and
  the same for the hits fragment alone (``/hits``, what a filter change fetches).

The goal (issue 16) is <= 300 ms for the cached page. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import io
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sidecar.archive.store import InstanceStore, Origin
from sidecar.config import load_config
from sidecar.embeddings.model import TinyEmbedder, load_embedder
from sidecar.service.app import Sidecar


def ct(study: str, series: str, patient: str, n: int, rng: np.random.Generator,
       base: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName = patient, "Bench^Patient"
    ds.StudyDate, ds.Modality, ds.BodyPartExamined = "20240110", "CT", "CHEST"
    ds.StudyDescription, ds.SeriesDescription = f"bench study {patient}", "AXIAL"
    ds.InstanceNumber = n + 1
    ds.ImagePositionPatient = [0.0, 0.0, 5.0 * n]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 5.0
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    hu = base + rng.normal(0, 20, base.shape)
    ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
    return ds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def anatomy(rng: np.random.Generator) -> np.ndarray:
    coarse = rng.uniform(-200, 300, (16, 16))
    return np.kron(coarse, np.ones((16, 16)))


def timed(conn: http.client.HTTPConnection, path: str) -> tuple[float, int, int]:
    start = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    return (time.perf_counter() - start) * 1000.0, resp.status, len(body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=41)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="the tiny test embedder (fast)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        root = Path(tmp)
        data = {
            "dicom": {"port": free_port()},
            "storage": {"data_dir": str(root / "data"), "min_free_mb": 1},
            "worker": {"enabled": False},
            "logging": {"level": "WARNING"},
            "http": {"enabled": True, "port": free_port()},
        }
        (root / "sidecar.yaml").write_text(yaml.safe_dump(data))
        cfg = load_config(root / "sidecar.yaml", environ={})
        embedder = TinyEmbedder(input_size=128) if args.tiny else load_embedder(cfg.embedding)
        app = Sidecar(cfg, embedder=embedder)  # worker off: embedded below, then idle
        rng = np.random.default_rng(0)
        shared = anatomy(rng)
        store = InstanceStore(cfg, app.repository)
        studies: list[str] = []
        t0 = time.perf_counter()
        for s in range(args.studies):
            study, series = generate_uid(), generate_uid()
            studies.append(study)
            mix = 0.6 * shared + 0.4 * anatomy(rng)
            for n in range(args.slices):
                ds = ct(study, series, f"B{s}", n, rng, mix)
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                store.store(buf.getvalue(), None, Origin("BENCH", "127.0.0.1"))
        app.repository.mark_stable_studies(0.0)
        assert app.embedding is not None
        app.embedding.open()
        while app.embedding.run_job().series:
            pass
        app.embedding.close()
        built = time.perf_counter() - t0
        app.start()
        try:
            assert app.http is not None and app.http.address is not None
            host, port = app.http.address
            conn = http.client.HTTPConnection(host, port, timeout=120)
            path = f"/ui/studies/{studies[0]}?k=20"
            first, status, size = timed(conn, path)
            if status != 200:
                print(f"bench-ui: {path} answered {status}", file=sys.stderr)
                return 1
            time.sleep(2.5)  # past the search's refresh interval: steady state
            timed(conn, path)
            page = [timed(conn, path)[0] for _ in range(args.repeat)]
            hits = [timed(conn, path.replace("?", "/hits?"))[0] for _ in range(args.repeat)]
            conn.close()
        finally:
            app.stop()
        model = embedder.model_id
        print(f"bench-ui: {args.studies} studies x {args.slices} slices (256 px), model {model}, "
              f"built and embedded in {built:.1f} s")
        print(f"  study page, 20 hits, first (renders {6 + 2 * 20} thumbnails at most): "
              f"{first:.0f} ms, {size} bytes")
        for name, times in (("study page, thumbnails cached", page), ("hits fragment", hits)):
            times.sort()
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            print(f"  {name}: p50 {statistics.median(times):.1f} ms, p95 {p95:.1f} ms, "
                  f"max {times[-1]:.1f} ms ({len(times)} requests; goal <= 300 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
