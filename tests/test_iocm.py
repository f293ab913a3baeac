"""IOCM rejection notes sent by DCMTK ``storescu`` to a running sidecar.

The notes are Key Object Selection documents built per PS3.3 A.35.4 / TID 2010
with a rejection title of PS3.16 (the codes as pydicom's PS3.16 dictionary
spells them): they hide or delete the instances they reference
(``iocm.actions``), which then match no ordinary or similarity C-FIND; an
instance arriving later under a rejected UID is refused 0xA770; the action is
audited (Instances Accessed, Delete) in the standard's schema.
"""

from __future__ import annotations

import json
import logging
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sidecar.config import Config
from sidecar.db.models import Instance, InstanceState, RejectedInstance, SliceVector
from sidecar.dicom.statuses import Status
from sidecar.service.app import Sidecar
from tests.conftest import (
    SIMILARITY_CREATOR,
    c_find,
    dcmtk_env,
    dcmtk_tool,
    file_meta,
    free_port,
    make_ct,
    wait_for,
)
from tests.test_audit import audit_file, event_id, schema, validated  # noqa: F401 - fixture

#: Every test that reaches the catalogue runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.catalogue

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
PATIENT = "PID-IOCM-7"
OTHER = "PID-IOCM-8"

LIVE = {
    "worker": {"enabled": True, "interval": 0.2},
    "stability": {"stable_age": 0.2, "check_interval": 0.1},
    "index": {"save_interval": 0.5},
    "preprocess": {"slice_spacing_mm": 0, "max_slices_per_series": 64},
}


# --------------------------------------------------------------------- helpers
def code_item(code: object) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value  # type: ignore[attr-defined]
    item.CodingSchemeDesignator = code.scheme_designator  # type: ignore[attr-defined]
    item.CodeMeaning = code.meaning  # type: ignore[attr-defined]
    return item


def rejection_note(title: object, refs: list[Dataset], *, patient_id: str = PATIENT,
                   study_uid: str | None = None) -> Dataset:
    """A KOS rejection note (Key Object Selection Document, TID 2010) referencing ``refs``."""
    ds = Dataset()
    ds.SOPClassUID = KOS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or refs[0].StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Secret"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.ContentDate = "20240131"
    ds.StudyTime = ds.ContentTime = "101010"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "KO"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code_item(title)]
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = [template]
    by_study: dict[str, dict[str, list[Dataset]]] = {}
    content = []
    for ref in refs:
        sop = Dataset()
        sop.ReferencedSOPClassUID = ref.SOPClassUID
        sop.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        by_study.setdefault(ref.StudyInstanceUID, {}).setdefault(
            ref.SeriesInstanceUID, []).append(sop)
        image = Dataset()
        image.RelationshipType = "CONTAINS"
        image.ValueType = "IMAGE"
        image.ReferencedSOPSequence = [sop]
        content.append(image)
    ds.ContentSequence = content
    evidence = []
    for study, series in by_study.items():
        st = Dataset()
        st.StudyInstanceUID = study
        st.ReferencedSeriesSequence = []
        for series_uid, sops in series.items():
            se = Dataset()
            se.SeriesInstanceUID = series_uid
            se.ReferencedSOPSequence = sops
            st.ReferencedSeriesSequence.append(se)
        evidence.append(st)
    ds.CurrentRequestedProcedureEvidenceSequence = evidence
    ds.file_meta = file_meta(KOS, ds.SOPInstanceUID)
    return ds


def storescu(app: Sidecar, tmp: Path, datasets: list[Dataset]) -> subprocess.CompletedProcess[str]:
    """Write ``datasets`` as files and send them with DCMTK storescu (-v: statuses shown)."""
    assert app.address is not None
    files = []
    for ds in datasets:
        path = tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    host, port = app.address
    return subprocess.run(
        [dcmtk_tool("storescu"), "-v", "-aet", "PACS", "-aec", app.config.dicom.ae_title,
         host, str(port), *files],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60, check=False,
    )


