"""Ingest benchmark: DCMTK ``storescu`` into DCMTK ``storescp``, Orthanc and ``sidecar serve``.

Run with ``make bench-ingest`` (or ``.venv/bin/python bench/ingest.py --quick`` for a
fast check). What it does, in order:

1. Generates ``--count`` (default 1000) synthetic CT Image Storage instances, 512x512
   uint16 (~0.5 MB each), Explicit VR Little Endian, one patient/study/series,
   deterministic for a given ``--seed``, into a temporary directory that is reused
   by every run. Files are hard-linked into one folder per association, so each
   ``storescu`` process gets its share by ``+sd`` (no argv limits).
2. For each repeat, for each association count (default 1 and 4), runs the
   receivers alternately: ``/usr/bin/storescp`` first, then Orthanc (when
   installed; not with ``--tls``), then ``sidecar serve``.
   Every run starts a fresh receiver process on a free loopback port with a fresh,
   empty output directory, waits until it answers ``/usr/bin/echoscu`` (no fixed
   sleeps; for the sidecar also until it has logged "sidecar ready", which it does
   once every receiving process listens), then times ``storescu`` from the launch
   of the first process to the exit of the last. Dirty pages are flushed
   (``sync``) before each run, outside the timing, so no run pays for the
   previous run's writes.
3. After each run the receiver is stopped and its output is verified: the set of
   SOP Instance UIDs received must equal the set sent (nothing missing, nothing
   extra), a few files are compared byte for byte (data set part) with the
   source, and for the sidecar ``sidecar status --json`` must count exactly N
   instances and no file may be in quarantine. Any discrepancy, any ``storescu``
   exit code other than 0, or a receiver that dies, aborts the benchmark with
   exit code 1: a benchmark that silently loses instances is worthless.
4. Prints machine facts, one line per run, then a table of median (min/max)
   instances/s per receiver and association count, the ratios sidecar/storescp
   (goal >= 0.5) and sidecar/Orthanc (issue 20: >= 1.0 on one association, >= 0.8
   on four, durability on), and whether each goal is met. The exit code is 0
   whether the goals are met or not.

Receivers
---------
* storescp: ``--fork`` (one child process per association), ``+B`` (bit-preserving:
  the data set is written exactly as received), ``-pdu 131072`` (largest allowed),
  ``-dhl`` (no reverse DNS). It does not fsync: it is the speed reference.
* Orthanc (``/usr/sbin/Orthanc``, the Debian package, through
  ``scripts/orthanc_pacs.py``): ``SyncStorageArea: true`` (it fsyncs each file
  before answering, and its SQLite index commits), no compression, the senders
  registered as modalities, ``TCP_NODELAY=1`` in its environment. The peer whose
  promises match ours: it is the PACS that forwards to the sidecar.
* sidecar: a generated configuration with ``storage.fsync: true`` (every file and
  its directory fsynced and the SQLite row committed before Success is sent),
  ``storage.min_free_mb: 16``, ``logging.level: WARNING``; other settings are the
  schema defaults (``max_pdu_size: 0`` unlimited, ``tcp_nodelay: true``).
  ``SIDECAR__*`` and ``SIDECAR_CONFIG`` in the caller's environment are ignored so
  that a stray override cannot change the figures; use ``--sidecar-set
  section.key=value`` for a deliberate override (it is printed in the report).

``--tls``: both receivers serve mutual TLS with a throw-away PKI made by
``scripts/tls_pki.py`` (``storescp +tls``; the sidecar's ``dicom.tls``), and
``storescu``/``echoscu`` present a client certificate.

Both receivers get unique AE titles and kernel-chosen ports, because other people's
tests may run DICOM traffic on this machine at the same time; stray instances would
show up as "extra" in the verification and fail the run.

Senders: ``TCP_NODELAY=1 /usr/bin/storescu --max-send-pdu 131072`` (Nagle otherwise
makes DCMTK ~10x slower). DCMTK tools are always called by full path because the
virtualenv ships pynetdicom console scripts with the same names.

CPU figures per run: receiver CPU (the process plus its forked children, from
/proc), sender CPU (rusage of the reaped ``storescu`` processes) and "other" CPU
(whole-machine busy time from /proc/stat during the run minus both and minus this
script: other people's processes, plus kernel threads such as writeback and the
journal), each as a percentage of one core over the run's wall time. A high
"other" means a noisy machine: trust the ratios more than the absolute figures.

Every process started here is stopped (SIGTERM to the process, as ``kill PID``
would, then SIGKILL to its whole process group after a grace period) and every
temporary directory removed, also on error and on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.orthanc_pacs import (  # noqa: E402 - the repository on the path first
    ORTHANC_BINARY,
    Modality,
    OrthancPacs,
    orthanc_available,
)
from scripts.tls_pki import Pki, make_pki  # noqa: E402

DCMTK = Path("/usr/bin")
STORESCU = DCMTK / "storescu"
STORESCP = DCMTK / "storescp"
ECHOSCU = DCMTK / "echoscu"
MAX_PDU = 131072  # the largest DCMTK accepts, for sending and receiving
ROWS = COLS = 512
GOAL_RATIO = 0.5
#: Issue 20's goals against Orthanc (durability on): by association count, "others" for 4+.
ORTHANC_GOALS = {1: 1.0, "others": 0.8}
RECEIVERS = ("storescp", "orthanc", "sidecar")
SPOT_CHECKS = 3  # files per run compared byte for byte with the source
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not produce a trustworthy figure."""


