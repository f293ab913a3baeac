"""``make demo``: Orthanc as the PACS, the sidecar beside it, one similarity query.

1. Start Orthanc (``scripts/orthanc_pacs.py``: its own configuration on free
   loopback ports; the sidecar registered as a modality; a Lua
   ``OnStableStudy`` forwards every stable study to it) and ``sidecar serve``
   (a generated configuration in a temporary directory, the shipped model,
   the default receiver processes, RetrieveAETitle = Orthanc).
2. Upload eight synthetic CT studies (heads, chests, abdomens; phantoms drawn
   in code with fixed seeds, so every run builds the same studies and UIDs) to
   Orthanc's REST API.
3. Wait until Orthanc has forwarded them and the sidecar has embedded them.
4. Ask the sidecar with a similarity C-FIND (the private block
   ``PACS SIDECAR SIMILARITY``) which studies look like the first head CT, and
   print the ranked hits.
5. Print the URLs of that study's page in Orthanc Explorer, with the **Similar
   studies** button of ``integrations/orthanc/similar_studies.py`` (loaded into
   Orthanc's Python plugin when ``orthanc-python`` is installed), and of the
   sidecar's own page for it (``/ui/``, the HTTP API is on). ``--wait`` keeps
   both running until Enter or Ctrl-C, to open them.

Everything started is stopped on the way out (also on Ctrl-C or an error) and
the temporary directory is removed (``--keep`` keeps it, with the logs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orthanc_pacs import (  # noqa: E402 - the module beside this script
    Modality,
    OrthancError,
    OrthancPacs,
    free_port,
    orthanc_available,
    wait_until,
)

CREATOR = "PACS SIDECAR SIMILARITY"
ORTHANC_AE = "ORTHANC"
SIDECAR_AE = "SIDECAR"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SIZE, SPACING = 128, 2.5  # pixels, mm: the model's 320 mm field of view
REPO = Path(__file__).resolve().parents[1]
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
EXPLORER_SCRIPT = REPO / "integrations" / "orthanc" / "similar_studies.py"
SLICES, SLICE_GAP = 12, 5.0  # per series, mm apart

# ------------------------------------------------------------------ studies


@dataclass(frozen=True)
class DemoStudy:
    key: str
    patient_id: str
    patient_name: str
    kind: str  # HEAD, CHEST or ABDOMEN
    description: str
    date: str
    scale: float  # body size
    shift: tuple[float, float]  # mm


STUDIES = [
    DemoStudy("s1", "DEMO-01", "Demo^Alice", "HEAD", "CT HEAD (query)", "20240105", 1.00, (0, 0)),
    DemoStudy("s2", "DEMO-02", "Demo^Bob", "HEAD", "CT HEAD", "20240110", 0.95, (4, -3)),
    DemoStudy("s3", "DEMO-03", "Demo^Carol", "HEAD", "CT HEAD", "20240212", 1.06, (-5, 2)),
    DemoStudy("s4", "DEMO-04", "Demo^Dan", "CHEST", "CT CHEST", "20240115", 1.00, (0, 0)),
    DemoStudy("s5", "DEMO-05", "Demo^Erin", "CHEST", "CT CHEST", "20240301", 0.92, (6, 4)),
    DemoStudy("s6", "DEMO-06", "Demo^Frank", "ABDOMEN", "CT ABDOMEN", "20240120", 1.00, (0, 0)),
    DemoStudy("s7", "DEMO-07", "Demo^Grace", "ABDOMEN", "CT ABDOMEN", "20240322", 1.08, (-4, 5)),
    # the query's patient again: left out of the answer by default
    DemoStudy("s8", "DEMO-01", "Demo^Alice", "HEAD", "CT HEAD follow-up", "20240601", 1.01, (2, 1)),
]
QUERY = STUDIES[0]


def uid(*parts: str) -> str:
    """A UID derived from ``parts`` (the same every run)."""
    return generate_uid(entropy_srcs=["pacs-sidecar demo", *parts])


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> Any:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def phantom(study: DemoStudy, index: int, rng: np.random.Generator) -> np.ndarray:
    """One axial slice in HU (SIZE x SIZE at SPACING mm)."""
    coords = (np.arange(SIZE) - SIZE / 2 + 0.5) * SPACING
    x, y = np.meshgrid(coords - study.shift[0], coords - study.shift[1])
    s = study.scale
    t = index / (SLICES - 1)  # 0 .. 1 along the series
    hu = np.full((SIZE, SIZE), -1000.0)
    if study.kind == "HEAD":
        taper = s * np.sqrt(1.0 - 0.45 * t**2)  # the skull narrows towards the vertex
        hu[_ellipse(x, y, 0, 0, 74 * taper, 92 * taper)] = 1200.0  # bone
        hu[_ellipse(x, y, 0, 0, 67 * taper, 85 * taper)] = 32.0  # brain
        if 0.2 < t < 0.7:  # lateral ventricles
            for cx in (-9, 9):
                hu[_ellipse(x, y, cx * s, -5 * s, 6 * s, 22 * s)] = 5.0
    elif study.kind == "CHEST":
        hu[_ellipse(x, y, 0, 0, 140 * s, 100 * s)] = -100.0  # fat
        hu[_ellipse(x, y, 0, 0, 128 * s, 88 * s)] = 40.0  # muscle, mediastinum
        lung = 1.0 + 0.15 * np.sin(np.pi * t)
        for cx in (-62, 62):
            hu[_ellipse(x, y, cx * s, 0, 48 * s * lung, 68 * s * lung)] = -850.0
        hu[_ellipse(x, y, 14 * s, -18 * s, 40 * s, 34 * s)] = 45.0  # heart
        hu[_ellipse(x, y, 0, 70 * s, 15 * s, 15 * s)] = 700.0  # spine
    else:  # ABDOMEN
        hu[_ellipse(x, y, 0, 0, 150 * s, 110 * s)] = -100.0
        hu[_ellipse(x, y, 0, 0, 126 * s, 88 * s)] = 35.0
        hu[_ellipse(x, y, -52 * s, -8 * s, 62 * s * (1.1 - 0.5 * t), 55 * s)] = 60.0  # liver
        for cx in (-55, 55):
            hu[_ellipse(x, y, cx * s, 45 * s, 20 * s, 26 * s)] = 150.0  # kidneys
        hu[_ellipse(x, y, 0, 72 * s, 17 * s, 17 * s)] = 700.0  # spine
        for _ in range(4):  # bowel gas
            gx, gy = rng.uniform(-20, 80), rng.uniform(-60, 20)
            hu[_ellipse(x, y, gx * s, gy * s, 9.0, 7.0)] = -900.0
    return hu + rng.normal(0.0, 12.0, hu.shape)


def slices(study: DemoStudy) -> Iterator[Dataset]:
    """The study's one axial series, Part 10 ready (Explicit VR Little Endian)."""
    rng = np.random.default_rng(int(study.key[1:]))
    study_uid, series_uid = uid(study.key, "study"), uid(study.key, "series")
    for i in range(SLICES):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = uid(study.key, "slice", str(i))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = study.patient_id
        ds.PatientName = study.patient_name
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = study.date
        ds.StudyTime = "100000"
        ds.AccessionNumber = f"ACC{study.key[1:].zfill(4)}"
        ds.StudyID = study.key[1:]
        ds.StudyDescription = study.description
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.BodyPartExamined = study.kind
        ds.SeriesNumber = 1
        ds.SeriesDescription = "AXIAL 5 mm"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-160.0, -160.0, -i * SLICE_GAP]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [SPACING, SPACING]
        ds.SliceThickness = SLICE_GAP
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = SIZE
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        hu = phantom(study, i, rng)
        ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        yield ds