def send(app: Sidecar, ds: Dataset) -> Dataset:
    """One C-STORE with pynetdicom; returns the status dataset (with its Error Comment)."""
    assert app.address is not None
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate(*app.address, ae_title=app.config.dicom.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert "Status" in status
    return status


def image_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.SOPInstanceUID = ""
    return q


def found_images(app: Sidecar, study_uid: str) -> set[str]:
    """The SOP Instance UIDs ordinary C-FINDs return: the study's series, then each's images."""
    series = Dataset()
    series.QueryRetrieveLevel = "SERIES"
    series.StudyInstanceUID = study_uid
    series.SeriesInstanceUID = ""
    got = c_find(app.address, series)
    assert got.status == Status.SUCCESS, got.comment
    out: set[str] = set()
    for s in got.values("SeriesInstanceUID"):
        q = image_query(study_uid)
        q.SeriesInstanceUID = s
        res = c_find(app.address, q)
        assert res.status == Status.SUCCESS, res.comment
        out |= {str(v) for v in res.values("SOPInstanceUID")}
    return out


def similar_images(app: Sidecar, reference_sop: str) -> set[str]:
    """The instances a similarity C-FIND at IMAGE level (top 20) returns."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = ""
    q.SOPInstanceUID = ""
    block = q.private_block(0x0099, SIMILARITY_CREATOR, create=True)
    block.add_new(0x01, "UI", reference_sop)
    block.add_new(0x04, "US", 20)
    res = c_find(app.address, q)
    assert res.status == Status.SUCCESS, res.comment
    return {str(v) for v in res.values("SOPInstanceUID")}


def http_similar(app: Sidecar, reference_sop: str) -> set[str]:
    """The instances ``GET /v1/similar`` at image level (top 20) returns (loopback, no token)."""
    url = (f"http://127.0.0.1:{app.config.http.port}/v1/similar?instance={reference_sop}"
           "&level=image&k=20")
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = json.loads(resp.read())
    return {str(h["sop_instance_uid"]) for h in body["hits"]}


def count(app: Sidecar, model: type, *where: object) -> int:
    with Session(app.engine) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)  # type: ignore[arg-type]


def study(n_rejected: int, n_kept: int, patient_id: str = PATIENT
          ) -> tuple[list[Dataset], list[Dataset]]:
    """One study: a series to reject and a series kept."""
    study_uid, bad, good = generate_uid(), generate_uid(), generate_uid()
    rejected = [make_ct(study_uid=study_uid, series_uid=bad, instance_number=i + 1,
                        seed=10 + i, patient_id=patient_id) for i in range(n_rejected)]
    kept = [make_ct(study_uid=study_uid, series_uid=good, instance_number=i + 1,
                    seed=20 + i, patient_id=patient_id) for i in range(n_kept)]
    return rejected, kept


# --------------------------------------------------------------------- tests
def test_quality_rejection_hides_from_every_find_and_is_audited(
    config_factory: Callable[..., Config], tmp_path: Path, schema: etree.RelaxNG,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Sidecar(config_factory({**LIVE, "http": {"enabled": True, "port": free_port()}}))
    app.start()
    try:
        reference = make_ct(patient_id=OTHER, seed=10)  # another patient's: similar images
        rejected, kept = study(2, 2)
        assert storescu(app, tmp_path, [reference, *rejected, *kept]).returncode == 0
        wait_for(lambda: count(app, Instance, Instance.state == InstanceState.EMBEDDED) == 5,
                 120, "embedding")
        bad = {ds.SOPInstanceUID for ds in rejected}
        good = {ds.SOPInstanceUID for ds in kept}
        study_uid = kept[0].StudyInstanceUID
        assert found_images(app, study_uid) == bad | good
        assert bad <= similar_images(app, reference.SOPInstanceUID)
        assert bad <= http_similar(app, reference.SOPInstanceUID)
        hidden_files = [app.store.root / p for p in _paths(app, bad)]

        note = rejection_note(codes.DCM.RejectedForQualityReasons, rejected)
        with caplog.at_level(logging.INFO):
            res = storescu(app, tmp_path, [note])
        assert res.returncode == 0, res.stderr
        # the note is kept (stored as any instance); the rejected ones match no C-FIND
        assert found_images(app, study_uid) == good | {note.SOPInstanceUID}
        similar = similar_images(app, reference.SOPInstanceUID)
        assert not similar & bad and good <= similar
        over_http = http_similar(app, reference.SOPInstanceUID)
        assert not over_http & bad and good <= over_http
        # hide: rows and vectors gone, files moved aside (not deleted)
        assert count(app, Instance, Instance.sop_instance_uid.in_(bad)) == 0
        assert count(app, SliceVector) == 3
        assert count(app, RejectedInstance) == 2
        assert not any(p.exists() for p in hidden_files)
        assert len(list((app.config.quarantine_dir / "rejected").rglob("*.dcm"))) == 2
        # the PACS sending a rejected instance again is refused (as dcm4chee does)
        again = send(app, rejected[0])
        assert again.Status == Status.SUBSEQUENT_OCCURRENCE_OF_REJECTED
        assert "rejected" in again.ErrorComment
        assert found_images(app, study_uid) == good | {note.SOPInstanceUID}
    finally:
        app.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.INFO
                and PATIENT in r.getMessage()]
    assert any("rejection note" in r.getMessage() and "2 instance(s) hidden" in r.getMessage()
               for r in caplog.records)
    docs = [validated(schema, m) for m in audit_file(app.config)]
    deleted = [d for d in docs if event_id(d)[0] == "110103"]
    assert len(deleted) == 1
    msg = deleted[0]
    assert msg.find("EventIdentification").get("EventActionCode") == "D"  # type: ignore[union-attr]
    assert {i.get("UID") for i in msg.iter("Instance")} == bad
    study_obj = msg.find(".//ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
    assert study_obj is not None and study_obj.get("ParticipantObjectID") == study_uid
    assert study_obj.get("ParticipantObjectDataLifeCycle") == "14"  # logical deletion
    requestor = msg.find("ActiveParticipant[@UserIsRequestor='true']")
    assert requestor is not None and requestor.get("UserID") == "PACS"


def _paths(app: Sidecar, sops: set[str]) -> list[str]:
    with Session(app.engine) as s:
        return [str(p) for p in s.scalars(
            select(Instance.file_path).where(Instance.sop_instance_uid.in_(sops)))]


def test_retention_expired_deletes_files_and_rows(
    config_factory: Callable[..., Config], tmp_path: Path, schema: etree.RelaxNG,  # noqa: F811
) -> None:
    app = Sidecar(config_factory())
    app.start()
    try:
        rejected, kept = study(3, 1)
        assert storescu(app, tmp_path, [*rejected, *kept]).returncode == 0
        bad = {ds.SOPInstanceUID for ds in rejected}
        files = [app.store.root / p for p in _paths(app, bad)]
        assert len(files) == 3 and all(p.exists() for p in files)
        note = rejection_note(codes.DCM.DataRetentionPolicyExpired, rejected)
        assert storescu(app, tmp_path, [note]).returncode == 0
        assert not any(p.exists() for p in files)
        assert not (app.config.quarantine_dir / "rejected").exists()
        assert count(app, Instance) == 2  # the kept one and the note
        assert found_images(app, kept[0].StudyInstanceUID) == {kept[0].SOPInstanceUID,
                                                               note.SOPInstanceUID}
        # the same note again (a PACS retry) is a harmless duplicate
        assert send(app, note).Status == Status.SUCCESS
    finally:
        app.stop()
    deleted = [d for d in (validated(schema, m) for m in audit_file(app.config))
               if event_id(d)[0] == "110103"]
    assert len(deleted) == 1
    obj = deleted[0].find(".//ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
    assert obj is not None and obj.get("ParticipantObjectDataLifeCycle") == "15"


def test_an_ignored_title_does_nothing(
    config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    app = Sidecar(config_factory({"iocm": {"actions": {"incorrect_worklist": "ignore"}}}))
    app.start()
    try:
        rejected, kept = study(2, 1)
        assert storescu(app, tmp_path, [*rejected, *kept]).returncode == 0
        note = rejection_note(codes.DCM.IncorrectModalityWorklistEntry, rejected)
        assert storescu(app, tmp_path, [note]).returncode == 0
        everything = {ds.SOPInstanceUID for ds in [*rejected, *kept, note]}
        assert found_images(app, kept[0].StudyInstanceUID) == everything
        assert count(app, RejectedInstance) == 0
        assert send(app, rejected[0]).Status == Status.SUCCESS  # a duplicate, accepted
    finally:
        app.stop()


def test_unknown_references_are_harmless_and_refused_when_they_arrive(
    config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    app = Sidecar(config_factory())
    app.start()
    try:
        early, _ = study(1, 0)
        other, _ = study(1, 0, patient_id=OTHER)
        assert storescu(app, tmp_path, [other[0]]).returncode == 0
        # a note (of PATIENT) naming an instance not received yet and another patient's one
        note = rejection_note(codes.DCM.RejectedForPatientSafetyReasons, [early[0], other[0]])
        assert send(app, note).Status == Status.SUCCESS
        assert count(app, RejectedInstance) == 2
        # another patient's instance is left alone
        assert found_images(app, other[0].StudyInstanceUID) == {other[0].SOPInstanceUID}
        # the rejected instance arriving after its note is never stored
        late = send(app, early[0])
        assert late.Status == Status.SUBSEQUENT_OCCURRENCE_OF_REJECTED
        assert count(app, Instance, Instance.sop_instance_uid == early[0].SOPInstanceUID) == 0
    finally:
        app.stop()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the bad UID, on purpose
def test_a_malformed_rejection_note_is_refused_with_a_clear_status(
    config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    app = Sidecar(config_factory())
    app.start()
    try:
        rejected, _ = study(1, 0)
        assert storescu(app, tmp_path, rejected).returncode == 0
        empty = rejection_note(codes.DCM.RejectedForQualityReasons, rejected)
        del empty.CurrentRequestedProcedureEvidenceSequence
        status = send(app, empty)
        assert status.Status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert "references no instance" in status.ErrorComment
        bad_uid = rejection_note(codes.DCM.RejectedForQualityReasons, rejected)
        bad_uid.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.abc"
        status = send(app, bad_uid)
        assert status.Status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert "invalid ReferencedSOPInstanceUID" in status.ErrorComment
        # storescu reports the failure too; nothing was rejected, nothing stored
        res = storescu(app, tmp_path, [empty])
        assert "Error: DataSetDoesNotMatchSOPClass" in res.stdout + res.stderr
        assert count(app, RejectedInstance) == 0
        assert found_images(app, rejected[0].StudyInstanceUID) == {rejected[0].SOPInstanceUID}
        # a KOS with another title is an ordinary instance
        other = rejection_note(codes.DCM.OfInterest, rejected)
        assert send(app, other).Status == Status.SUCCESS
        assert count(app, RejectedInstance) == 0
    finally:
        app.stop()
