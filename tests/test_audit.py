"""The DICOM audit trail: PS3.15 A.5 messages, the local file and a real syslog collector.

Every message is validated against the schema the standard publishes
(PS3.15 A.5.1.1, tests/data/dicom-audit-message.rnc, converted to RELAX NG
XML with rnc2rng and checked with lxml). The collector is real: UDP, TCP
(octet counting) and TLS (mutual, with the test PKI) socket servers in this
process. The DICOM traffic is real too: pynetdicom associations that store,
query (ordinary and similarity) and get refused.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import rnc2rng
from click.testing import CliRunner
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from scripts.tls_pki import OPENSSL, Pki, make_pki
from sidecar.audit.events import Auditor
from sidecar.audit.messages import (
    APPLICATION_ACTIVITY,
    Event,
    Participant,
    SopClassCount,
    Source,
    render,
)
from sidecar.audit.syslog import BOM, MSGID, SyslogSender, frame
from sidecar.audit.trail import AuditTrail
from sidecar.cli.main import main
from sidecar.config import Config, load_config
from sidecar.dicom.statuses import Status
from sidecar.errors import ConfigError
from sidecar.http.tokens import TokenStore
from sidecar.service.app import Sidecar
from tests.conftest import (
    CT_IMAGE_STORAGE,
    SIMILARITY_CREATOR,
    c_find,
    dcmtk_env,
    dcmtk_tool,
    free_port,
    make_ct,
    part10,
    wait_for,
)

SCHEMA_FILE = Path(__file__).parent / "data" / "dicom-audit-message.rnc"
SECRET_NAME = "Doe^Secret"
RFC5424 = re.compile(
    rb"^<85>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\S+) (?P<msgid>\S+) - (?P<msg>.*)$",
    re.DOTALL,
)


# ------------------------------------------------------------------ schema
@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    """The standard's schema. Its ``##`` documentation comments become plain comments:
    rnc2rng does not accept them after a value (they carry no constraint)."""
    source = SCHEMA_FILE.read_text(encoding="utf-8").replace("##", "#")
    rng = rnc2rng.dumps(rnc2rng.loads(source))
    return etree.RelaxNG(etree.fromstring(rng.encode("utf-8")))


def validated(schema: etree.RelaxNG, xml: bytes) -> etree._Element:
    doc = etree.fromstring(xml)
    assert schema.validate(doc), f"{schema.error_log}\n{xml.decode()}"
    return doc


def event_id(doc: etree._Element) -> tuple[str, tuple[str, ...]]:
    ident = doc.find("EventIdentification")
    assert ident is not None
    types = tuple(e.get("csd-code", "") for e in ident.findall("EventTypeCode"))
    return ident.find("EventID").get("csd-code", ""), types  # type: ignore[union-attr]


def parse_record(record: bytes) -> tuple[dict[str, bytes], bytes]:
    """An RFC 5424 message: its header fields and the XML after the BOM."""
    m = RFC5424.match(record)
    assert m is not None, record[:120]
    msg = m["msg"]
    assert msg.startswith(BOM)
    return m.groupdict(), msg[len(BOM):]


# ------------------------------------------------------------------ collector
@dataclass
class Collector:
    """A syslog collector in a thread: UDP datagrams or RFC 6587 octet-counted streams."""

    protocol: str
    tls: ssl.SSLContext | None = None
    messages: list[bytes] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        kind = socket.SOCK_DGRAM if self.protocol == "udp" else socket.SOCK_STREAM
        self._sock = socket.socket(socket.AF_INET, kind)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.protocol == "udp":
                    data, _ = self._sock.recvfrom(70000)
                    with self._lock:
                        self.messages.append(data)
                    continue
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn.settimeout(5)
                conn = self.tls.wrap_socket(conn, server_side=True)
                cert = conn.getpeercert()
                subject = dict(x[0] for x in cert.get("subject", ())) if cert else {}
                with self._lock:
                    self.peers.append(str(subject.get("commonName", "")))
            conn.settimeout(0.2)
            buf = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:  # MSG-LEN SP SYSLOG-MSG
                    head, rest = buf.split(b" ", 1)
                    n = int(head)
                    if len(rest) < n:
                        break
                    with self._lock:
                        self.messages.append(rest[:n])
                    buf = rest[n:]
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    def xml(self) -> list[bytes]:
        with self._lock:
            return [parse_record(m)[1] for m in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@contextmanager
def collector(protocol: str, tls: ssl.SSLContext | None = None) -> Iterator[Collector]:
    c = Collector(protocol, tls)
    try:
        yield c
    finally:
        c.close()


def audit_file(cfg: Config) -> list[bytes]:
    """The XML of every line of the local audit file."""
    return [parse_record(line)[1] for line in cfg.audit_file_path.read_bytes().splitlines()]


def kinds(schema: etree.RelaxNG, messages: list[bytes]) -> list[tuple[str, tuple[str, ...]]]:
    return [event_id(validated(schema, m)) for m in messages]


# ------------------------------------------------------------------ DICOM helpers
def store(port: int, calling: str, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def refused_association(port: int, calling: str) -> bool:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
    if assoc.is_established:
        assoc.release()
    return bool(assoc.is_rejected)


def peers(**extra: object) -> dict[str, Any]:
    return {"allow_loopback": False, "allowed_peers": [
        {"ae_title": "PACS", "host": "127.0.0.1", "permissions": ["store"]},
        {"ae_title": "VIEWER", "host": "127.0.0.1", "permissions": ["find"]},
    ], **extra}


def find_query() -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.PatientID = ""
    return q


def similarity_query(study_uid: str) -> Dataset:
    q = find_query()
    block = q.private_block(0x0099, SIMILARITY_CREATOR, create=True)
    block.add_new(0x02, "UI", study_uid)
    return q


# ------------------------------------------------------------------ tests: messages
def test_every_kind_of_message_validates_against_the_standard_schema(
    schema: etree.RelaxNG,
) -> None:
    sent: list[bytes] = []

    class ListSink:
        def emit(self, event: Event, source: Source) -> None:
            sent.append(render(event, source))

    a = Auditor(Source("SIDECAR@host", "HOSPITAL", "SIDECAR", "pacs-sidecar[1]", "host"),
                ListSink())
    a.application_start("svc")
    a.application_stop("")
    a.association_accepted("PACS", "10.0.0.5", "TLSv1.3 CN=pacs")
    a.association_refused("ROGUE", "SIDECAR", "10.0.0.9", "calling AE title not allowed")
    a.permission_refused("VIEWER", "10.0.0.7", "store", "C-STORE")
    a.instances_received("PACS", "10.0.0.5", "1.2.3", "PID-1", "HOSP",
                         [SopClassCount(CT_IMAGE_STORAGE, 3)], failed=1)
    a.instances_received("VIEWER", "10.0.0.7", "1.2.4", "", "",
                         [SopClassCount(CT_IMAGE_STORAGE, 1)], example=True)
    a.dicom_query("VIEWER", "10.0.0.7", "1.2.840.10008.5.1.4.1.2.2.1", b"\x08\x00\x52\x00",
                  ExplicitVRLittleEndian, matches=4, status=0, similarity=True)
    a.http_query("reader", "10.0.0.8", {"study": "1.2.3", "k": 5}, results=5)
    a.study_deleted("admin", "1.2.3", "PID-1", "", [SopClassCount(CT_IMAGE_STORAGE, 3)],
                    reason="sidecar delete-study")
    a.instances_deleted("PACS", "10.0.0.5", "1.2.3", "PID-1", "",
                        [SopClassCount(CT_IMAGE_STORAGE, 1, ("1.2.3.4.5",))],
                        reason="IOCM rejection note 1.2.9: Rejected for Quality Reasons (hide)",
                        permanent=False)
    a.authentication_failure("", "10.0.0.8", "bearer token not recognised")
    a.access_refused("reader", "10.0.0.8", "POST /v1/admin")
    a.files_released("1.2.3", "PID-1", "", [SopClassCount(CT_IMAGE_STORAGE, 2, ("1.2.3.4.6",
                                                                              "1.2.3.4.7"))],
                     policy="until_embedded")
    a.user_session("reader", "10.0.0.8")
    a.user_session("reader", "10.0.0.8", logout=True)
    got = kinds(schema, sent)
    assert got == [
        ("110100", ("110120",)), ("110100", ("110121",)),
        ("110113", ("110126",)), ("110113", ("110126",)), ("110113", ("110132",)),
        ("110104", ()), ("110104", ()), ("110112", ()), ("110112", ()), ("110105", ()),
        ("110103", ()), ("110114", ("110122",)), ("110113", ("110132",)), ("110103", ()),
        ("110114", ("110122",)), ("110114", ("110123",)),
    ]
    stored = etree.fromstring(sent[5])
    assert stored.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
    patient = stored.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient is not None and patient.get("ParticipantObjectID") == "PID-1^^^HOSP"
    sop = stored.find(".//SOPClass")
    assert sop is not None and (sop.get("UID"), sop.get("NumberOfInstances")) == (
        CT_IMAGE_STORAGE, "3")


def test_the_schema_check_can_fail(schema: etree.RelaxNG) -> None:
    """A message without its AuditSourceIdentification, or with an unknown outcome, is refused."""
    ok = (b'<AuditMessage><EventIdentification EventActionCode="E" EventDateTime='
          b'"2026-01-01T00:00:00Z" EventOutcomeIndicator="0"><EventID csd-code="110100" '
          b'codeSystemName="DCM" originalText="Application Activity"/></EventIdentification>'
          b'<ActiveParticipant UserID="x" UserIsRequestor="false"/>'
          b'<AuditSourceIdentification AuditSourceID="s"/></AuditMessage>')
    assert schema.validate(etree.fromstring(ok))
    assert not schema.validate(etree.fromstring(ok.replace(b'Outcome' + b'Indicator="0"',
                                                           b'OutcomeIndicator="1"')))
    assert not schema.validate(etree.fromstring(
        ok.replace(b'<AuditSourceIdentification AuditSourceID="s"/>', b"")))


def test_framing_follows_rfc5424_and_atna() -> None:
    rec = frame(b"<AuditMessage/>", hostname="node 1", app_name="pacs-sidecar", procid="42")
    fields, xml = parse_record(rec)
    assert (fields["host"], fields["app"], fields["proc"], fields["msgid"]) == (
        b"node1", b"pacs-sidecar", b"42", MSGID.encode())
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", fields["ts"])
    assert xml == b"<AuditMessage/>"


# ------------------------------------------------------------------ tests: the service
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_associations_stores_queries_and_refusals_reach_file_and_collector(
    protocol: str, schema: etree.RelaxNG, config_factory: Callable[..., Config],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with collector(protocol) as col:
        cfg = config_factory({
            "dicom": peers(),
            "audit": {"source_id": "SIDECAR-TEST", "enterprise_site_id": "HOSPITAL",
                      "syslog": {"enabled": True, "host": "127.0.0.1", "port": col.port,
                                 "protocol": protocol}},
        })
        app = Sidecar(cfg)
        with caplog.at_level(logging.INFO):
            app.start()
            try:
                assert app.address is not None
                port = app.address[1]
                study_a, study_b = generate_uid(), generate_uid()
                cts = [make_ct(study_uid=study_a, patient_id="PID-A", seed=1),
                       make_ct(study_uid=study_a, patient_id="PID-A", seed=2, instance_number=2),
                       make_ct(study_uid=study_b, patient_id="PID-B", seed=3)]
                assert store(port, "PACS", cts) == [0, 0, 0]
                assert refused_association(port, "ROGUE")
                found = c_find(app.address, find_query(), calling="VIEWER")
                assert found.status == Status.SUCCESS and len(found.identifiers) == 2
                refused = c_find(app.address, similarity_query(study_a), calling="VIEWER")
                assert refused.status == Status.NOT_AUTHORIZED
            finally:
                app.stop()
        wait_for(lambda: len(col.messages) >= len(audit_file(cfg)), 5, "collector")
    local = audit_file(cfg)
    assert sorted(col.xml()) == sorted(local)  # every message went both ways
    got = kinds(schema, local)
    assert got[0] == ("110100", ("110120",)) and got[-1] == ("110100", ("110121",))
    assert got.count(("110104", ())) == 2  # one per study of the association
    assert ("110113", ("110126",)) in got  # node authentication (accepted and refused)
    assert got.count(("110112", ())) == 2  # both C-FINDs, the refused one too
    assert ("110113", ("110132",)) in got  # use of a restricted function
    docs = [etree.fromstring(m) for m in local]
    # the refused association names the peer and fails (minor)
    rogue = [d for d in docs if d.find(".//ParticipantObjectIdentification[@ParticipantObjectID"
                                       "='ROGUE@127.0.0.1']") is not None]
    assert rogue and rogue[0].find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
    # one Instances Transferred per study, with its patient and SOP class counts
    transfers = {d.find(".//ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
                 .get("ParticipantObjectID"): d for d in docs  # type: ignore[union-attr]
                 if event_id(d)[0] == "110104"}
    assert set(transfers) == {study_a, study_b}
    a = transfers[study_a]
    assert a.find(".//SOPClass").get("NumberOfInstances") == "2"  # type: ignore[union-attr]
    assert a.find(".//ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']"
                  ).get("ParticipantObjectID") == "PID-A"  # type: ignore[union-attr]
    source = a.find("ActiveParticipant[@UserIsRequestor='true']")
    assert source is not None and source.get("UserID") == "PACS"
    assert source.get("NetworkAccessPointID") == "127.0.0.1"
    assert a.find("AuditSourceIdentification").get("AuditSourceID") == "SIDECAR-TEST"  # type: ignore[union-attr]
    # the queries carry their identifiers, transfer syntax, kind and match count
    queries = [d for d in docs if event_id(d)[0] == "110112"]
    details = [{x.get("type"): base64.b64decode(x.get("value", "")) for x in
                q.findall(".//ParticipantObjectDetail")} for q in queries]
    assert [(d["QueryKind"], d["NumberOfMatches"], d["Status"])
            for d in details] == [(b"ordinary", b"2", b"0000"), (b"similarity", b"0", b"0124")]
    raw = base64.b64decode(queries[1].find(".//ParticipantObjectQuery").text or "")  # type: ignore[union-attr]
    implicit = details[1]["TransferSyntax"] == ImplicitVRLittleEndian.encode()
    ident = read_dataset(DicomBytesIO(raw), is_implicit_VR=implicit, is_little_endian=True)
    assert ident.QueryRetrieveLevel == "STUDY"
    assert ident.private_block(0x0099, SIMILARITY_CREATOR)[0x02].value == study_a
    # no patient names in the audit, no patient IDs in the logs at INFO
    whole = cfg.audit_file_path.read_bytes()
    assert SECRET_NAME.encode() not in whole
    assert not [r for r in caplog.records if r.levelno >= logging.INFO
                and ("PID-A" in r.getMessage() or SECRET_NAME in r.getMessage())]


def test_collector_down_never_slows_stores_and_drops_are_counted(
    schema: etree.RelaxNG, config_factory: Callable[..., Config],
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = config_factory({"audit": {"associations": "refused", "syslog": {
        "enabled": True, "host": "127.0.0.1", "port": dead, "protocol": "tcp",
        "retry_seconds": 0.5, "timeout": 1.0}}})
    app = Sidecar(cfg)
    app.start()
    try:
        assert app.address is not None
        study = generate_uid()
        cts = [make_ct(study_uid=study, seed=i, instance_number=i + 1) for i in range(10)]
        for i in range(0, 10, 2):  # five associations, one study each
            started = time.perf_counter()
            assert store(app.address[1], "PACS", cts[i:i + 2]) == [0, 0]
            assert time.perf_counter() - started < 2.0
        def failures_shown() -> str | None:
            text = app.metrics.render().decode()
            return text if re.search(r"^sidecar_audit_send_failures_total [1-9]", text,
                                     re.M) else None

        text = wait_for(failures_shown, 10, "send failures counted")
        assert re.search(r"^sidecar_audit_records_written_total [1-9]", text, re.M)
        wait_for(lambda: app.audit_trail is not None
                 and app.audit_trail.figures().dropped["expired"] > 0, 10, "expired drops")
    finally:
        app.stop()
    assert app.audit_trail is not None
    fig = app.audit_trail.figures()
    assert fig.sent == 0 and fig.dropped["expired"] + fig.dropped["at_stop"] == fig.written
    local = kinds(schema, audit_file(cfg))  # the file has everything
    assert local.count(("110104", ())) == 5
    assert local[0] == ("110100", ("110120",)) and local[-1] == ("110100", ("110121",))


def test_the_file_is_append_only_private_and_complete_after_stop(
    schema: etree.RelaxNG, config_factory: Callable[..., Config],
) -> None:
    cfg = config_factory()
    for run in range(2):
        app = Sidecar(cfg)
        app.start()
        try:
            assert app.address is not None
            assert store(app.address[1], "PACS", [make_ct(seed=run)]) == [0]
        finally:
            app.stop()
        if run == 0:
            first = cfg.audit_file_path.read_bytes()
    whole = cfg.audit_file_path.read_bytes()
    assert whole.startswith(first) and len(whole) > len(first)
    assert stat.S_IMODE(os.stat(cfg.audit_file_path).st_mode) == 0o600
    got = kinds(schema, audit_file(cfg))
    # per run: start, association accepted, one study received, stop
    assert got == [("110100", ("110120",)), ("110113", ("110126",)), ("110104", ()),
                   ("110100", ("110121",))] * 2


def test_audit_off_writes_nothing(config_factory: Callable[..., Config]) -> None:
    cfg = config_factory({"audit": {"enabled": False}})
    app = Sidecar(cfg)
    app.start()
    app.stop()
    assert not cfg.audit_file_path.exists()
    assert b"sidecar_audit" not in app.metrics.render()


SOURCE = Source("S@h", process="p[1]")


def an_event(user: str = "u") -> Event:
    return Event(APPLICATION_ACTIVITY, "E", participants=(Participant(user, True),))


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "a.log", lambda xml: xml, queue_size=10)
    for _ in range(50):  # not started: nothing drains the queue
        trail.emit(an_event(), SOURCE)
    assert trail.figures().dropped["queue_full"] == 40
    trail.start()
    trail.stop()
    assert trail.figures().written == 10
    assert (tmp_path / "a.log").read_bytes().count(b"\n") == 10


@pytest.mark.usefixtures("cli_isolation")
def test_delete_study_is_audited(
    schema: etree.RelaxNG, config_factory: Callable[..., Config], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = config_factory()
    app = Sidecar(cfg)
    app.start()
    try:
        assert app.address is not None
        ds = make_ct(patient_id="PID-DEL")
        assert store(app.address[1], "PACS", [ds, make_ct(study_uid=ds.StudyInstanceUID,
                                                          patient_id="PID-DEL", seed=5)]) == [0, 0]
    finally:
        app.stop()
    monkeypatch.delenv("SIDECAR_CONFIG", raising=False)
    result = CliRunner().invoke(main, ["delete-study", "--yes", "--config",
                                       str(tmp_path / "sidecar.yaml"), ds.StudyInstanceUID])
    assert result.exit_code == 0, result.output
    docs = [validated(schema, m) for m in audit_file(cfg)]
    deleted = [d for d in docs if event_id(d)[0] == "110105"]
    assert len(deleted) == 1
    d = deleted[0]
    assert d.find("EventIdentification").get("EventActionCode") == "D"  # type: ignore[union-attr]
    study = d.find(".//ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
    assert study is not None and study.get("ParticipantObjectID") == ds.StudyInstanceUID
    assert study.find(".//SOPClass").get("NumberOfInstances") == "2"  # type: ignore[union-attr]
    assert d.find(".//ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']"
                  ).get("ParticipantObjectID") == "PID-DEL"  # type: ignore[union-attr]


# ------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if OPENSSL is None:
        pytest.skip("openssl command not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_collector_with_mutual_authentication(
    pki: Pki, schema: etree.RelaxNG, config_factory: Callable[..., Config],
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server.verify_mode = ssl.CERT_REQUIRED
    with collector("tls", server) as col:
        cfg = config_factory({"audit": {"syslog": {
            "enabled": True, "host": "127.0.0.1", "port": col.port, "protocol": "tls",
            "ca_certificates": str(pki.ca), "certificate": str(pki.client_cert),
            "private_key": str(pki.client_key)}}})
        app = Sidecar(cfg)
        app.start()
        try:
            assert app.address is not None
            assert store(app.address[1], "PACS", [make_ct()]) == [0]
            wait_for(lambda: len(col.messages) >= 3, 10, "messages over TLS")
        finally:
            app.stop()
        wait_for(lambda: len(col.messages) >= 4, 5, "the stop message")
        assert col.peers and col.peers[0] == "pacs"  # our client certificate was checked
        got = kinds(schema, col.xml())
    assert got == kinds(schema, audit_file(cfg))
    assert ("110104", ()) in got


def framed(text: str) -> bytes:
    return frame(text.encode(), hostname="h", app_name="a", procid="1")


def _tls_pair(pki: Pki) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(pki.ca))
    client.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return server, client


def test_tls_sender_keeps_one_connection_across_quiet_spells(pki: Pki) -> None:
    """TLS 1.3 session tickets arrive after the handshake and make the socket readable:
    they are not a close, so messages sent apart in time share one connection (a
    blocking read there used to cost one timeout and one reconnection per message)."""
    server, client = _tls_pair(pki)
    with collector("tls", server) as col:
        sender = SyslogSender("tls", "127.0.0.1", col.port, tls=client, timeout=30)
        try:
            for n in range(3):
                sender.send(framed(f"m{n}"))
                wait_for(lambda n=n: len(col.messages) > n, 10, f"message {n}")
                time.sleep(0.3)  # the tickets are in by now
        finally:
            sender.close()
        assert len(col.peers) == 1, col.peers


def test_tls_sender_reconnects_after_the_collector_closes(pki: Pki) -> None:
    server, client = _tls_pair(pki)
    with collector("tls", server) as first:
        sender = SyslogSender("tls", "127.0.0.1", first.port, tls=client, timeout=30)
        sender.send(framed("one"))
        wait_for(lambda: first.messages, 10, "the first message")
    with collector("tls", server) as second:
        sender.port = second.port
        time.sleep(0.3)  # the first collector's close has reached us
        try:
            sender.send(framed("two"))  # a dead connection would raise or be lost
            wait_for(lambda: second.messages, 10, "the second message on a new connection")
        finally:
            sender.close()
    assert len(second.peers) == 1


def test_receiver_processes_audit_through_the_main_process(
    schema: etree.RelaxNG, config_factory: Callable[..., Config],
) -> None:
    """Children hand their messages to the main process: one file, one sender, one count."""
    cfg = config_factory()
    app = Sidecar(cfg, receiver_processes=2)
    app.start()
    try:
        studies = {generate_uid() for _ in range(4)}
        for study in studies:  # one association per study, spread over the children
            assert store(cfg.dicom.port, "PACS", [make_ct(study_uid=study)]) == [0]
        trail = app.audit_trail
        assert trail is not None
        wait_for(lambda: trail.figures().written >= 1 + 2 * len(studies), 20, "relayed")
    finally:
        app.stop()
    docs = [validated(schema, m) for m in audit_file(cfg)]
    received = {d.find(".//ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']"
                       ).get("ParticipantObjectID") for d in docs  # type: ignore[union-attr]
                if event_id(d)[0] == "110104"}
    assert received == studies
    processes = {d.find("ActiveParticipant[@UserIsRequestor='false']").get("UserID")  # type: ignore[union-attr]
                 for d in docs if event_id(d)[0] == "110104"}
    assert all(p and p.startswith("pacs-sidecar[") for p in processes)
    assert f"pacs-sidecar[{os.getpid()}]" not in processes  # the children reported them


def test_a_rotated_file_is_followed(tmp_path: Path) -> None:
    """logrotate's rename-and-create: the next batch goes to a new file at the path."""
    path = tmp_path / "audit.log"
    trail = AuditTrail(path, lambda xml: xml)
    trail.start()
    trail.emit(an_event("first"), SOURCE)
    wait_for(lambda: trail.figures().written == 1, 5, "first line")
    path.rename(tmp_path / "audit.log.1")
    trail.emit(an_event("second"), SOURCE)
    trail.stop()
    old, new = (tmp_path / "audit.log.1").read_bytes(), path.read_bytes()
    assert old.count(b"\n") == 1 and b'UserID="first"' in old
    assert new.count(b"\n") == 1 and b'UserID="second"' in new


