"""Similarity C-FIND (the ``PACS SIDECAR SIMILARITY`` private block) and query by example.

The archive is the one of ``tests/test_search.py`` (built with the tiny
deterministic embedder; its docstring gives each study's expected score
against the reference study R). A DICOM node serves it with the real
similarity branch (:class:`SimilarityFind` over a :class:`QueryService`), and
pynetdicom and DCMTK ``findscu`` ask it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from sidecar.archive.store import InstanceStore
from sidecar.config import Config
from sidecar.dicom.find import STUDY_ROOT_FIND
from sidecar.dicom.node import DicomNode
from sidecar.dicom.similarity import (
    PRIVATE_TAGS,
    SimilarityFind,
    dcmtk_dictionary,
    parse_similarity,
)
from sidecar.dicom.statuses import Status
from sidecar.metrics import Metrics
from sidecar.search.front import AuditLog, ExampleStore, QueryService
from sidecar.search.service import SearchService
from tests.conftest import FIND_MSG_ID, FindResult, c_find, dcmtk_tool, free_port, make_sr
from tests.conftest import SIMILARITY_CREATOR as CREATOR
from tests.test_search import LAYOUT, Archive, build_archive, ct_slice, part10, query_image

#: Every test that reaches the catalogue runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.catalogue

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
PACS_AE = "ORTHANC"
EXAMPLE_AE = "SIDECAR_QUERY"
REPO = Path(__file__).resolve().parents[1]



class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    archive: Archive
    node: DicomNode
    address: tuple[str, int]
    query: QueryService
    metrics: Metrics
    clock: FakeClock
    audit_path: Path

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


def node_config(archive: Archive, **query: Any) -> Config:
    cfg = archive.config
    return cfg.model_copy(update={
        "dicom": cfg.dicom.model_copy(update={"port": free_port(),
                                              "retrieve_ae_title": PACS_AE}),
        "query": cfg.query.model_copy(update={"max_k": 20, "default_k": 3, **query}),
    })


def serve(archive: Archive, cfg: Config, service: SearchService, tmp: Path) -> Served:
    metrics = Metrics()
    audit_path = tmp / "audit.jsonl"
    query = QueryService(cfg, service, metrics=metrics, audit=AuditLog(audit_path))
    clock = FakeClock()
    query.examples = ExampleStore(cfg.query.example_ttl, cfg.query.max_examples, clock=clock)
    node = DicomNode(
        cfg, InstanceStore(cfg, archive.repo),
        similarity=SimilarityFind(query, archive.engine, cfg.query,
                                  retrieve_ae_title=cfg.dicom.effective_retrieve_ae_title),
        examples=query,
    )
    address = node.start()
    return Served(archive, node, address, query, metrics, clock, audit_path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, module_database_url: str,
            ) -> Iterator[Archive]:
    built = build_archive(tmp_path_factory.mktemp("similarity"), LAYOUT,
                          database_url=module_database_url)
    try:
        yield built
    finally:
        built.emb.close()
        built.engine.dispose()


@pytest.fixture(scope="module")
def served(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = serve(archive, node_config(archive), archive.service, tmp_path_factory.mktemp("audit"))
    try:
        yield s
    finally:
        s.node.stop()
        s.query.close()


# ------------------------------------------------------------------ helpers
def similarity(level: str = "STUDY", *, sop: str = "", study: str = "", series: str = "",
               k: int | None = None, same_patient: str | None = None, block: int = 0x10,
               **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    ds.add_new(0x00990000 | block, "LO", CREATOR)
    for offset, vr, value in ((1, "UI", sop), (2, "UI", study), (3, "UI", series),
                              (4, "US", k), (5, "CS", same_patient)):
        if value:
            ds.add_new(0x00990000 | (block << 8) | offset, vr, value)
    return ds


def c_store(address: tuple[str, int], ds: Dataset, called: str = EXAMPLE_AE) -> Dataset:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(str(ds.SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate(*address, ae_title=called)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return status


def names(served: Served, res: FindResult) -> list[str]:
    return [served.archive.name_of(str(ds.StudyInstanceUID)) for ds in res.identifiers]


# -------------------------------------------------------------- study level
def test_study_level_hits_come_ranked_with_scores_and_the_pacs_to_retrieve_from(
    served: Served,
) -> None:
    r = served.archive.studies["R"]
    res = c_find(served.address, similarity(study=r.uid, k=3, StudyInstanceUID="",
                                            PatientID="", StudyDate=""))
    assert res.status == Status.SUCCESS and res.pending == [Status.PENDING] * 3
    assert names(served, res) == ["A", "C", "B"]  # the construction's order (test_search)
    scores = res.private(0x10)
    assert scores[0] > 0.99 and 0.70 < scores[1] < 0.80 and 0.50 < scores[2] < 0.65
    assert res.private(0x11) == [1, 2, 3]
    a = served.archive.studies["A"]
    first = res.identifiers[0]
    assert first.private_block(0x0099, CREATOR)[0x13].value == a.series[0]  # the HEAD series
    assert first.private_block(0x0099, CREATOR)[0x12].value in a.sops[0]
    assert set(res.private(0x14)) == {served.archive.emb.serving.model_id}
    assert all(ds.RetrieveAETitle == PACS_AE for ds in res.identifiers)
    assert all(ds.QueryRetrieveLevel == "STUDY" for ds in res.identifiers)
    assert first.PatientID == "P2" and first.StudyDate == "20240110"
    # only the keys asked for (plus the SCP's own) come back
    assert "StudyDescription" not in first and "AccessionNumber" not in first
    # the private creator is in the response, in the block it names
    assert first[0x00990010].value == CREATOR
    assert first[0x00991010].VR == "FD" and first[0x00991011].VR == "UL"


def test_default_and_capped_top_k(served: Served) -> None:
    r = served.archive.studies["R"]
    default = c_find(served.address, similarity(study=r.uid, StudyInstanceUID=""))
    assert len(default.identifiers) == 3  # query.default_k in this module
    capped = c_find(served.address, similarity(study=r.uid, k=500, StudyInstanceUID=""))
    assert len(capped.identifiers) == 7  # all candidates (max_k 20 is above that)
    assert capped.private(0x11) == list(range(1, 8))


def test_cap_lowers_a_large_top_k(archive: Archive, tmp_path: Path) -> None:
    s = serve(archive, node_config(archive, max_k=2, default_k=1), archive.service, tmp_path)
    try:
        res = c_find(s.address, similarity(study=archive.studies["R"].uid, k=50,
                                           StudyInstanceUID=""))
        assert names(s, res) == ["A", "C"]
        assert s.audit()[-1]["k"] == 2
    finally:
        s.node.stop()
        s.query.close()


def test_same_patient_is_excluded_unless_asked(served: Served) -> None:
    r = served.archive.studies["R"]
    no = c_find(served.address, similarity(study=r.uid, k=20, StudyInstanceUID=""))
    assert "S" not in names(served, no) and "R" not in names(served, no)
    yes = c_find(served.address, similarity(study=r.uid, k=20, same_patient="YES",
                                            StudyInstanceUID=""))
    assert names(served, yes)[:4] == ["A", "S", "C", "B"]
    assert "R" not in names(served, yes), "the reference's own study is never a hit"


def test_implicit_vr_identifier_is_understood(served: Served) -> None:
    # Implicit VR: the private block arrives without VRs; the node knows them.
    r = served.archive.studies["R"]
    res = c_find(served.address, similarity(study=r.uid, k=2, StudyInstanceUID=""),
                 ts=ImplicitVRLittleEndian)
    assert res.status == Status.SUCCESS and names(served, res) == ["A", "C"]
    assert res.private(0x11) == [1, 2]
    assert res.identifiers[0][0x00991010].VR == "FD"


def test_patient_root_model_and_another_block_slot(served: Served) -> None:
    r = served.archive.studies["R"]
    res = c_find(served.address, similarity(study=r.uid, k=1, block=0x42, StudyInstanceUID=""),
                 model=PATIENT_ROOT)
    assert res.status == Status.SUCCESS and names(served, res) == ["A"]


# ---------------------------------------------------------- levels, filters
def test_series_and_image_levels(served: Served) -> None:
    a = served.archive.studies["A"]
    series = c_find(served.address, similarity("SERIES", series=a.series[0], k=2,
                                               SeriesInstanceUID="", Modality="",
                                               BodyPartExamined=""))
    assert series.status == Status.SUCCESS
    r = served.archive.studies["R"]
    assert series.identifiers[0].SeriesInstanceUID == r.series[0]
    assert series.identifiers[0].QueryRetrieveLevel == "SERIES"
    assert series.identifiers[0].Modality == "CT"
    assert series.private(0x13)[0] == r.series[0]

    sop = r.sops[0][1]  # base 1
    image = c_find(served.address, similarity("IMAGE", sop=sop, k=3, SOPInstanceUID="",
                                              InstanceNumber=""))
    assert image.status == Status.SUCCESS and len(image.identifiers) == 3
    top = image.identifiers[0]
    assert top.SOPInstanceUID == top.private_block(0x0099, CREATOR)[0x12].value
    # the copies of base 1 in A, C and B (R itself and S, same patient, are excluded);
    # their order depends only on their noise
    st = served.archive.studies
    assert {ds.SOPInstanceUID for ds in image.identifiers} == {
        st[n].sops[0][1] for n in ("A", "C", "B")}
    assert [ds.InstanceNumber for ds in image.identifiers] == [2, 2, 2]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_filters_restrict_the_candidates_before_ranking(served: Served) -> None:
    r = served.archive.studies["R"]
    mr = c_find(served.address, similarity(study=r.uid, k=5, StudyInstanceUID="",
                                           ModalitiesInStudy="MR"))
    assert names(served, mr) == ["C"]
    assert mr.identifiers[0].ModalitiesInStudy == "MR"
    dated = c_find(served.address, similarity(study=r.uid, k=5, StudyInstanceUID="",
                                              StudyDate="20240201-"))
    assert names(served, dated) == ["B"]
    chest = c_find(served.address, similarity(study=r.uid, k=5, StudyInstanceUID="",
                                              BodyPartExamined="CH*"))
    assert names(served, chest) == ["A", "B"]
    # Modality at study level: a study passes when one of its series has it;
    # the response's Modality is the best-matching series'.
    ct = c_find(served.address, similarity(study=r.uid, k=2, StudyInstanceUID="",
                                           Modality="CT"))
    assert names(served, ct) == ["A", "B"] and ct.pending == [Status.PENDING, Status.PENDING]
    assert [ds.Modality for ds in ct.identifiers] == ["CT", "CT"]


@pytest.mark.parametrize("level, ref", [("STUDY", "study"), ("SERIES", "series"),
                                        ("IMAGE", "sop")])
def test_keys_the_hits_carry_match_the_catalogue_read(served: Served, level: str,
                                                      ref: str) -> None:
    """Keys a hit carries are answered from it; any other key makes the catalogue
    read every requested key (PatientName here): both give the same values."""
    r = served.archive.studies["R"]
    uid = {"study": r.uid, "series": r.series[0], "sop": r.sops[0][1]}[ref]
    keys: dict[str, Any] = dict(StudyInstanceUID="", PatientID="", IssuerOfPatientID="",
                                StudyDate="", StudyDescription="", AccessionNumber="",
                                ModalitiesInStudy="")
    if level in ("SERIES", "IMAGE"):
        keys.update(SeriesInstanceUID="", Modality="", SeriesDescription="",
                    SeriesNumber="", BodyPartExamined="")
    if level == "IMAGE":
        keys.update(SOPInstanceUID="", InstanceNumber="")
    fast_id = similarity(level, k=4, **{ref: uid}, **keys)
    read_id = similarity(level, k=4, **{ref: uid}, **keys, PatientName="")
    assert parse_similarity(fast_id, STUDY_ROOT_FIND).hit_only
    assert not parse_similarity(read_id, STUDY_ROOT_FIND).hit_only
    fast = c_find(served.address, fast_id)
    read = c_find(served.address, read_id)
    assert fast.status == read.status == Status.SUCCESS and len(fast.identifiers) >= 3
    assert fast.private(0x11) == read.private(0x11)
    for a, b in zip(fast.identifiers, read.identifiers, strict=True):
        assert "PatientName" in b and "PatientName" not in a
        del b.PatientName
        assert a == b
    first = fast.identifiers[0]
    assert first.StudyDate and first.PatientID and first.ModalitiesInStudy


def test_other_keys_filter_the_ranked_hits(served: Served) -> None:
    r = served.archive.studies["R"]
    res = c_find(served.address, similarity(study=r.uid, k=3, StudyInstanceUID="",
                                            PatientID="P3"))
    assert names(served, res) == ["B"] and res.private(0x11) == [1]
    wild = c_find(served.address, similarity(study=r.uid, k=2, StudyInstanceUID="",
                                             StudyDescription="study [ACB]*"))
    # no match: [ is literal in DICOM wildcards
    assert wild.status == Status.SUCCESS and wild.identifiers == []


# ------------------------------------------------------------------ statuses
def quiet(build: Callable[[], Dataset]) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        return build()


@pytest.mark.parametrize("identifier, needle", [
    (similarity(StudyInstanceUID=""), "no reference"),
    (similarity(study="1.2.3", series="1.2.4"), "give one reference"),
    (quiet(lambda: similarity(study="1.2.x")), "not a valid UID"),
    (similarity(study="1.2.3", same_patient="MAYBE"), "YES or NO"),
    (quiet(lambda: similarity(study="1.2.3", StudyDate="2024-99")), "StudyDate"),
    (similarity(study="1.2.3", QueryRetrieveLevel="FRAME"), "QueryRetrieveLevel"),
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_bad_identifiers_are_refused(served: Served, identifier: Dataset, needle: str) -> None:
    res = c_find(served.address, identifier)
    assert res.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS and res.identifiers == []
    assert needle in res.comment


def test_patient_level_is_refused(served: Served) -> None:
    res = c_find(served.address, similarity("PATIENT", study="1.2.3", PatientID=""),
                 model=PATIENT_ROOT)
    assert res.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "STUDY, SERIES or IMAGE" in res.comment


def test_unknown_and_unembedded_references_say_which(served: Served) -> None:
    st = served.archive.studies
    unknown = c_find(served.address, similarity(series="1.2.3.4.5"))
    assert unknown.status == Status.UNKNOWN_REFERENCE
    assert unknown.comment == "unknown reference series: not in the archive"
    pending = c_find(served.address, similarity(study=st["P"].uid))
    assert pending.status == Status.REFERENCE_NOT_EMBEDDED and "pending" in pending.comment
    failed = c_find(served.address, similarity(sop=st["F"].sops[0][0]))
    assert failed.status == Status.REFERENCE_NOT_EMBEDDED and "embedding failed" in failed.comment
    skipped = c_find(served.address, similarity(study=st["K"].uid))
    assert skipped.status == Status.REFERENCE_NOT_EMBEDDED and "not an image" in skipped.comment
    assert all(len(r.comment) <= 64 for r in (unknown, pending, failed, skipped))


def test_no_index_is_out_of_resources(archive: Archive, tmp_path: Path) -> None:
    s = serve(archive, node_config(archive), SearchService(archive.config, archive.engine, None),
              tmp_path)
    try:
        res = c_find(s.address, similarity(study=archive.studies["R"].uid))
        assert res.status == Status.OUT_OF_RESOURCES and "embedding is turned off" in res.comment
        # and an example cannot be embedded either
        status = c_store(s.address, query_image(0))
        assert status.Status == Status.OUT_OF_RESOURCES
    finally:
        s.node.stop()
        s.query.close()


def test_cancel_stops_the_responses(served: Served) -> None:
    node = served.node
    original = SimilarityFind._responses

    def cancel_arrived() -> bool:
        return any(a.dimse.cancel_req for a in node.ae.active_associations)

    def held(self: SimilarityFind, *args: Any) -> Iterator[Dataset]:
        it = original(self, *args)
        yield next(it)
        end = time.monotonic() + 10.0
        while not cancel_arrived():  # hold the next hit until the C-CANCEL is in
            assert time.monotonic() < end, "C-CANCEL never arrived"
            time.sleep(0.005)
        yield from it

    def cancel(assoc: Any, n: int) -> None:
        if n == 1:
            assoc.send_c_cancel(FIND_MSG_ID, query_model=STUDY_ROOT_FIND)

    mp = pytest.MonkeyPatch()
    mp.setattr(SimilarityFind, "_responses", held)
    try:
        res = c_find(served.address, similarity(study=served.archive.studies["R"].uid, k=5,
                                                StudyInstanceUID=""), on_pending=cancel)
    finally:
        mp.undo()
    assert res.status == Status.CANCEL and len(res.identifiers) == 1


# -------------------------------------------------------------- audit, metrics
def test_every_similarity_query_is_audited(served: Served) -> None:
    before = len(served.audit())
    r = served.archive.studies["R"]
    c_find(served.address, similarity(study=r.uid, k=2, StudyInstanceUID=""), calling="VIEWER")
    c_find(served.address, similarity(series="1.2.3.4.5"), calling="VIEWER")
    new = served.audit()[before:]
    assert len(new) == 2
    ok, refused = new
    assert ok["interface"] == "dicom" and ok["requester"] == "VIEWER"
    assert ok["address"] == "127.0.0.1"
    assert ok["reference"] == {"kind": "study", "uid": r.uid}
    assert ok["hits"] == 2 and ok["outcome"] == "ok" and ok["level"] == "study"
    a, c = served.archive.studies["A"], served.archive.studies["C"]
    assert ok["studies"] == [a.uid, c.uid]
    assert refused["outcome"] == "unknown_reference" and refused["hits"] == 0
    assert ok["time"].endswith("+00:00")
    assert os.stat(served.audit_path).st_mode & 0o777 == 0o600
    text = served.metrics.render().decode()
    assert 'sidecar_queries_total{interface="dicom",outcome="ok"}' in text
    assert 'sidecar_query_duration_seconds_count{interface="dicom",level="study"}' in text


# ------------------------------------------------------------ query by example
def test_query_by_example_is_embedded_at_once_and_never_archived(served: Served) -> None:
    arch = served.archive
    example = query_image(0, patient="P42")  # base 0: R, A, S, C, B and M hold it
    sop = str(example.SOPInstanceUID)
    status = c_store(served.address, example)
    assert status.Status == Status.SUCCESS
    assert arch.repo.find_instance(sop) is None
    assert not any(sop in p.name for p in arch.config.storage_dir.rglob("*"))

    res = c_find(served.address, similarity(sop=sop, k=20, StudyInstanceUID=""))
    assert res.status == Status.SUCCESS
    hits = names(served, res)
    # every study holding base 0 (the one-slice query matches it exactly) before the rest
    assert set(hits[:6]) == {"R", "A", "S", "C", "B", "M"}
    assert min(res.private(0x10)[:6]) > 0.99 > max(res.private(0x10)[6:])
    assert served.audit()[-1]["reference"]["example"] is True

    # expired after query.example_ttl
    served.clock.now += arch.config.query.example_ttl + 1
    gone = c_find(served.address, similarity(sop=sop))
    assert gone.status == Status.UNKNOWN_REFERENCE


def test_example_series_can_be_the_reference(served: Served) -> None:
    series = generate_uid()
    study = generate_uid()
    for i, spec in enumerate([4, 5, 6, 7]):  # E's bases
        ds = ct_slice(study, series, i + 1, i * 10.0, spec, patient="P43", date="20240601")
        assert c_store(served.address, ds).Status == Status.SUCCESS
    res = c_find(served.address, similarity(series=series, k=1, StudyInstanceUID=""))
    assert names(served, res) == ["E"] and res.private(0x10)[0] > 0.99


def test_example_that_is_not_an_image_is_refused(served: Served) -> None:
    status = c_store(served.address, make_sr())
    assert status.Status == Status.CANNOT_UNDERSTAND
    assert status.ErrorComment.startswith("example: query image cannot be ")


def test_only_our_two_ae_titles_are_accepted(served: Served) -> None:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(*served.address, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected
    # the example AE title answers C-FIND too
    res = c_find(served.address, similarity(study=served.archive.studies["R"].uid, k=1,
                                            StudyInstanceUID=""), called=EXAMPLE_AE)
    assert res.status == Status.SUCCESS and names(served, res) == ["A"]


def test_archive_ae_title_still_archives(served: Served, tmp_path: Path) -> None:
    ds = query_image(5, patient="P44")
    assert c_store(served.address, ds, called="SIDECAR").Status == Status.SUCCESS
    assert served.archive.repo.find_instance(str(ds.SOPInstanceUID)) is not None


# -------------------------------------------------------------------- DCMTK
def test_dcmtk_dictionary_file_is_current() -> None:
    shipped = (REPO / "docs" / "dcmtk" / "pacs-sidecar.dic").read_text()
    assert shipped == dcmtk_dictionary()
    assert len([t for t in PRIVATE_TAGS if t.direction == "request"]) == 5


@pytest.mark.dcmtk
def test_findscu_similarity_query_with_private_keys(served: Served, tmp_path: Path) -> None:
    findscu = dcmtk_tool("findscu")
    dic = "/usr/share/libdcmtk17"
    env = {**os.environ, "DCMDICTPATH": f"{dic}/dicom.dic:{dic}/private.dic:"
           f"{REPO / 'docs' / 'dcmtk' / 'pacs-sidecar.dic'}"}
    r = served.archive.studies["R"]
    host, port = served.address
    out = subprocess.run(
        [findscu, "-S", "-aet", "FINDSCU", "-aec", "SIDECAR", "-X", "-od", str(tmp_path),
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID",
         "-k", f"(0099,0010)={CREATOR}", "-k", f"(0099,1002)={r.uid}",
         "-k", "(0099,1004)=3", "-k", "(0099,1005)=NO",
         "-k", "(0099,1010)", "-k", "(0099,1011)",
         host, str(port)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert out.returncode == 0, out.stderr
    files = sorted(tmp_path.glob("rsp*.dcm"))
    assert len(files) == 3
    responses = [dcmread(f) for f in files]
    assert [served.archive.name_of(ds.StudyInstanceUID) for ds in responses] == ["A", "C", "B"]
    ranks = [ds.private_block(0x0099, CREATOR)[0x11].value for ds in responses]
    scores = [ds.private_block(0x0099, CREATOR)[0x10].value for ds in responses]
    assert ranks == [1, 2, 3] and scores == sorted(scores, reverse=True)
    assert all(ds.RetrieveAETitle == PACS_AE for ds in responses)


@pytest.mark.dcmtk
def test_storescu_sends_an_example_then_findscu_refers_to_it(
    served: Served, tmp_path: Path,
) -> None:
    example = query_image(6, patient="P45")  # C and E and N hold base 6
    path = tmp_path / "example.dcm"
    path.write_bytes(part10(example))
    host, port = served.address
    sent = subprocess.run([dcmtk_tool("storescu"), "-aec", EXAMPLE_AE, host, str(port),
                           str(path)], capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    dic = "/usr/share/libdcmtk17"
    env = {**os.environ, "DCMDICTPATH": f"{dic}/dicom.dic:"
           f"{REPO / 'docs' / 'dcmtk' / 'pacs-sidecar.dic'}"}
    out = subprocess.run(
        [dcmtk_tool("findscu"), "-S", "-aec", "SIDECAR", "-X", "-od", str(tmp_path),
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
         "-k", f"(0099,0010)={CREATOR}", "-k", f"(0099,1001)={example.SOPInstanceUID}",
         "-k", "(0099,1004)=3", host, str(port)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert out.returncode == 0, out.stderr
    found = [served.archive.name_of(dcmread(f).StudyInstanceUID)
             for f in sorted(tmp_path.glob("rsp*.dcm"))]
    assert set(found) == {"C", "E", "N"}


# ------------------------------------------------- through receiver processes
def test_receiver_processes_forward_queries_and_examples(
    config_factory: Callable[..., Config],
) -> None:
    """With receivers in child processes, C-FIND and examples reach the main process's index."""
    from sidecar.embeddings.model import TinyEmbedder
    from sidecar.service.app import Sidecar

    cfg = config_factory({
        "dicom": {"retrieve_ae_title": PACS_AE},
        "preprocess": {"slice_spacing_mm": 2.0,
                       "modality_window": {"CT": "soft_tissue"}},
        "logging": {"level": "WARNING"},
    })
    app = Sidecar(cfg, receiver_processes=2, embedder=TinyEmbedder(), log_level="WARNING")
    app.start()
    try:
        assert app.node is None and app.query_server is not None
        address = ("127.0.0.1", cfg.dicom.port)
        layout = {"X": ("PX", [0, 1, 2]), "Y": ("PY", [0, 1, 5]), "Z": ("PZ", [6, 7, 4])}
        uids: dict[str, str] = {}
        for name, (patient, bases) in layout.items():
            uids[name] = generate_uid()
            series = generate_uid()
            for i, spec in enumerate(bases):
                ds = ct_slice(uids[name], series, i + 1, i * 10.0, spec, patient=patient,
                              date="20240110")
                assert c_store(address, ds, called="SIDECAR").Status == Status.SUCCESS
        # still pending: the children's answer comes from the main process
        early = c_find(address, similarity(study=uids["X"]))
        assert early.status == Status.REFERENCE_NOT_EMBEDDED and "pending" in early.comment
        app.repository.mark_stable_studies(0.0)
        assert app.embedding is not None
        while app.embedding.run_job().series:
            pass
        res = c_find(address, similarity(study=uids["X"], k=2, StudyInstanceUID=""))
        assert res.status == Status.SUCCESS
        assert [ds.StudyInstanceUID for ds in res.identifiers] == [uids["Y"], uids["Z"]]
        assert res.identifiers[0].RetrieveAETitle == PACS_AE
        unknown = c_find(address, similarity(sop="1.2.3.999"))
        assert unknown.status == Status.UNKNOWN_REFERENCE
        # an example sent to a child is embedded by the main process
        example = query_image(6, patient="PE")
        assert c_store(address, example).Status == Status.SUCCESS
        by_example = c_find(address, similarity(sop=str(example.SOPInstanceUID), k=1,
                                                StudyInstanceUID=""))
        assert [ds.StudyInstanceUID for ds in by_example.identifiers] == [uids["Z"]]
        audit = [json.loads(x) for x in cfg.audit_log_path.read_text().splitlines()]
        assert [a["outcome"] for a in audit] == ["not_embedded", "ok", "unknown_reference",
                                                 "ok"]
        assert app.health()["ok"] is True
    finally:
        app.stop()
    assert app.query_server is None