# ----------------------------------------------------------------- helpers
def log(msg: str = "") -> None:
    print(msg, flush=True)


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> int | None:
    """SIGTERM the process (as ``kill PID`` would), wait, then SIGKILL its whole
    process group (forked or spawned children included); returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    # Children (storescp --fork) may outlive their parent: the group goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def dataset_offset(data: bytes) -> int:
    """Offset of the data set in a Part-10 file image (end of the File Meta group)."""
    if data[128:132] != b"DICM":
        raise BenchError("not a DICOM Part-10 file")
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                b"UR", b"UT", b"UV"}
    pos = 132
    while pos + 8 <= len(data) and int.from_bytes(data[pos : pos + 2], "little") == 0x0002:
        vr = data[pos + 4 : pos + 6]
        if vr in long_vrs:
            length = int.from_bytes(data[pos + 8 : pos + 12], "little")
            pos += 12 + length
        else:
            length = int.from_bytes(data[pos + 6 : pos + 8], "little")
            pos += 8 + length
    return pos


# ------------------------------------------------------------- generation
@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    path: Path


def _template(study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "pacs-sidecar bench"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "ingest benchmark"
    ds.SeriesDescription = "synthetic axial"
    ds.PatientName = "BENCH^INGEST"
    ds.PatientID = "BENCH-INGEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLS
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def generate(root: Path, count: int, seed: int) -> list[Instance]:
    """Write ``count`` deterministic CT instances under ``root/all``."""
    ns = f"pacs-sidecar bench/ingest seed={seed}"
    study_uid = generate_uid(entropy_srcs=[ns, "study"])
    series_uid = generate_uid(entropy_srcs=[ns, "series"])
    ds = _template(study_uid, series_uid, generate_uid(entropy_srcs=[ns, "frame"]))
    rng = np.random.default_rng(seed)
    # A cheap phantom: a body ellipse (soft tissue), a sphere whose cross-section
    # changes with the slice, and noise taken from a shifted window of one pool.
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    body = ((xx - 256) / 200) ** 2 + ((yy - 256) / 150) ** 2 <= 1.0
    base = np.where(body, 1024 + 40, 1024 - 1000).astype(np.uint16)
    r2 = (xx - 300) ** 2 + (yy - 220) ** 2
    pool = rng.integers(0, 40, size=ROWS * COLS * 2, dtype=np.uint16)
    offsets = rng.integers(0, ROWS * COLS, size=count)
    out = root / "all"
    out.mkdir(parents=True)
    instances = []
    width = len(str(count))
    for i in range(count):
        z = i - count / 2
        radius2 = max(0.0, 80.0**2 - (z * 0.4) ** 2)
        img = base.copy()
        img[(r2 <= radius2) & body] = 1024 + 300
        img += pool[offsets[i] : offsets[i] + ROWS * COLS].reshape(ROWS, COLS)
        uid = generate_uid(entropy_srcs=[ns, "instance", str(i)])
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-179.2, -179.2, round(z, 1)]
        ds.SliceLocation = round(z, 1)
        ds.PixelData = img.astype("<u2").tobytes()
        path = out / f"{i + 1:0{width}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(Instance(uid, path))
    return instances


def partition(root: Path, instances: Sequence[Instance], parts: int) -> list[Path]:
    """Hard-link the files into ``parts`` folders of (nearly) equal size."""
    dirs = []
    for k, chunk in enumerate(np.array_split(np.arange(len(instances)), parts)):
        d = root / f"x{parts}" / f"part{k}"
        d.mkdir(parents=True)
        for j in chunk:
            src = instances[int(j)].path
            os.link(src, d / src.name)
        dirs.append(d)
    return dirs


# ------------------------------------------------------------ CPU accounting
def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            kids.extend(int(x) for x in (task / "children").read_text().split())
    return kids


@dataclass
class TreeSnapshot:
    times: dict[int, float]  # per process of the tree: utime+stime+cutime+cstime (s)
    alive_descendants: int  # not counting zombies


def tree_snapshot(pid: int) -> TreeSnapshot:
    """CPU times of a process and all its descendants (zombies included).

    A process's reaped children are in its cutime/cstime and unreaped ones are
    listed separately, so summing all four fields over the tree counts each
    CPU second once.
    """
    times: dict[int, float] = {}
    alive = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        f = _stat(p)
        if f is None or p in times:
            continue
        times[p] = sum(int(x) for x in f[11:15]) / CLK_TCK
        if p != pid:
            alive += f[0] != "Z"
        todo.extend(_children(p))
    return TreeSnapshot(times, alive)


def tree_cpu(a: TreeSnapshot, b: TreeSnapshot) -> float:
    """CPU seconds used by a process tree between two snapshots.

    Processes of ``a`` missing from ``b`` were reaped by a member of the tree,
    so their final times are already in that member's cutime/cstime.
    """
    return sum(b.times.values()) - sum(a.times.values())


def machine_busy() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(v[:8])  # guest time is already in user
    return (total - v[3] - v[4]) / CLK_TCK, v[4] / CLK_TCK


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class ChildWatcher(threading.Thread):
    """Records the distinct child processes of a receiver (storescp --fork)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.seen: set[int] = set()
        self.max_alive = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.02):
            kids = _children(self.pid)
            self.seen.update(kids)
            alive = sum(1 for k in kids if (f := _stat(k)) is not None and f[0] != "Z")
            self.max_alive = max(self.max_alive, alive)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# ---------------------------------------------------------------- receivers