def part10(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


# ------------------------------------------------------------------ sidecar


class SidecarProcess:
    """``sidecar serve`` as a child process with a generated configuration."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.http_port = free_port()
        self.config_path = workdir / "sidecar.yaml"
        self.log_path = workdir / "sidecar.log"
        self.process: subprocess.Popen[bytes] | None = None
        exe = Path(sys.executable).parent / "sidecar"
        self.exe = str(exe) if exe.exists() else (shutil.which("sidecar") or "sidecar")

    def write_config(self) -> None:
        config = {
            "dicom": {"ae_title": SIDECAR_AE, "bind_address": "127.0.0.1", "port": self.port,
                      "retrieve_ae_title": ORTHANC_AE},
            "storage": {"data_dir": str(self.workdir / "data"), "min_free_mb": 64},
            "stability": {"stable_age": 2.0, "check_interval": 0.5},
            "worker": {"interval": 1.0},
            "http": {"enabled": True, "port": self.http_port},
            "logging": {"level": "INFO"},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, timeout: float = 120.0) -> None:
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.exe, "--config", str(self.config_path), "serve"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
            )
        wait_until(self._echo, timeout=timeout, interval=0.25, what="the sidecar's C-ECHO")

    def _echo(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"sidecar serve exited with status {self.process.returncode}")
        ae = AE(ae_title="DEMO")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", self.port, ae_title=SIDECAR_AE)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        return bool(status and status.Status == 0x0000)

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [self.exe, "--config", str(self.config_path), "--log-level", "WARNING", "status",
             "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return dict(json.loads(out.stdout))

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no sidecar log)"


# ------------------------------------------------------------------ query


def similar_studies(port: int, reference: str, k: int) -> list[Dataset]:
    """Similarity C-FIND at STUDY level; the Pending identifiers in rank order."""
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientID", "StudyDate", "StudyDescription",
                    "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
        setattr(ident, keyword, "")
    block = ident.private_block(0x0099, CREATOR, create=True)
    block.add_new(0x02, "UI", reference)
    block.add_new(0x04, "US", k)
    ae = AE(ae_title="DEMO")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=SIDECAR_AE)
    if not assoc.is_established:
        raise RuntimeError("the sidecar refused the association")
    hits: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(
            ident, StudyRootQueryRetrieveInformationModelFind
        ):
            if "Status" not in status:
                raise RuntimeError("C-FIND: association aborted")
            if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                hits.append(identifier)
            elif status.Status != 0x0000:
                raise RuntimeError(f"C-FIND failed: 0x{status.Status:04X} "
                                   f"{status.get('ErrorComment', '')}")
    finally:
        assoc.release()
    return hits


def print_table(hits: list[Dataset]) -> None:
    rows = [("rank", "score", "study description", "patient", "mod", "date",
             "study instance UID (end)")]
    for ds in hits:
        blk = ds.private_block(0x0099, CREATOR)
        modalities = ds.get("ModalitiesInStudy", "")
        if not isinstance(modalities, str):
            modalities = "\\".join(modalities)
        rows.append((
            str(blk[0x11].value), f"{blk[0x10].value:.4f}", str(ds.StudyDescription),
            str(ds.PatientID), modalities, str(ds.StudyDate),
            "..." + str(ds.StudyInstanceUID)[-16:],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 1}
    for n, row in enumerate(rows):
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


# ------------------------------------------------------------------ main


def explorer_config(sidecar: SidecarProcess) -> dict[str, Any]:
    """Orthanc Explorer on, and the Similar studies button when the Python plugin is here."""
    extra: dict[str, Any] = {"OrthancExplorerEnabled": True}
    if PYTHON_PLUGIN.exists():
        url = f"http://127.0.0.1:{sidecar.http_port}"
        extra.update({"Plugins": [str(PYTHON_PLUGIN)], "PythonScript": str(EXPLORER_SCRIPT),
                      "PacsSidecar": {"Url": url, "PageUrl": url, "Top": 5}})
    return extra


def run(workdir: Path, *, wait: bool = False) -> None:
    total = len(STUDIES) * SLICES
    sidecar = SidecarProcess(workdir)
    pacs: OrthancPacs | None = None
    try:
        print("starting the sidecar (sidecar serve, shipped model) ...", flush=True)
        sidecar.start()
        pacs = orthanc = OrthancPacs(
            workdir / "orthanc", ae_title=ORTHANC_AE, stable_age=2,
            sidecar=Modality(SIDECAR_AE, "127.0.0.1", sidecar.port),
            extra=explorer_config(sidecar),
        )
        print("starting Orthanc (forwards every stable study to the sidecar) ...", flush=True)
        orthanc.start()
        print(f"Orthanc {orthanc.get('/system')['Version']} is up, AE {ORTHANC_AE}; "
              f"sidecar AE {SIDECAR_AE} is its modality 'sidecar'")

        print(f"uploading {len(STUDIES)} synthetic CT studies ({total} slices) "
              "to Orthanc's REST API ...", flush=True)
        for study in STUDIES:
            for ds in slices(study):
                orthanc.upload(part10(ds))

        def forwarded() -> bool:
            jobs = [j for j in orthanc.jobs() if j["Type"] == "DicomModalityStore"]
            failed = [j for j in jobs if j["State"] == "Failure"]
            if failed:
                raise RuntimeError(f"Orthanc could not forward a study: {failed[0]}")
            return bool(sum(j["State"] == "Success" for j in jobs) >= len(STUDIES))

        wait_until(forwarded, timeout=120, interval=0.5, what="Orthanc to forward the studies")
        print(f"Orthanc found the {len(STUDIES)} studies stable and sent them to the sidecar")

        def embedded() -> dict[str, Any] | None:
            st = sidecar.status()
            done = st["instances"].get("embedded", 0) == total and st["studies"] == len(STUDIES)
            return st if done else None

        st = wait_until(embedded, timeout=180, interval=1.0, what="the sidecar to embed")
        model = st["active_model_id"]
        print(f"the sidecar embedded {st['instances_total']} instances "
              f"of {st['studies']} studies (model {model})")

        k = 5
        reference = uid(QUERY.key, "study")
        print()
        print(f"Similarity C-FIND to {SIDECAR_AE}: studies like {QUERY.description!r} "
              f"of {QUERY.patient_id} (top {k}; the patient's own studies are left out)")
        print()
        hits = similar_studies(sidecar.port, reference, k)
        print_table(hits)
        retrieve = sorted({str(ds.get("RetrieveAETitle", "")) for ds in hits})
        print()
        print(f"RetrieveAETitle in every response: {', '.join(retrieve)} "
              "(retrieve the hits from the PACS by C-MOVE)")
        found = orthanc.request("POST", "/tools/lookup", reference.encode(),
                                content_type="text/plain")
        orthanc_id = next(f["ID"] for f in found if f["Type"] == "Study")
        print()
        button = ("with the Similar studies button" if PYTHON_PLUGIN.exists() else
                  "(apt-get install orthanc-python for the Similar studies button)")
        print(f"Orthanc Explorer, the query's study {button}:")
        print(f"  {orthanc.url}/app/explorer.html#study?uuid={orthanc_id}")
        print("The sidecar's page for the same study:")
        print(f"  http://127.0.0.1:{sidecar.http_port}/ui/studies/{reference}")
        if wait:
            print("both keep running: press Enter (or Ctrl-C) to stop", flush=True)
            try:
                input()
            except EOFError:
                pass
        else:
            print("(scripts/demo.py --wait, or make demo DEMO_ARGS=--wait, keeps them running)")
    except Exception:
        if pacs is not None:
            print(f"--- Orthanc log (last lines) ---\n{pacs.log_tail()}", file=sys.stderr)
        print(f"--- sidecar log (last lines) ---\n{sidecar.log_tail()}", file=sys.stderr)
        raise
    finally:
        print("stopping Orthanc and the sidecar ...", flush=True)
        if pacs is not None:
            pacs.stop()
        sidecar.stop()
        print("stopped", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configurations, logs, data)")
    parser.add_argument("--wait", action="store_true",
                        help="keep Orthanc and the sidecar running until Enter, to open the pages")
    args = parser.parse_args()
    if not orthanc_available():
        print("demo: Orthanc is not installed (/usr/sbin/Orthanc); as root, "
              "'make demo' installs it with apt (scripts/setup.sh --test)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pacs-sidecar-demo-"))
    try:
        run(workdir, wait=args.wait)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    except (OrthancError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        print(f"demo: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
