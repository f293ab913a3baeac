"""Ordinary C-FIND (Study Root and Patient Root) against a live node.

One node per module holds a small catalogue (five studies of four patients,
stored through InstanceStore, the C-STORE code path); pynetdicom and DCMTK
``findscu`` query it over TCP. Tests that change the node's behaviour
(cancellation, database failure, other branches) undo it or use their own
node on the same catalogue.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite

from sidecar.archive.store import Origin
from sidecar.config import Config, load_config
from sidecar.db import find_queries
from sidecar.dicom import find
from sidecar.dicom.find import CatalogueFind, FindAnswer, FindRequest, Level
from sidecar.dicom.node import DicomNode
from sidecar.dicom.statuses import Status
from sidecar.errors import InvalidQuery, QueryError
from sidecar.service.app import Sidecar
from tests.conftest import (
    FIND_MSG_ID,
    c_find,
    dcmtk_env,
    dcmtk_tool,
    free_port,
    make_ct,
    part10,
)

# Queries with wildcards in CS values and bad dates on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
              pytest.mark.catalogue]  # on SQLite and PostgreSQL (tests/conftest.py)

PACS_AE = "MAINPACS"


# ------------------------------------------------------------------ catalogue
@dataclass
class Catalogue:
    """UIDs of the stored studies, series and instances, by short name."""

    app: Sidecar
    study: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    sops: dict[str, list[str]] = field(default_factory=dict)

    def names(self, uids: list[str]) -> set[str]:
        by_uid = {v: k for k, v in self.study.items()}
        return {by_uid[u] for u in uids}


#: study name: patient (id, name), date, time, description, accession,
#: series [(name, modality, number, instances)]
STUDIES: dict[str, tuple[tuple[str, str], str, str, str, str, list[tuple[str, str, int, int]]]] = {
    "A1": (("PAT-A", "Doe^Jane"), "20240110", "083000", "CT HEAD", "ACC-A1",
           [("A1-CT", "CT", 1, 3), ("A1-MR", "MR", 2, 2)]),
    "A2": (("PAT-A", "Doe^Jane"), "20240215", "120030", "CT_CHEST 100%", "ACC-A2",
           [("A2-CT", "CT", 1, 1)]),
    "B1": (("PAT-B", "Smith^John"), "20231231", "170000", "MR KNEE", "ACC-B1",
           [("B1-MR", "MR", 3, 2)]),
    "C1": (("PAT-C", "SMITH^ANNA"), "", "", "CTXCHEST 1000", "ACC-C1",
           [("C1-CT", "CT", 1, 1)]),
    "D1": (("PAT-D", "Müller^Jörg"), "20240301", "101010", "PET BRAIN", "ACC-D1",
           [("D1-PT", "PT", 1, 1)]),
}


def _config(tmp: Path, database_url: str = "", **dicom: Any) -> Config:
    data: dict[str, Any] = {
        "dicom": {"port": free_port(), **dicom},
        "storage": {"data_dir": str(tmp / "data"), "min_free_mb": 1, "fsync": False},
        "worker": {"enabled": False},
    }
    if database_url:
        data["database"] = {"url": database_url}
    path = tmp / "sidecar.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, environ={})


@pytest.fixture(scope="module")
def cat(tmp_path_factory: pytest.TempPathFactory, module_database_url: str,
        ) -> Iterator[Catalogue]:
    cfg = _config(tmp_path_factory.mktemp("find"), module_database_url,
                  retrieve_ae_title=PACS_AE)
    app = Sidecar(cfg)
    app.start()
    cat = Catalogue(app)
    seed = 0
    for name, ((pid, pname), date, tm, desc, acc, series) in STUDIES.items():
        cat.study[name] = generate_uid()
        for se_name, modality, number, count in series:
            cat.series[se_name] = generate_uid()
            cat.sops[se_name] = []
            for i in range(count):
                seed += 1
                ds = make_ct(
                    study_uid=cat.study[name], series_uid=cat.series[se_name],
                    instance_number=i + 1, patient_id=pid, patient_name=pname,
                    rows=8, cols=8, seed=seed,
                )
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.StudyDate, ds.StudyTime, ds.StudyDescription = date, tm, desc
                ds.AccessionNumber, ds.Modality, ds.SeriesNumber = acc, modality, number
                app.store.store(part10(ds), ExplicitVRLittleEndian, Origin("PACS", "127.0.0.1"))
                cat.sops[se_name].append(str(ds.SOPInstanceUID))
    try:
        yield cat
    finally:
        app.stop()


# ------------------------------------------------------------------ client
def scu(*ts: str) -> AE:
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for model in (STUDY_ROOT, PATIENT_ROOT):
        ae.add_requested_context(model, list(ts) or None)
    return ae


def query(level: str | None = None, **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wildcards in CS values, bad dates: on purpose
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
    return ds


def studies(cat: Catalogue, **keys: Any) -> set[str]:
    """Names of the studies a Study Root STUDY query with ``keys`` returns."""
    keys.setdefault("StudyInstanceUID", "")
    res = c_find(cat.app.address, query("STUDY", **keys))
    assert res.status == Status.SUCCESS, res.final
    return cat.names([str(u) for u in res.values("StudyInstanceUID")])


def keywords(ds: Dataset) -> set[str]:
    return {elem.keyword for elem in ds}


# ------------------------------------------------------------------ negotiation
def test_both_models_prefer_explicit_vr_little_endian(cat: Catalogue) -> None:
    # pynetdicom's requestor lists Implicit VR first; the node's order wins.
    assert cat.app.address is not None
    assoc = scu(ImplicitVRLittleEndian, ExplicitVRLittleEndian).associate(
        *cat.app.address, ae_title="SIDECAR"
    )
    try:
        accepted = {
            str(cx.abstract_syntax): cx.transfer_syntax[0] for cx in assoc.accepted_contexts
        }
    finally:
        assoc.release()
    assert accepted == {STUDY_ROOT: ExplicitVRLittleEndian, PATIENT_ROOT: ExplicitVRLittleEndian}


# ------------------------------------------------------------------ study level
def test_single_value_returns_only_the_requested_keys(cat: Catalogue) -> None:
    res = c_find(
        cat.app.address,
        query("STUDY", PatientID="PAT-B", PatientName="", StudyDate="", StudyInstanceUID=""),
    )
    assert res.status == Status.SUCCESS and res.pending == [Status.PENDING]
    (ds,) = res.identifiers
    assert keywords(ds) == {
        "QueryRetrieveLevel", "RetrieveAETitle",
        "PatientID", "PatientName", "StudyDate", "StudyInstanceUID",
    }
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.RetrieveAETitle == PACS_AE  # dicom.retrieve_ae_title: the PACS
    assert (ds.PatientID, str(ds.PatientName), ds.StudyDate) == ("PAT-B", "Smith^John", "20231231")
    assert ds.StudyInstanceUID == cat.study["B1"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"StudyDescription": "CT HEAD"}, {"A1"}),
        ({"StudyDescription": "ct head"}, set()),  # case-sensitive
        ({"AccessionNumber": "ACC-A2"}, {"A2"}),
        ({"PatientName": "smith^john"}, {"B1"}),  # PN: case-insensitive
        ({"PatientName": "SMITH^ANNA"}, {"C1"}),
        ({"PatientID": "PAT-A", "StudyDescription": "MR KNEE"}, set()),  # keys are ANDed
    ],
)
def test_single_value_matching(cat: Catalogue, keys: dict[str, str], expected: set[str]) -> None:
    assert studies(cat, **keys) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"StudyDescription": "CT *"}, {"A1"}),
        ({"StudyDescription": "?T HEAD"}, {"A1"}),
        ({"StudyDescription": "CT*"}, {"A1", "A2", "C1"}),
        ({"StudyDescription": "ct*"}, set()),  # wildcards stay case-sensitive
        # SQL's own wildcards in the value match literally:
        ({"StudyDescription": "CT_CHEST 100%*"}, {"A2"}),
        ({"StudyDescription": "CT_CHEST 100%"}, {"A2"}),
        ({"StudyDescription": "CT?CHEST 100*"}, {"A2", "C1"}),
        ({"StudyDescription": "*100%"}, {"A2"}),
        ({"PatientName": "smith^*"}, {"B1", "C1"}),  # PN wildcard, case-insensitive
        ({"PatientName": "doe?jane"}, {"A1", "A2"}),
        ({"PatientName": "doe_jane*"}, set()),  # "_" is literal in the PN (LIKE) path too
        ({"PatientName": "*"}, {"A1", "A2", "B1", "C1", "D1"}),
        ({"AccessionNumber": "ACC-?1"}, {"A1", "B1", "C1", "D1"}),
    ],
)
def test_wildcard_matching(cat: Catalogue, keys: dict[str, str], expected: set[str]) -> None:
    assert studies(cat, **keys) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"StudyDate": "20240110"}, {"A1"}),
        ({"StudyDate": "20240101-"}, {"A1", "A2", "D1"}),  # open end; C1 has no date
        ({"StudyDate": "-20240110"}, {"B1", "A1"}),  # open start; the empty date never matches
        ({"StudyDate": "20240101-20240131"}, {"A1"}),
        ({"StudyDate": "20240110-20240215"}, {"A1", "A2"}),  # inclusive
        ({"StudyDate": "20231231\\20240215"}, {"B1", "A2"}),  # any of several values
        ({"StudyDate": ""}, {"A1", "A2", "B1", "C1", "D1"}),  # universal
        ({"StudyTime": "-1200"}, {"A1", "A2", "D1"}),  # 12:00:30 lies within 12:00
        ({"StudyTime": "0800-0900"}, {"A1"}),
        ({"StudyTime": "1200-"}, {"A2", "B1"}),
        ({"StudyDate": "20240101-", "StudyTime": "-1100"}, {"A1", "D1"}),
    ],
)
def test_range_matching(cat: Catalogue, keys: dict[str, str], expected: set[str]) -> None:
    assert studies(cat, **keys) == expected


def test_uid_list_and_universal_matching(cat: Catalogue) -> None:
    assert studies(cat, StudyInstanceUID=[cat.study["A1"], cat.study["B1"]]) == {"A1", "B1"}
    assert studies(cat, StudyInstanceUID=cat.study["C1"]) == {"C1"}
    assert studies(cat, StudyInstanceUID="1.2.3.999") == set()
    assert studies(cat) == set(STUDIES)


def test_study_level_computed_keys(cat: Catalogue) -> None:
    res = c_find(
        cat.app.address,
        query(
            "STUDY", StudyInstanceUID=cat.study["A1"], ModalitiesInStudy="",
            NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
        ),
    )
    (ds,) = res.identifiers
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]
    assert (ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances) == (2, 5)
    assert res.pending == [Status.PENDING]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("MR", {"A1", "B1"}), ("PT\\MR", {"A1", "B1", "D1"}), ("C?", {"A1", "A2", "C1"}),
     ("XA", set())],
)
def test_modalities_in_study_matches_any_series(
    cat: Catalogue, value: str, expected: set[str]
) -> None:
    assert studies(cat, ModalitiesInStudy=value) == expected


# ------------------------------------------------------------ series and image
def test_series_level(cat: Catalogue) -> None:
    res = c_find(
        cat.app.address,
        query(
            "SERIES", StudyInstanceUID=cat.study["A1"], SeriesInstanceUID="", Modality="",
            SeriesNumber="", NumberOfSeriesRelatedInstances="",
        ),
    )
    assert res.status == Status.SUCCESS
    got = {(ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.NumberOfSeriesRelatedInstances)
           for ds in res.identifiers}
    assert got == {(cat.series["A1-CT"], "CT", 1, 3), (cat.series["A1-MR"], "MR", 2, 2)}
    assert all(ds.StudyInstanceUID == cat.study["A1"] for ds in res.identifiers)
    assert all(ds.QueryRetrieveLevel == "SERIES" for ds in res.identifiers)

    mr = c_find(cat.app.address, query("SERIES", StudyInstanceUID=cat.study["A1"],
                                       SeriesInstanceUID="", Modality="MR"))
    assert mr.values("SeriesInstanceUID") == [cat.series["A1-MR"]]
    numbered = c_find(cat.app.address, query("SERIES", StudyInstanceUID=cat.study["A1"],
                                             SeriesInstanceUID="", SeriesNumber="2"))
    assert numbered.values("SeriesInstanceUID") == [cat.series["A1-MR"]]


def test_image_level(cat: Catalogue) -> None:
    base = {"StudyInstanceUID": cat.study["A1"], "SeriesInstanceUID": cat.series["A1-CT"]}
    res = c_find(cat.app.address, query("IMAGE", SOPInstanceUID="", InstanceNumber="",
                                        SOPClassUID="", **base))
    assert res.status == Status.SUCCESS
    assert sorted(res.values("InstanceNumber")) == [1, 2, 3]
    assert set(res.values("SOPInstanceUID")) == set(cat.sops["A1-CT"])
    assert set(res.values("SOPClassUID")) == {"1.2.840.10008.5.1.4.1.1.2"}

    two = cat.sops["A1-CT"][:2]
    listed = c_find(cat.app.address, query("IMAGE", SOPInstanceUID=two, **base))
    assert sorted(listed.values("SOPInstanceUID")) == sorted(two)
    second = c_find(cat.app.address, query("IMAGE", SOPInstanceUID="", InstanceNumber="2", **base))
    assert second.values("SOPInstanceUID") == [cat.sops["A1-CT"][1]]


def test_higher_level_keys_filter_and_are_returned(cat: Catalogue) -> None:
    res = c_find(cat.app.address, query("SERIES", StudyInstanceUID=cat.study["A1"],
                                        SeriesInstanceUID="", PatientName="", StudyDate=""))
    assert {str(n) for n in res.values("PatientName")} == {"Doe^Jane"}
    assert set(res.values("StudyDate")) == {"20240110"}
    nothing = c_find(cat.app.address, query("SERIES", StudyInstanceUID=cat.study["A1"],
                                            SeriesInstanceUID="", StudyDate="19990101"))
    assert nothing.identifiers == [] and nothing.status == Status.SUCCESS


# ------------------------------------------------------------------ patient root
def test_patient_root_patient_level(cat: Catalogue) -> None:
    res = c_find(
        cat.app.address,
        query("PATIENT", PatientID="", PatientName="", NumberOfPatientRelatedStudies="",
              NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances=""),
        PATIENT_ROOT,
    )
    assert res.status == Status.SUCCESS
    got = {ds.PatientID: (ds.NumberOfPatientRelatedStudies, ds.NumberOfPatientRelatedSeries,
                          ds.NumberOfPatientRelatedInstances) for ds in res.identifiers}
    assert got == {"PAT-A": (2, 3, 6), "PAT-B": (1, 1, 2), "PAT-C": (1, 1, 1),
                   "PAT-D": (1, 1, 1)}
    assert all(ds.QueryRetrieveLevel == "PATIENT" for ds in res.identifiers)
    wild = c_find(cat.app.address, query("PATIENT", PatientID="PAT-[AB]*"), PATIENT_ROOT)
    assert wild.identifiers == []  # "[" is literal, never a character class
    some = c_find(cat.app.address, query("PATIENT", PatientID="PAT-?", PatientName="smith*"),
                  PATIENT_ROOT)
    assert sorted(some.values("PatientID")) == ["PAT-B", "PAT-C"]


def test_patient_root_study_level_needs_the_patient_id(cat: Catalogue) -> None:
    res = c_find(cat.app.address, query("STUDY", PatientID="PAT-A", StudyInstanceUID=""),
                 PATIENT_ROOT)
    assert cat.names(res.values("StudyInstanceUID")) == {"A1", "A2"}
    missing = c_find(cat.app.address, query("STUDY", StudyInstanceUID=""), PATIENT_ROOT)
    assert missing.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert missing.final.ErrorComment == "PatientID is required at STUDY level"


# ------------------------------------------------------------------ bad identifiers
@pytest.mark.parametrize(
    ("identifier", "model", "comment", "offending"),
    [
        (query(None, StudyInstanceUID=""), STUDY_ROOT, "QueryRetrieveLevel is missing",
         0x00080052),
        (query("PATIENT", PatientID=""), STUDY_ROOT,
         "QueryRetrieveLevel PATIENT is invalid for Study Root", 0x00080052),
        (query("FOO", StudyInstanceUID=""), PATIENT_ROOT,
         "QueryRetrieveLevel FOO is invalid for Patient Root", 0x00080052),
        (query("IMAGE", StudyInstanceUID="1.2.3", SOPInstanceUID=""), STUDY_ROOT,
         "SeriesInstanceUID is required at IMAGE level", 0x0020000E),
        (query("SERIES", StudyInstanceUID="", SeriesInstanceUID=""), STUDY_ROOT,
         "StudyInstanceUID is required at SERIES level", 0x0020000D),
        (query("STUDY", StudyInstanceUID="", SOPInstanceUID="1.2.3"), STUDY_ROOT,
         "SOPInstanceUID is below the STUDY level", 0x00080018),
        (query("STUDY", StudyDate="2024-01-01"), STUDY_ROOT,
         "StudyDate: '2024-01-01' is not a valid range", 0x00080020),
        (query("STUDY", StudyDate="202401-"), STUDY_ROOT,
         "StudyDate: '202401' is not a date or date range", 0x00080020),
    ],
    ids=["no-level", "patient-in-study-root", "unknown-level", "image-without-series",
         "series-without-study", "lower-unique-key", "bad-range", "bad-date"],
)
def test_bad_identifiers_fail_with_a_comment(
    cat: Catalogue, identifier: Dataset, model: str, comment: str, offending: int
) -> None:
    res = c_find(cat.app.address, identifier, model)
    assert res.identifiers == []
    assert res.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert res.final.ErrorComment == comment
    assert res.final.OffendingElement == offending


def test_unsupported_keys_are_returned_empty_with_a_warning(cat: Catalogue) -> None:
    ident = query("STUDY", StudyInstanceUID=cat.study["B1"], InstitutionName="",
                  NumberOfStudyRelatedSeries="7")
    ident.add_new(0x00111010, "LO", "private")  # no creator: neither matched nor returned
    res = c_find(cat.app.address, ident)
    assert res.pending == [Status.PENDING_WARNING]
    (ds,) = res.identifiers
    assert ds.InstitutionName == ""
    assert ds.NumberOfStudyRelatedSeries == 1  # a return key, never matched
    assert 0x00111010 not in ds


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(None, "ISO_IR 192"), ("ISO_IR 100", "ISO_IR 100"), ("ISO_IR 192", "ISO_IR 192")],
)
def test_character_set_of_responses(
    cat: Catalogue, requested: str | None, expected: str
) -> None:
    ident = query("STUDY", StudyInstanceUID="", PatientID="PAT-D", PatientName="")
    if requested:
        ident.SpecificCharacterSet = requested
    (ds,) = c_find(cat.app.address, ident).identifiers
    assert ds.SpecificCharacterSet == expected
    assert str(ds.PatientName) == "Müller^Jörg"
    ascii_only = query("STUDY", StudyInstanceUID=cat.study["B1"], PatientName="")
    if requested:
        ascii_only.SpecificCharacterSet = requested
    (plain,) = c_find(cat.app.address, ascii_only).identifiers
    assert plain.get("SpecificCharacterSet") == requested  # echoed only when asked with one


# ------------------------------------------------------------------ statuses
def test_cancel_after_the_first_match(cat: Catalogue, monkeypatch: pytest.MonkeyPatch) -> None:
    node = cat.app.node
    assert node is not None
    original = CatalogueFind.__call__

    def cancel_arrived() -> bool:
        return any(a.dimse.cancel_req for a in node.ae.active_associations)

    def held(self: CatalogueFind, request: FindRequest) -> FindAnswer:
        answer = original(self, request)
        matches = list(answer.identifiers)

        def slow() -> Iterator[Dataset]:
            yield matches[0]
            # Hold the next match until the C-CANCEL is in (no sleeping on a guess).
            end = time.monotonic() + 10.0
            while not cancel_arrived():
                assert time.monotonic() < end, "C-CANCEL never arrived"
                time.sleep(0.005)
            yield from matches[1:]

        answer.identifiers = slow()
        return answer

    monkeypatch.setattr(CatalogueFind, "__call__", held)

    def cancel(assoc: Any, n: int) -> None:
        if n == 1:
            assoc.send_c_cancel(FIND_MSG_ID, query_model=STUDY_ROOT)

    res = c_find(cat.app.address, query("STUDY", StudyInstanceUID=""), on_pending=cancel)
    assert len(res.identifiers) == 1 < len(STUDIES)
    assert res.status == Status.CANCEL
    # The node serves the next query on a fresh association normally.
    monkeypatch.undo()
    assert studies(cat) == set(STUDIES)


def test_database_failure_is_out_of_resources(cat: Catalogue, catalogue: str) -> None:
    engine = cat.app.engine

    def break_reads(conn: Any, cursor: Any, statement: str, *args: Any) -> tuple[str, Any]:
        if statement.lstrip().upper().startswith("SELECT"):
            statement = statement.replace("FROM study", "FROM vanished_study")
        return statement, args[0]

    event.listen(engine, "before_cursor_execute", break_reads, retval=True)
    try:
        res = c_find(cat.app.address, query("STUDY", StudyInstanceUID=""))
    finally:
        event.remove(engine, "before_cursor_execute", break_reads)
    assert res.identifiers == []
    assert res.status == Status.OUT_OF_RESOURCES
    # the driver's class for a missing table (sqlite3, psycopg)
    error = {"sqlite": "OperationalError", "postgresql": "ProgrammingError"}[catalogue]
    assert res.final.ErrorComment == f"catalogue unavailable ({error})"
    assert studies(cat) == set(STUDIES)


@pytest.fixture
def extra_node(cat: Catalogue) -> Iterator[Callable[..., tuple[str, int]]]:
    """Start more nodes on the module's catalogue (other ports, other branches)."""
    nodes: list[DicomNode] = []

    def start(**kwargs: Any) -> tuple[str, int]:
        cfg = cat.app.config.model_copy(
            update={"dicom": cat.app.config.dicom.model_copy(update={"port": free_port()})}
        )
        node = DicomNode(cfg, cat.app.store, **kwargs)
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        node.stop()