class Receiver:
    """A receiver process on a free loopback port with its own output directory."""

    name = ""
    ready_marker = ""  # a line the receiver logs once fully started ("" = none)

    def __init__(self, run_dir: Path, ready_timeout: float, pki: Pki | None = None) -> None:
        self.run_dir = run_dir
        self.ready_timeout = ready_timeout
        self.pki = pki
        self.ae_title = ""
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = run_dir / f"{self.name}.log"
        self.exit_code: int | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        for attempt in range(3):
            self.port = free_port()
            cmd = self.command()
            with self.log_path.open("ab") as logf:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    env=self.env(), start_new_session=True, cwd=self.run_dir,
                )
            try:
                self._wait_ready()
                return
            except BenchError:
                if self.proc.poll() is None or attempt == 2:
                    raise
                # It exited: most likely the port was taken in the meantime; retry.
                log(f"    {self.name} exited at start (attempt {attempt + 1}), retrying")

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        cmd = [str(ECHOSCU), *self.client_tls(), "-to", "5", "-aet", "BENCHECHO",
               "-aec", self.ae_title, "127.0.0.1", str(self.port)]
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.proc.returncode} "
                                 f"before it was ready; log:\n{tail(self.log_path)}")
            try:
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=dcmtk_env(),
                                    timeout=30).returncode
            except subprocess.TimeoutExpired:
                rc = -1
            marker = not self.ready_marker or \
                self.ready_marker in self.log_path.read_text(errors="replace")
            if rc == 0 and marker:
                return
            if time.monotonic() > deadline:
                what = "answer C-ECHO" if rc != 0 else f"log {self.ready_marker!r}"
                raise BenchError(f"{self.name} did not {what} on port {self.port} within "
                                 f"{self.ready_timeout:.0f} s; log:\n{tail(self.log_path)}")
            time.sleep(0.1)  # poll interval

    def client_tls(self) -> list[str]:
        """DCMTK client options for this receiver (with ``--tls``: the client certificate)."""
        if self.pki is None:
            return []
        return ["+tls", str(self.pki.client_key), str(self.pki.client_cert),
                "+cf", str(self.pki.ca)]

    def stop(self) -> None:
        if self.proc is not None:
            self.exit_code = stop_process(self.proc)

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> received file."""
        raise NotImplementedError

    def extra_checks(self, expected: int) -> list[str]:
        return []


class StoreSCP(Receiver):
    name = "storescp"

    def __init__(self, run_dir: Path, ready_timeout: float, pki: Pki | None = None) -> None:
        super().__init__(run_dir, ready_timeout, pki)
        self.ae_title = f"SCP{secrets.token_hex(4).upper()}"
        self.out_dir = run_dir / "out"
        self.out_dir.mkdir()

    def command(self) -> list[str]:
        tls = [] if self.pki is None else [
            "+tls", str(self.pki.server_key), str(self.pki.server_cert), "+cf", str(self.pki.ca)]
        return [str(STORESCP), "--fork", "+B", "-pdu", str(MAX_PDU), "-dhl", *tls,
                "-aet", self.ae_title, "-od", str(self.out_dir), str(self.port)]

    def env(self) -> dict[str, str]:
        return dcmtk_env()

    def received(self) -> dict[str, Path]:
        # Bit-preserving mode names files <modality>.<SOP Instance UID>.
        return {p.name.partition(".")[2] or p.name: p
                for p in self.out_dir.iterdir() if p.is_file()}


class OrthancReceiver(Receiver):
    """Orthanc (the Debian package) as the PACS peer: it fsyncs every file
    (``SyncStorageArea: true``) and commits its SQLite index before it answers,
    as the sidecar does; ``TCP_NODELAY=1`` in its environment (DCMTK's network
    layer otherwise waits on Nagle and Orthanc measures ~10x slower)."""

    name = "orthanc"

    def __init__(self, run_dir: Path, ready_timeout: float, pki: Pki | None = None) -> None:
        super().__init__(run_dir, ready_timeout, pki)
        self.ae_title = f"OR{secrets.token_hex(4).upper()}"
        self.pacs: OrthancPacs | None = None

    def command(self) -> list[str]:
        self.pacs = OrthancPacs(
            self.run_dir / "orthanc", ae_title=self.ae_title, dicom_port=self.port,
            http_port=free_port(),
            modalities={"bench": Modality("BENCHSCU", "127.0.0.1", 104),
                        "echo": Modality("BENCHECHO", "127.0.0.1", 104)},
            extra={"SyncStorageArea": True, "StorageCompression": False,
                   "DicomThreadsCount": 8, "LogExportedResources": False,
                   "KeepAlive": True, "StorageAccessOnFind": "Never"},
        )
        return [ORTHANC_BINARY, "--no-jobs", str(self.pacs.write_config())]

    def env(self) -> dict[str, str]:
        return {**os.environ, "TCP_NODELAY": "1"}

    def received(self) -> dict[str, Path]:
        from pydicom import dcmread  # noqa: PLC0415 - only to name Orthanc's files

        assert self.pacs is not None
        out: dict[str, Path] = {}
        for p in (self.pacs.workdir / "storage").glob("*/*/*"):
            if p.is_file():
                ds = dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                out[str(ds.SOPInstanceUID)] = p
        return out


class SidecarServe(Receiver):
    name = "sidecar"
    ready_marker = "sidecar ready:"

    def __init__(self, run_dir: Path, ready_timeout: float, exe: Path,
                 overrides: dict[str, str], pki: Pki | None = None) -> None:
        super().__init__(run_dir, ready_timeout, pki)
        self.exe = exe
        self.overrides = overrides
        self.ae_title = f"SC{secrets.token_hex(4).upper()}"
        self.data_dir = run_dir / "data"
        self.config_path = run_dir / "sidecar.yaml"
        self.status: dict[str, Any] = {}

    def command(self) -> list[str]:
        cfg = {
            "dicom": {"ae_title": self.ae_title, "bind_address": "127.0.0.1",
                      "port": self.port},
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 16, "fsync": True},
            "logging": {"level": "WARNING"},
        }
        if self.pki is not None:
            cfg["dicom"]["tls"] = {
                "enabled": True, "certificate": str(self.pki.server_cert),
                "private_key": str(self.pki.server_key), "ca_certificates": str(self.pki.ca)}
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return [str(self.exe), "--config", str(self.config_path), "serve"]

    def env(self) -> dict[str, str]:
        return sidecar_env(self.overrides)

    def received(self) -> dict[str, Path]:
        storage = self.data_dir / "storage"
        got: dict[str, Path] = {}
        for p in storage.rglob("*"):
            if p.is_file() and ".tmp" not in p.relative_to(storage).parts:
                got[p.name.removesuffix(".dcm")] = p
        return got

    def extra_checks(self, expected: int) -> list[str]:
        problems = []
        leftovers = [p for p in (self.data_dir / "storage" / ".tmp").glob("*") if p.is_file()]
        if leftovers:
            problems.append(f"{len(leftovers)} temporary file(s) left in storage/.tmp")
        quarantined = [p for p in (self.data_dir / "quarantine").glob("*") if p.is_file()]
        if quarantined:
            problems.append(f"{len(quarantined)} file(s) in quarantine")
        try:
            res = subprocess.run(
                [str(self.exe), "--config", str(self.config_path), "status", "--json"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                env=sidecar_env(self.overrides), timeout=120,
            )
        except subprocess.TimeoutExpired:
            return [*problems, "sidecar status --json timed out"]
        if res.returncode != 0:
            return [*problems, f"sidecar status --json failed ({res.returncode}): "
                               f"{res.stderr.strip()[-2000:]}"]
        status = json.loads(res.stdout)
        self.status = status
        if status["instances_total"] != expected:
            problems.append(f"sidecar status: instances_total {status['instances_total']} "
                            f"!= {expected} ({status['instances']})")
        if status["studies"] != 1 or status["series"] != 1:
            problems.append(f"sidecar status: {status['studies']} studies, "
                            f"{status['series']} series (expected 1 and 1)")
        return problems


def sidecar_env(overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SIDECAR__") and k != "SIDECAR_CONFIG"}
    env.update(overrides)
    return env


# ------------------------------------------------------------------ one run
@dataclass
class RunResult:
    receiver: str
    associations: int
    repeat: int
    count: int
    seconds: float
    instances_per_s: float
    receiver_cpu_pct: float
    senders_cpu_pct: float
    other_cpu_pct: float
    iowait_pct: float
    receiver_children: int
    receiver_max_alive_children: int
    receiver_exit_code: int | None
    receiver_log_warnings: int
    started_at: str


def send(receiver: Receiver, dirs: Sequence[Path], run_dir: Path,
         timeout: float) -> tuple[float, float]:
    """Run one storescu per directory in parallel; returns (wall s, sender CPU s)."""
    env = dcmtk_env()
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        t0 = time.perf_counter()
        for k, d in enumerate(dirs):
            logp = run_dir / f"storescu{k}.log"
            with logp.open("wb") as logf:
                procs.append((subprocess.Popen(
                    [str(STORESCU), *receiver.client_tls(), "--max-send-pdu", str(MAX_PDU),
                     "-aet", "BENCHSCU",
                     "-aec", receiver.ae_title, "+sd", "127.0.0.1", str(receiver.port), str(d)],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                ), logp))
        deadline = time.monotonic() + timeout
        for p, _ in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"storescu did not finish within {timeout:.0f} s") from exc
        wall = time.perf_counter() - t0
    finally:
        for p, _ in procs:
            stop_process(p, grace=5.0)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    bad = [(p.returncode, logp) for p, logp in procs if p.returncode != 0]
    if bad:
        rc, logp = bad[0]
        raise BenchError(f"{len(bad)} of {len(procs)} storescu process(es) failed; first "
                         f"exit code {rc}, log {logp.name}:\n{tail(logp)}\n"
                         f"{receiver.name} log:\n{tail(receiver.log_path)}")
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return wall, cpu


def verify(receiver: Receiver, instances: Sequence[Instance], run_no: str) -> None:
    expected = {i.sop_instance_uid: i for i in instances}
    got = receiver.received()
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} instances missing "
                        f"(e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected instance(s) received (another sender on "
                        f"this port? e.g. {extra[0]})")
    if not missing:
        n = len(instances)
        picks = sorted({0, n // 2, n - 1})[:SPOT_CHECKS]
        for j in picks:
            inst = instances[j]
            src = inst.path.read_bytes()
            dst = got[inst.sop_instance_uid].read_bytes()
            if src[dataset_offset(src):] != dst[dataset_offset(dst):]:
                problems.append(f"data set of {inst.path.name} differs from the received copy")
    problems += receiver.extra_checks(len(expected))
    if problems:
        raise BenchError(f"{run_no} {receiver.name}: verification failed:\n  - "
                         + "\n  - ".join(problems) + f"\nreceiver log:\n{tail(receiver.log_path)}")


def count_log_warnings(path: Path) -> int:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines()
               if " WARNING " in line or " ERROR " in line or "Traceback" in line
               or line.startswith(("W: ", "E: ", "F: ")))


def run_once(kind: str, assoc: int, repeat: int, dirs: Sequence[Path],
             instances: Sequence[Instance], work: Path, args: argparse.Namespace,
             run_no: str) -> RunResult:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-x{assoc}-r{repeat}-", dir=work))
    receiver: Receiver
    if kind == "storescp":
        receiver = StoreSCP(run_dir, args.ready_timeout, args.pki)
    elif kind == "orthanc":
        receiver = OrthancReceiver(run_dir, args.ready_timeout)
    else:
        receiver = SidecarServe(run_dir, args.ready_timeout, args.sidecar_exe,
                                args.sidecar_overrides, args.pki)
    watcher: ChildWatcher | None = None
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        os.sync()  # start every run with no dirty pages from the previous one
        receiver.start()
        assert receiver.proc is not None
        pid = receiver.proc.pid
        watcher = ChildWatcher(pid)
        snap0 = tree_snapshot(pid)
        busy0, iow0 = machine_busy()
        self0 = _self_cpu()
        watcher.start()
        wall, senders_cpu = send(receiver, dirs, run_dir, args.timeout)
        busy1, iow1 = machine_busy()
        self1 = _self_cpu()
        snap1 = tree_snapshot(pid)
        watcher.stop()
        watcher.seen.update(k for k in snap1.times if k != pid)
        receiver_cpu = tree_cpu(snap0, snap1)
        if receiver.proc.poll() is not None:
            raise BenchError(f"{kind} died during the run (exit code "
                             f"{receiver.proc.returncode}); log:\n{tail(receiver.log_path)}")
        receiver.stop()
        verify(receiver, instances, run_no)
        other = max(0.0, (busy1 - busy0) - receiver_cpu - senders_cpu - (self1 - self0))
        return RunResult(
            receiver=kind, associations=assoc, repeat=repeat, count=len(instances),
            seconds=wall, instances_per_s=len(instances) / wall,
            receiver_cpu_pct=100 * receiver_cpu / wall,
            senders_cpu_pct=100 * senders_cpu / wall,
            other_cpu_pct=100 * other / wall,
            iowait_pct=100 * (iow1 - iow0) / wall,
            receiver_children=len(watcher.seen),
            receiver_max_alive_children=watcher.max_alive,
            receiver_exit_code=receiver.exit_code,
            receiver_log_warnings=count_log_warnings(receiver.log_path),
            started_at=started_at,
        )
    finally:
        if watcher is not None and watcher.is_alive():
            watcher.stop()
        receiver.stop()
        if args.keep:
            log(f"    kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------ machine facts
def machine_facts(work: Path) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    mem_kb = next((int(line.split()[1]) for line in
                   Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    dcmtk = subprocess.run([str(STORESCU), "--version"], capture_output=True, text=True)
    dcmtk_line = (dcmtk.stdout.strip().splitlines() or ["unknown"])[0].strip("$ ")
    fs = "unknown"
    best = ""
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype = line.split()[:3]
        if str(work).startswith(mnt) and len(mnt) >= len(best):
            best, fs = mnt, f"{fstype} ({dev} on {mnt})"
    versions = {}
    from importlib import metadata
    for dist in ("pacs-sidecar", "pynetdicom", "pydicom", "SQLAlchemy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    # --no-optional-locks: read only, never touches the index others may be using.
    changed = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "status",
                              "--porcelain", "--", "sidecar", "config", "pyproject.toml"],
                             capture_output=True, text=True).stdout.splitlines()
    src = hashlib.sha256()
    for path in sorted((REPO / "sidecar").rglob("*.py")):
        src.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "avx2": "avx2" in flags,
        "mem_total_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dcmtk": dcmtk_line,
        "packages": versions,
        "git_commit": commit,
        "sidecar_changed_files": len(changed),
        "sidecar_source_sha256": src.hexdigest()[:12],
        "workdir": str(work),
        "workdir_filesystem": fs,
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------- main
def sidecar_overrides(p: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """``--sidecar-set SECTION.KEY=VALUE`` items as ``SIDECAR__SECTION__KEY`` variables."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            p.error(f"--sidecar-set wants SECTION.KEY=VALUE, got {item!r}")
        out["SIDECAR__" + key.upper().replace(".", "__")] = value
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="DCMTK storescu -> storescp, Orthanc and sidecar serve: instances/s and "
                    "ratios.")
    p.add_argument("--count", type=int, default=None,
                   help="instances to generate and send per run (default 1000)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats of each (receiver, associations) pair (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="fast check: --count 200 --repeats 1 unless given")
    p.add_argument("--associations", default="1,4",
                   help="comma-separated association counts (default 1,4)")
    p.add_argument("--seed", type=int, default=20240101, help="generation seed")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write the results as JSON to PATH")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the temporary directories (default: system temp dir); "
                        "the receivers write here, so it decides which disk is measured")
    p.add_argument("--sidecar-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a sidecar setting (e.g. storage.fsync=false); repeatable")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds allowed for one run's senders (default 600)")
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds allowed for a receiver to answer C-ECHO (default 60)")
    p.add_argument("--tls", action="store_true",
                   help="both receivers serve DICOM over TLS (mutual, a throw-away PKI made with "
                        "openssl; storescu and echoscu present a client certificate)")
    p.add_argument("--keep", action="store_true",
                   help="keep run directories (logs, received files) for inspection")
    p.add_argument("--profile", action="store_true",
                   help="instead: where one C-STORE's time goes, stage by stage, in an "
                        "in-process node on one association (bench/ingest_profile.py)")
    args = p.parse_args(argv)
    if args.count is None:
        args.count = 200 if args.quick else 1000
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.count < 1 or args.repeats < 1:
        p.error("--count and --repeats must be at least 1")
    try:
        args.assoc_counts = [int(x) for x in args.associations.split(",") if x.strip()]
    except ValueError:
        p.error("--associations must be integers separated by commas")
    if not args.assoc_counts or min(args.assoc_counts) < 1 or max(args.assoc_counts) > 16:
        p.error("--associations must be between 1 and 16")
    if max(args.assoc_counts) > args.count:
        p.error("more associations than instances")
    args.sidecar_overrides = sidecar_overrides(p, args.sidecar_set)
    return args