@pytest.mark.dcmtk
def test_storescu_study_is_one_message_and_a_wrong_called_title_is_an_alert(
    schema: etree.RelaxNG, config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    storescu = dcmtk_tool("storescu")
    cfg = config_factory()
    app = Sidecar(cfg)
    app.start()
    try:
        study = generate_uid()
        files = []
        for i in range(3):
            path = tmp_path / f"ct{i}.dcm"
            path.write_bytes(part10(make_ct(study_uid=study, instance_number=i + 1, seed=i)))
            files.append(str(path))
        port = str(cfg.dicom.port)
        ok = subprocess.run([storescu, "-aet", "DCMTKSCU", "-aec", "SIDECAR", "127.0.0.1", port,
                             *files], capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run([storescu, "-aet", "DCMTKSCU", "-aec", "WRONG", "127.0.0.1", port,
                              files[0]], capture_output=True, text=True, env=dcmtk_env(),
                             timeout=60)
        assert bad.returncode != 0
    finally:
        app.stop()
    docs = [validated(schema, m) for m in audit_file(cfg)]
    transfers = [d for d in docs if event_id(d)[0] == "110104"]
    assert len(transfers) == 1
    assert transfers[0].find(".//SOPClass").get("NumberOfInstances") == "3"  # type: ignore[union-attr]
    alerts = [d.find("EventIdentification/EventOutcomeDescription").text  # type: ignore[union-attr]
              for d in docs if event_id(d) == ("110113", ("110126",))
              and d.find("EventIdentification").get("EventOutcomeIndicator") == "4"]  # type: ignore[union-attr]
    assert alerts == ["association refused: called AE title not recognised (called WRONG)"]


def test_a_failed_tls_handshake_is_a_node_authentication_alert(
    pki: Pki, schema: etree.RelaxNG, config_factory: Callable[..., Config],
) -> None:
    cfg = config_factory({"dicom": {"tls": {
        "enabled": True, "certificate": str(pki.server_cert), "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca)}}})
    app = Sidecar(cfg)
    app.start()
    try:
        rogue = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        rogue.load_cert_chain(str(pki.rogue_cert), str(pki.rogue_key))
        with socket.create_connection(("127.0.0.1", cfg.dicom.port), timeout=10) as raw:
            try:
                with rogue.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.recv(1)  # TLS 1.3: the refusal of our certificate arrives here
            except (ssl.SSLError, OSError):
                pass
        trail = app.audit_trail
        assert trail is not None
        wait_for(lambda: trail.figures().written >= 2, 10, "the alert")
    finally:
        app.stop()
    docs = [validated(schema, m) for m in audit_file(cfg)]
    alerts = [d for d in docs if event_id(d) == ("110113", ("110126",))]
    assert len(alerts) == 1
    ident = alerts[0].find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "4"
    assert "TLS handshake failed" in (ident.findtext("EventOutcomeDescription") or "")


def test_a_study_partly_refused_is_a_minor_failure(
    schema: etree.RelaxNG, config_factory: Callable[..., Config],
) -> None:
    cfg = config_factory()
    app = Sidecar(cfg)
    app.start()
    try:
        study = generate_uid()
        bad = make_ct(study_uid=study, seed=3)
        del bad.SeriesInstanceUID  # refused: a required UID is missing
        sent = [make_ct(study_uid=study, seed=1), make_ct(study_uid=study, seed=2), bad]
        assert store(cfg.dicom.port, "PACS", sent) == [0, 0, int(Status.CANNOT_UNDERSTAND)]
    finally:
        app.stop()
    transfers = [d for d in (validated(schema, m) for m in audit_file(cfg))
                 if event_id(d)[0] == "110104"]
    assert len(transfers) == 1
    ident = transfers[0].find("EventIdentification")
    assert ident is not None and ident.get("EventOutcomeIndicator") == "4"
    assert ident.findtext("EventOutcomeDescription") == "1 instance(s) not stored"
    assert transfers[0].find(".//SOPClass").get("NumberOfInstances") == "2"  # type: ignore[union-attr]


def test_bad_collector_tls_files_stop_the_start_naming_the_setting(
    config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    cfg = config_factory({"audit": {"syslog": {
        "enabled": True, "host": "127.0.0.1", "ca_certificates": str(tmp_path / "none.pem")}}})
    with pytest.raises(ConfigError, match="audit.syslog"):
        Sidecar(cfg)


def test_syslog_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="audit.syslog.host is not set"):
        load_config(None, environ={"SIDECAR__AUDIT__SYSLOG__ENABLED": "true"})
    with pytest.raises(ConfigError, match="app_name"):
        load_config(None, environ={"SIDECAR__AUDIT__SYSLOG__APP_NAME": "two words"})
    cfg = load_config(None, environ={"SIDECAR__AUDIT__SYSLOG__PROTOCOL": "udp"})
    assert cfg.audit.syslog.effective_port == 514


def test_http_searches_and_refused_tokens_are_audited(
    schema: etree.RelaxNG, config_factory: Callable[..., Config]
) -> None:
    cfg = config_factory({"http": {"enabled": True, "port": free_port(), "auth": "token"},
                          "worker": {"enabled": False}})
    app = Sidecar(cfg)
    app.start()
    try:
        assert app.http is not None
        reader, _ = TokenStore(app.engine).create("reader", ["query"])
        scraper, _ = TokenStore(app.engine).create("scraper", ["metrics"])
        base = f"http://127.0.0.1:{cfg.http.port}/v1/similar?study=1.2.3.4"

        def get(token: str) -> int:
            req = urllib.request.Request(base, headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert get(reader) == 503  # embedding is off here: a query that failed
        assert get("sct_not-a-token") == 401
        assert get(scraper) == 403
    finally:
        app.stop()
    docs = [validated(schema, xml) for xml in audit_file(cfg)]
    by_event = {event_id(d): d for d in docs}
    query = by_event[("110112", ())]
    assert query.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
    user = query.find("ActiveParticipant[@UserIsRequestor='true']")
    assert user is not None and user.get("UserID") == "reader"
    keys = query.find(".//ParticipantObjectQuery")
    assert keys is not None and b"1.2.3.4" in base64.b64decode(keys.text or "")
    assert ("110114", ("110122",)) in by_event  # the unknown token: User Authentication, Login
    refused = by_event[("110113", ("110132",))]  # the metrics token: Use of Restricted Function
    who = refused.find("ActiveParticipant[@UserID='scraper']")
    assert who is not None
    assert not any(b"sct_" in xml for xml in audit_file(cfg))  # never the token itself