def test_more_matches_than_the_limit_are_refused(
    cat: Catalogue, extra_node: Callable[..., tuple[str, int]]
) -> None:
    finder = CatalogueFind(cat.app.engine, max_results=4, retrieve_ae_title=PACS_AE)
    node = extra_node(finder=finder)
    res = c_find(node, query("STUDY", StudyInstanceUID=""))
    assert res.identifiers == [] and res.status == Status.OUT_OF_RESOURCES
    assert res.final.ErrorComment == "more than 4 matches: narrow the query"
    ok = c_find(node, query("STUDY", StudyDate="20240101-"))
    assert ok.status == Status.SUCCESS and len(ok.identifiers) == 3


def similarity_identifier(block: int = 0x10) -> Dataset:
    ds = query("STUDY", StudyInstanceUID="", ModalitiesInStudy="CT")
    ds.add_new(0x00990000 | block, "LO", "PACS SIDECAR SIMILARITY")
    ds.add_new(0x00990001 | (block << 8), "UI", "1.2.3.4")
    return ds


def test_similarity_identifier_without_embedding_is_out_of_resources(cat: Catalogue) -> None:
    # This catalogue's sidecar runs with the worker off: no index to search.
    res = c_find(cat.app.address, similarity_identifier())
    assert res.identifiers == [] and res.status == Status.OUT_OF_RESOURCES
    assert "embedding is turned off" in res.final.ErrorComment