def find_sidecar() -> Path:
    for cand in (Path(sys.executable).parent / "sidecar", REPO / ".venv" / "bin" / "sidecar"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    raise BenchError("cannot find the sidecar command next to this Python or in .venv/bin")


def _fmt(x: float) -> str:
    return f"{x:7.1f}"


def summarise(runs: Sequence[RunResult], assoc_counts: Sequence[int],
              fsync_on: bool, receivers: Sequence[str] = RECEIVERS) -> dict[str, Any]:
    summary: dict[str, Any] = {"by_receiver": [], "ratios": []}
    log()
    log(f"{'receiver':<9} {'assoc':>5} {'median':>9} {'min':>7} {'max':>7} {'runs':>4} "
        f"{'recv CPU%':>9} {'send CPU%':>9} {'other%':>6}  (instances/s; CPU% of one core)")
    medians: dict[tuple[str, int], float] = {}
    for a in assoc_counts:
        for kind in receivers:
            sel = [r for r in runs if r.receiver == kind and r.associations == a]
            if not sel:
                continue
            ips = [r.instances_per_s for r in sel]
            med = statistics.median(ips)
            medians[(kind, a)] = med
            row = {
                "receiver": kind, "associations": a, "runs": len(sel),
                "median_instances_per_s": med, "min_instances_per_s": min(ips),
                "max_instances_per_s": max(ips),
                "median_receiver_cpu_pct": statistics.median(r.receiver_cpu_pct for r in sel),
                "median_senders_cpu_pct": statistics.median(r.senders_cpu_pct for r in sel),
                "median_other_cpu_pct": statistics.median(r.other_cpu_pct for r in sel),
            }
            summary["by_receiver"].append(row)
            log(f"{kind:<9} {a:>5} {med:9.1f} {_fmt(min(ips))} {_fmt(max(ips))} {len(sel):>4} "
                f"{row['median_receiver_cpu_pct']:9.0f} {row['median_senders_cpu_pct']:9.0f} "
                f"{row['median_other_cpu_pct']:6.0f}")
    log()
    durability = "durability on" if fsync_on else "durability OFF: storage.fsync=false"
    for a in assoc_counts:
        if ("storescp", a) not in medians or ("sidecar", a) not in medians:
            continue
        ratio = medians[("sidecar", a)] / medians[("storescp", a)]
        met = ratio >= GOAL_RATIO
        summary["ratios"].append({"associations": a, "ratio": ratio, "goal": GOAL_RATIO,
                                  "met": met, "fsync": fsync_on})
        log(f"ratio sidecar/storescp, {a} association{'s' if a > 1 else ''}: {ratio:.2f}   "
            f"goal ratio >= {GOAL_RATIO}: {'MET' if met else 'NOT MET'} ({durability})")
    for a in assoc_counts:
        if ("orthanc", a) not in medians or ("sidecar", a) not in medians:
            continue
        ratio = medians[("sidecar", a)] / medians[("orthanc", a)]
        goal = float(ORTHANC_GOALS.get(a, ORTHANC_GOALS["others"]))
        met = ratio >= goal
        summary["ratios"].append({"associations": a, "peer": "orthanc", "ratio": ratio,
                                  "goal": goal, "met": met, "fsync": fsync_on})
        log(f"ratio sidecar/Orthanc,  {a} association{'s' if a > 1 else ''}: {ratio:.2f}   "
            f"goal ratio >= {goal}: {'MET' if met else 'NOT MET'} ({durability}; Orthanc "
            "fsyncs too)")
    return summary


def print_header(
    name: str, facts: dict[str, Any], work: Path, args: argparse.Namespace, plan: str
) -> None:
    """The facts every benchmark prints first, so its figures can be reproduced."""
    log(f"pacs-sidecar {name} benchmark")
    log(f"  machine: {facts['nproc']} CPUs ({facts['cpu_model']}, avx2={facts['avx2']}), "
        f"{facts['mem_total_gib']} GiB, kernel {facts['kernel']}")
    log(f"  software: Python {facts['python']}, {facts['dcmtk']}, "
        + ", ".join(f"{k} {v}" for k, v in facts["packages"].items())
        + f", git {facts['git_commit']}")
    log(f"  sidecar code: sha256 {facts['sidecar_source_sha256']} of sidecar/**/*.py; "
        f"{facts['sidecar_changed_files']} file(s) differ from git {facts['git_commit']}")
    log(f"  disk: {facts['workdir_filesystem']}, workdir {work}")
    log("  load average at start: " + " ".join(f"{x:.2f}" for x in facts["loadavg_start"]))
    log(f"  plan: {plan}")
    if args.sidecar_overrides:
        log("  sidecar overrides: " + ", ".join(f"{k}={v}" for k, v in
                                                 args.sidecar_overrides.items()))
    ignored = sorted(k for k in os.environ if k.startswith("SIDECAR__") or k == "SIDECAR_CONFIG")
    if ignored:
        log(f"  ignored from the environment: {', '.join(ignored)}")


def run_benchmark(
    args: argparse.Namespace,
    tools: Sequence[Path],
    prefix: str,
    body: Callable[[argparse.Namespace, Path], int],
) -> int:
    """Check the DCMTK tools, run ``body(args, workdir)`` in a fresh temporary
    directory, turn SIGTERM/Ctrl-C and BenchError into clean exits, and always
    remove the directory (shared by every benchmark script)."""
    for tool in tools:
        if not tool.is_file():
            log(f"error: {tool} not found (install DCMTK: apt-get install dcmtk)")
            return 1

    def _on_sigterm(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_sigterm)
    # Also when started with SIGINT ignored (e.g. in the background of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = args.workdir.resolve() if args.workdir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        return body(args, work)
    except BenchError as exc:
        log(f"\nBENCHMARK FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("\ninterrupted; stopping processes and removing temporary files")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(
        parse_args(argv), (STORESCU, STORESCP, ECHOSCU), "bench-ingest-", _main
    )


def _main(args: argparse.Namespace, work: Path) -> int:
    args.sidecar_exe = find_sidecar()
    args.pki = make_pki(work / "pki") if args.tls else None
    fsync_on = str(args.sidecar_overrides.get("SIDECAR__STORAGE__FSYNC", "true")).lower() \
        not in ("false", "no", "off", "0")
    facts = machine_facts(work)
    need = args.count * 0.53e6 * 3
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"not enough free disk in {work}: {free / 2**30:.1f} GiB free, "
                         f"~{need / 2**30:.1f} GiB needed")

    print_header(
        "ingest", facts, work, args,
        f"{args.count} instances, associations {args.assoc_counts}, "
        f"{args.repeats} repeat(s); storescp (no fsync), Orthanc (SyncStorageArea) and "
        f"sidecar (fsync {'on' if fsync_on else 'OFF'}) alternately"
        + ("; both over TLS (mutual)" if args.tls else ""),
    )

    t0 = time.perf_counter()
    src = work / "src"
    instances = generate(src, args.count, args.seed)
    size = sum(i.path.stat().st_size for i in instances)
    digest = hashlib.sha256(b"".join(i.sop_instance_uid.encode() for i in instances))
    parts = {a: partition(src, instances, a) for a in args.assoc_counts}
    os.sync()
    log(f"  generated {len(instances)} CT instances ({size / 2**20:.0f} MiB, "
        f"{size / len(instances) / 1e6:.2f} MB each, Explicit VR LE) in "
        f"{time.perf_counter() - t0:.1f} s; UID set sha256 {digest.hexdigest()[:12]}")
    log()
    if args.profile:
        from bench.ingest_profile import run_profile  # noqa: PLC0415 - only for --profile

        return run_profile(args.count, STORESCU, [i.path for i in instances], dcmtk_env(), log)

    receivers = [k for k in RECEIVERS if k != "orthanc" or (orthanc_available()
                                                             and not args.tls)]
    if "orthanc" not in receivers:
        log("  note: Orthanc not measured (" + ("--tls" if args.tls else
            f"{ORTHANC_BINARY} not installed: apt-get install orthanc") + ")")
    runs: list[RunResult] = []
    total = args.repeats * len(args.assoc_counts) * len(receivers)
    n = 0
    for rep in range(1, args.repeats + 1):
        for a in args.assoc_counts:
            for kind in receivers:
                n += 1
                run_no = f"[{n}/{total}]"
                r = run_once(kind, a, rep, parts[a], instances, work, args, run_no)
                runs.append(r)
                kids = (f"  children {r.receiver_children} "
                        f"(max {r.receiver_max_alive_children} at once)")
                warn = f"  log warnings {r.receiver_log_warnings}" \
                    if r.receiver_log_warnings else ""
                if kind == "sidecar" and r.receiver_exit_code != 0:
                    warn += f"  (sidecar exit code {r.receiver_exit_code} on SIGTERM)"
                log(f"{run_no:>8} {kind:<8} x{a} rep {rep}: {r.count} in {r.seconds:6.2f} s = "
                    f"{r.instances_per_s:6.1f} inst/s  CPU% recv {r.receiver_cpu_pct:3.0f} "
                    f"send {r.senders_cpu_pct:3.0f} other {r.other_cpu_pct:3.0f} "
                    f"iowait {r.iowait_pct:3.0f}{kids}{warn}  verified")

    summary = summarise(runs, args.assoc_counts, fsync_on, receivers)
    facts["loadavg_end"] = os.getloadavg()
    log("  load average at end: " + " ".join(f"{x:.2f}" for x in facts["loadavg_end"]))
    noisy = [r for r in runs if r.other_cpu_pct > 25]
    if noisy:
        log(f"  note: {len(noisy)} of {len(runs)} runs saw other processes use > 25% of a "
            "core; the machine was not quiet, trust ratios more than absolute figures")
    if args.json:
        result = {
            "benchmark": "ingest",
            "date": dt.datetime.now(dt.UTC).isoformat(),
            "machine": facts,
            "params": {"count": args.count, "repeats": args.repeats,
                       "associations": args.assoc_counts, "seed": args.seed,
                       "instance_bytes_mean": size / len(instances),
                       "max_send_pdu": MAX_PDU, "storescp_max_pdu": MAX_PDU,
                       "sidecar_fsync": fsync_on, "tls": args.tls,
                       "sidecar_overrides": args.sidecar_overrides},
            "runs": [asdict(r) for r in runs],
            "summary": summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"  results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
