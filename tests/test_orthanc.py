"""Orthanc as the PACS: forwarding, similarity C-FIND with DCMTK, C-MOVE from Orthanc.

The whole path a site would use, with real processes where it matters:

1. Orthanc (Debian package, ``scripts/orthanc_pacs.py``: own configuration,
   loopback, free ports) knows the sidecar as a modality; its Lua
   ``OnStableStudy`` sends each study there once it is stable.
2. The studies are uploaded to Orthanc's REST API (``POST /instances``).
3. The sidecar (in this process, tiny deterministic embedder, short stability
   and worker intervals) receives, marks stable and embeds them; the test waits
   on the catalogue, never for a fixed time.
4. DCMTK ``findscu`` asks the sidecar "which studies look like R?" with the
   private keys; the ranking follows the construction of ``tests/test_search.py``
   (noisy copies of base images): A holds R's bases (~1.0), B two of four
   (~0.5), E none. S, R's patient's other study, is left out by default.
5. The top hit is retrieved by C-MOVE from the AE the sidecar named in
   RetrieveAETitle (Orthanc) to a storage SCP of the test.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from scripts.orthanc_pacs import Modality, OrthancPacs, orthanc_available, wait_until
from sidecar.config import Config
from sidecar.dicom.statuses import Status
from sidecar.embeddings.model import TinyEmbedder
from sidecar.service.app import Sidecar
from tests.conftest import dcmtk_tool, free_port
from tests.test_search import ct_slice, part10

pytestmark = pytest.mark.orthanc

CREATOR = "PACS SIDECAR SIMILARITY"
ORTHANC_AE = "ORTHANC"
SCP_AE = "TESTSCP"
REPO = Path(__file__).resolve().parents[1]

# name -> patient, bases of the slices (one series, 10 mm apart)
STUDIES: dict[str, tuple[str, list[int]]] = {
    "R": ("PR", [0, 1, 2, 3]),  # the reference
    "A": ("PA", [0, 1, 2, 3]),  # same content: ~1.0
    "B": ("PB", [0, 1, 4, 5]),  # half of it: ~0.5
    "E": ("PE", [4, 5, 6, 7]),  # none of it
    "S": ("PR", [0, 1, 2, 3]),  # R's patient: excluded by default
}


@pytest.fixture
def orthanc_binary() -> None:
    if not orthanc_available():
        pytest.skip("Orthanc not installed at /usr/sbin/Orthanc (apt-get install orthanc)")


class StorageSCP:
    """A pynetdicom storage SCP collecting what it receives (the C-MOVE destination)."""

    def __init__(self, ae_title: str) -> None:
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return Status.SUCCESS

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def storage_scp() -> Iterator[StorageSCP]:
    scp = StorageSCP(SCP_AE)
    try:
        yield scp
    finally:
        scp.close()


def upload_studies(pacs: OrthancPacs) -> dict[str, tuple[str, list[str]]]:
    """Upload every study of ``STUDIES``; returns name -> (StudyInstanceUID, SOP UIDs)."""
    uids: dict[str, tuple[str, list[str]]] = {}
    for name, (patient, bases) in STUDIES.items():
        study, series = generate_uid(), generate_uid()
        sops = []
        for i, spec in enumerate(bases):
            ds = ct_slice(study, series, i + 1, i * 10.0, spec, patient=patient,
                          date="20240110", description=f"study {name}")
            pacs.upload(part10(ds))
            sops.append(str(ds.SOPInstanceUID))
        uids[name] = (study, sops)
    return uids


def findscu_similar(address: tuple[str, int], reference: str, k: int, out: Path) -> list[Dataset]:
    """Similarity C-FIND with DCMTK findscu; returns the responses in order."""
    dic = "/usr/share/libdcmtk17"
    env = {**os.environ, "TCP_NODELAY": "1",
           "DCMDICTPATH": f"{dic}/dicom.dic:{dic}/private.dic:"
           f"{REPO / 'docs' / 'dcmtk' / 'pacs-sidecar.dic'}"}
    out.mkdir()
    host, port = address
    done = subprocess.run(
        [dcmtk_tool("findscu"), "-S", "-aet", "FINDSCU", "-aec", "SIDECAR", "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID",
         "-k", "StudyDescription", "-k", "RetrieveAETitle",
         "-k", f"(0099,0010)={CREATOR}", "-k", f"(0099,1002)={reference}",
         "-k", f"(0099,1004)={k}", "-k", "(0099,1010)", "-k", "(0099,1011)",
         host, str(port)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 0, done.stderr
    return [dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]


def c_move(address: tuple[str, int], called: str, study_uid: str, destination: str) -> Dataset:
    """Study-level C-MOVE; returns the final status."""
    ae = AE(ae_title=destination)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study_uid
    assoc = ae.associate(*address, ae_title=called)
    assert assoc.is_established, f"{called} refused the association"
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_move(ident, destination,
                                           StudyRootQueryRetrieveInformationModelMove):
            assert "Status" in status, "association aborted"
            final = status
    finally:
        assoc.release()
    assert final is not None
    return final


def test_orthanc_forwards_stable_studies_and_a_hit_is_retrieved_from_it(
    orthanc_binary: None, config_factory: Callable[..., Config], storage_scp: StorageSCP,
    tmp_path: Path,
) -> None:
    cfg = config_factory({
        "dicom": {"retrieve_ae_title": ORTHANC_AE},
        "stability": {"stable_age": 1.0, "check_interval": 0.25},
        "worker": {"enabled": True, "interval": 0.25},
        "preprocess": {"slice_spacing_mm": 2.0, "modality_window": {"CT": "soft_tissue"}},
        "logging": {"level": "WARNING"},
    })
    app = Sidecar(cfg, embedder=TinyEmbedder(), log_level="WARNING")
    sidecar_address = app.start()
    pacs = OrthancPacs(
        tmp_path / "orthanc", ae_title=ORTHANC_AE, stable_age=1,
        sidecar=Modality(cfg.dicom.ae_title, *sidecar_address),
        modalities={"testscp": Modality(SCP_AE, "127.0.0.1", storage_scp.port)},
    )
    try:
        pacs.start()
        studies = upload_studies(pacs)
        n_instances = sum(len(sops) for _, sops in studies.values())
        assert len(pacs.study_ids()) == len(STUDIES)

        # forwarded by Orthanc once stable, then stable and embedded in the sidecar
        def all_embedded() -> bool:
            rep = app.repository.status()
            return rep.studies == len(STUDIES) and rep.instances_by_state["embedded"] == n_instances

        try:
            wait_until(all_embedded, timeout=45, what="forwarded studies to be embedded")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {app.repository.status()}\n{pacs.log_tail()}") from exc
        jobs = pacs.jobs()
        assert len(jobs) == len(STUDIES)  # one store job per study, by the Lua callback
        assert all(j["Type"] == "DicomModalityStore" and j["State"] == "Success" for j in jobs)

        # similarity C-FIND with DCMTK
        name_of = {uid: name for name, (uid, _) in studies.items()}
        hits = findscu_similar(sidecar_address, studies["R"][0], 3, tmp_path / "rsp")
        assert [name_of[ds.StudyInstanceUID] for ds in hits] == ["A", "B", "E"]
        blocks = [ds.private_block(0x0099, CREATOR) for ds in hits]
        assert [b[0x11].value for b in blocks] == [1, 2, 3]
        scores = [b[0x10].value for b in blocks]
        assert scores[0] > 0.99 and scores == sorted(scores, reverse=True)
        assert [ds.StudyDescription for ds in hits] == ["study A", "study B", "study E"]
        assert all(ds.RetrieveAETitle == ORTHANC_AE for ds in hits)

        # retrieve the top hit from the AE the sidecar named
        top = hits[0]
        where = {pacs.ae_title: pacs.dicom_address}[top.RetrieveAETitle]
        final = c_move(where, top.RetrieveAETitle, top.StudyInstanceUID, SCP_AE)
        assert final.Status == Status.SUCCESS
        a_sops = studies["A"][1]
        assert final.NumberOfCompletedSuboperations == len(a_sops)
        received = wait_until(lambda: list(storage_scp.received), timeout=10,
                              what="moved instances")
        assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(a_sops)
        assert {ds.StudyInstanceUID for ds in received} == {top.StudyInstanceUID}
    finally:
        pacs.stop()
        app.stop()