def test_similarity_identifier_without_a_branch_is_refused(
    cat: Catalogue, extra_node: Callable[..., tuple[str, int]]
) -> None:
    res = c_find(extra_node(), similarity_identifier())
    assert res.identifiers == [] and res.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert res.final.ErrorComment.startswith("similarity queries not available")


class UnknownReference(QueryError):
    """What a similarity branch might raise."""


def test_similarity_branch_is_asked_first(
    cat: Catalogue, extra_node: Callable[..., tuple[str, int]]
) -> None:
    seen: list[FindRequest] = []

    def branch(request: FindRequest) -> FindAnswer:
        seen.append(request)
        if "PatientID" in request.identifier:
            raise UnknownReference("reference 1.2.3.4 is not embedded yet")
        hit = Dataset()
        hit.QueryRetrieveLevel = "STUDY"
        hit.StudyInstanceUID = cat.study["B1"]
        return FindAnswer(level=Level.STUDY, identifiers=[hit], count=1)

    addr = extra_node(similarity=branch)
    res = c_find(addr, similarity_identifier(block=0x11))
    assert res.values("StudyInstanceUID") == [cat.study["B1"]] and res.status == Status.SUCCESS
    assert seen[0].model == STUDY_ROOT and seen[0].calling_ae_title == "FINDSCU"
    failing = similarity_identifier()
    failing.PatientID = ""
    res = c_find(addr, failing)
    assert res.status == Status.UNABLE_TO_PROCESS
    assert res.final.ErrorComment == "reference 1.2.3.4 is not embedded yet"
    # Ordinary queries still go to the catalogue.
    assert len(c_find(addr, query("STUDY", StudyInstanceUID="")).identifiers) == len(STUDIES)
    assert len(seen) == 2


def test_logs_level_and_count_never_patient_data(
    cat: Catalogue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar")
    caplog.set_level(logging.INFO)
    c_find(cat.app.address, query("STUDY", PatientID="PAT-A", PatientName="Doe*",
                                  StudyInstanceUID=""))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(re.search(r"C-FIND Study Root STUDY from FINDSCU@127\.0\.0\.1: 2 match", m)
               for m in messages), messages
    text = "\n".join(r.getMessage() for r in caplog.records)  # DEBUG included
    assert "PAT-A" not in text and "Doe" not in text
    bad_date = query("STUDY", PatientBirthDate="1970011X")  # pydicom warns here, client side
    caplog.clear()
    bad = c_find(cat.app.address, bad_date)
    assert bad.status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "1970011X" in bad.final.ErrorComment
    info = [r.getMessage() for r in caplog.records
            if r.levelno >= logging.INFO and r.name.startswith(("sidecar", "pynetdicom"))]
    assert any("refused: InvalidQuery (PatientBirthDate)" in m for m in info), info
    assert not any("1970011X" in m for m in info)


# ------------------------------------------------------------------ DCMTK
def test_dcmtk_findscu(cat: Catalogue) -> None:
    tool = dcmtk_tool("findscu")
    assert cat.app.address is not None
    host, port = cat.app.address
    proc = subprocess.run(
        [tool, "-S", "-aet", "DCMTKSCU", "-aec", "SIDECAR",
         "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=PAT-A",
         "-k", "StudyInstanceUID", "-k", "StudyDate", host, str(port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    blocks = re.split(r"Find Response: \d+ \((\w+)\)", output)[1:]
    statuses, bodies = blocks[0::2], blocks[1::2]
    assert statuses == ["Pending", "Pending"], output
    responses = []
    for body in bodies:
        assert "Little Endian Explicit" in body
        responses.append({
            tag.upper(): value.rstrip(" \x00")  # UI values are padded with NUL
            for tag, value in re.findall(r"\(([0-9a-fA-F]{4},[0-9a-fA-F]{4})\) \w\w \[([^\]]*)\]",
                                         body)
        })
    assert {r["0020,000D"] for r in responses} == {cat.study["A1"], cat.study["A2"]}
    assert {r["0008,0020"] for r in responses} == {"20240110", "20240215"}
    assert all(r["0010,0020"] == "PAT-A" and r["0008,0052"] == "STUDY" for r in responses)
    assert all(r["0008,0054"] == PACS_AE for r in responses)
    assert all(set(r) == {"0008,0052", "0008,0054", "0010,0020", "0020,000D", "0008,0020"}
               for r in responses)


# ------------------------------------------------------------------ pure parts
def test_wildcard_patterns_escape_sql() -> None:
    assert find_queries.like_pattern("A_B%C!*?") == "A!_B!%C!!%_"
    assert find_queries.glob_pattern("A[B]*?") == "A[[]B]*?"


def test_wildcards_compile_per_dialect() -> None:
    q = find.parse_query(query("STUDY", StudyDescription="CT*", PatientName="doe*"), STUDY_ROOT)
    stmt = find_queries.build_select(q)
    lite = str(stmt.compile(dialect=sqlite.dialect()))
    pg = str(stmt.compile(dialect=postgresql.dialect()))
    assert "study.study_description GLOB" in lite and "lower(patient.patient_name) LIKE" in lite
    assert "study.study_description LIKE" in pg and "ESCAPE '!'" in pg
    assert "patient.patient_name ILIKE" in pg


def test_response_character_set_choice() -> None:
    assert find.response_character_set([], []) is None
    assert find.response_character_set(["ISO_IR 100"], []) == ["ISO_IR 100"]
    assert find.response_character_set(["ISO_IR 100"], ["Müller"]) == ["ISO_IR 100"]
    assert find.response_character_set(["ISO_IR 100"], ["山田"]) == ["ISO_IR 192"]
    assert find.response_character_set([], ["Müller"]) == ["ISO_IR 192"]
    assert find.response_character_set(["", "ISO 2022 IR 87"], ["山田"]) == ["ISO_IR 192"]


def test_non_hierarchical_parse_for_other_branches() -> None:
    ident = query("SERIES", SeriesInstanceUID="", Modality="CT")
    with pytest.raises(InvalidQuery, match="StudyInstanceUID is required"):
        find.parse_query(ident, STUDY_ROOT)
    q = find.parse_query(ident, STUDY_ROOT, hierarchical=False)
    assert q.level is Level.SERIES and len(q.conditions) == 1 and not q.unsupported


def test_similarity_detection() -> None:
    assert find.is_similarity_query(similarity_identifier())
    assert find.is_similarity_query(similarity_identifier(block=0x42))
    other = query("STUDY")
    other.add_new(0x00990010, "LO", "SOMEONE ELSE")
    assert not find.is_similarity_query(other)
    assert not find.is_similarity_query(query("STUDY", StudyInstanceUID=""))
