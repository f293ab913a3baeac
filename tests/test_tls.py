"""DICOM over TLS (``dicom.tls``): DCMTK and pynetdicom clients against the real node.

A throw-away PKI comes from ``scripts.tls_pki.py`` (the ``openssl`` command): a
CA standing for the PACS's, a server certificate for 127.0.0.1, a client
certificate signed by the CA and one signed by another CA. Skipped without
``openssl``; the DCMTK cases also without DCMTK, the Orthanc case without Orthanc.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from scripts.orthanc_pacs import Modality, OrthancPacs, OrthancTls, orthanc_available, wait_until
from scripts.tls_pki import OPENSSL, Pki, make_pki
from sidecar.cli.main import main
from sidecar.config import Config
from sidecar.dicom.statuses import Status
from sidecar.errors import ConfigError
from sidecar.service.app import Sidecar
from tests.conftest import dcmtk_env, dcmtk_tool, make_ct, part10

VERIFICATION = "1.2.840.10008.1.1"

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, **extra: object) -> dict[str, object]:
    return {"enabled": True, "certificate": str(pki.server_cert),
            "private_key": str(pki.server_key), "ca_certificates": str(pki.ca), **extra}


@pytest.fixture
def tls_node(pki: Pki, config_factory: Callable[..., Config],
             sidecar_factory: Callable[[Config], Sidecar]) -> Callable[..., tuple[Config, int]]:
    def start(**extra: object) -> tuple[Config, int]:
        cfg = config_factory({"dicom": {"tls": tls_settings(pki, **extra)}})
        app = sidecar_factory(cfg)
        assert app.address is not None
        return cfg, app.address[1]
    return start


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def pynetdicom_echo(port: int, ctx: ssl.SSLContext | None) -> int | None:
    """C-ECHO status over TLS (``ctx``) or plain TCP; ``None``: no association."""
    ae = AE(ae_title="TLSTEST")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 5
    tls_args = (ctx, "127.0.0.1") if ctx is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR", tls_args=tls_args)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def dcmtk(tool: str, pki: Pki | None, port: int, *args: str | Path,
          cert: Path | None = None, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A DCMTK client over TLS with ``pki``'s client certificate (or ``cert``/``key``);
    ``pki`` None: plain DICOM."""
    tls = [] if pki is None else [
        "+tls", str(key or pki.client_key), str(cert or pki.client_cert), "+cf", str(pki.ca)]
    return subprocess.run(
        [dcmtk_tool(tool), *tls, "-aet", "PACS", "-aec", "SIDECAR", "-to", "10",
         "127.0.0.1", str(port), *map(str, args)],
        capture_output=True, text=True, timeout=60, env=dcmtk_env(),
    )


# ----------------------------------------------------------------- tests
@pytest.mark.dcmtk
def test_dcmtk_echo_and_store_over_mutual_tls(
    pki: Pki, tls_node: Callable[..., tuple[Config, int]], tmp_path: Path,
) -> None:
    cfg, port = tls_node()
    echo = dcmtk("echoscu", pki, port)
    assert echo.returncode == 0, echo.stderr
    ds = make_ct(study_uid=generate_uid(), series_uid=generate_uid(), instance_number=1)
    path = tmp_path / "ct.dcm"
    path.write_bytes(part10(ds))
    store = dcmtk("storescu", pki, port, path)
    assert store.returncode == 0, store.stderr
    stored = list(cfg.storage_dir.rglob(f"{ds.SOPInstanceUID}.dcm"))
    assert len(stored) == 1
    assert dcmread(stored[0]).PixelData == ds.PixelData
    # a certificate from another CA is refused at the handshake
    rogue = dcmtk("echoscu", pki, port, cert=pki.rogue_cert, key=pki.rogue_key)
    assert rogue.returncode != 0
    # a plain DICOM client gets no association
    plain = dcmtk("echoscu", None, port)
    assert plain.returncode != 0


def test_pynetdicom_clients_with_and_without_certificates(
    pki: Pki, tls_node: Callable[..., tuple[Config, int]], caplog: pytest.LogCaptureFixture,
) -> None:
    _, port = tls_node()
    good = client_context(pki, pki.client_cert, pki.client_key)
    assert pynetdicom_echo(port, good) == Status.SUCCESS
    with caplog.at_level("WARNING", logger="sidecar.dicom.tls"):
        assert pynetdicom_echo(port, client_context(pki, None, None)) is None
        assert pynetdicom_echo(port, client_context(pki, pki.rogue_cert, pki.rogue_key)) is None
        assert pynetdicom_echo(port, None) is None  # plain DICOM on the TLS port
    failures = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(failures) == 3, failures
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in m for m in failures), failures
    assert any("CERTIFICATE_VERIFY_FAILED (unable to get local issuer certificate)" in m
               for m in failures), failures
    assert any("WRONG_VERSION_NUMBER" in m for m in failures), failures
    # the node still serves good clients afterwards
    assert pynetdicom_echo(port, good) == Status.SUCCESS


def test_without_required_client_certificates_any_tls_client_is_served(
    pki: Pki, tls_node: Callable[..., tuple[Config, int]], caplog: pytest.LogCaptureFixture,
) -> None:
    _, port = tls_node(require_client_certificate=False, ca_certificates=None)
    assert pynetdicom_echo(port, client_context(pki, None, None)) == Status.SUCCESS
    assert pynetdicom_echo(port, None) is None  # still TLS only
    # with the CA given, a certificate is optional, but one that is presented must be valid
    _, port = tls_node(require_client_certificate=False)
    with caplog.at_level("INFO", logger="sidecar.dicom.node"):
        assert pynetdicom_echo(port, client_context(pki, None, None)) == Status.SUCCESS
        mutual = client_context(pki, pki.client_cert, pki.client_key)
        assert pynetdicom_echo(port, mutual) == Status.SUCCESS
    assert pynetdicom_echo(port, client_context(pki, pki.rogue_cert, pki.rogue_key)) is None
    # the association log line says how each peer was authenticated
    accepted = [r.getMessage() for r in caplog.records if "accepted" in r.getMessage()]
    assert len(accepted) == 2, accepted
    assert "accepted over TLSv1." in accepted[0] and accepted[0].endswith(
        ", no client certificate"), accepted
    assert accepted[1].endswith(", client certificate CN=pacs"), accepted


def test_a_stalled_handshake_delays_no_one_and_times_out(
    pki: Pki, tls_node: Callable[..., tuple[Config, int]], caplog: pytest.LogCaptureFixture,
) -> None:
    _, port = tls_node(handshake_timeout=1.5)
    good = client_context(pki, pki.client_cert, pki.client_key)
    with caplog.at_level("WARNING", logger="sidecar.dicom.tls"), \
            socket.create_connection(("127.0.0.1", port)):  # connects, then says nothing
        started = time.monotonic()
        assert pynetdicom_echo(port, good) == Status.SUCCESS
        assert time.monotonic() - started < 1.5, "the stalled client held up the handshake"
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not any(
                "timed out" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    assert any("TLS handshake with 127.0.0.1 timed out" in r.getMessage()
               for r in caplog.records)


def test_bad_tls_files_are_named_by_check_config_and_at_start(
    pki: Pki, config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    conf = tmp_path / "sidecar.yaml"
    # the key of another certificate
    conf.write_text(
        "dicom:\n  tls:\n    enabled: true\n"
        f"    certificate: {pki.server_cert}\n    private_key: {pki.client_key}\n"
        f"    ca_certificates: {pki.ca}\n"
    )
    result = CliRunner().invoke(main, ["check-config", "--config", str(conf)])
    assert result.exit_code == 1 and "cannot use certificate" in result.output, result.output
    conf.write_text(
        "dicom:\n  tls:\n    enabled: true\n"
        f"    certificate: {pki.server_cert}\n    private_key: {pki.server_key}\n"
        "    ca_certificates: missing-ca.pem\n"
    )
    result = CliRunner().invoke(main, ["check-config", "--config", str(conf)])
    assert result.exit_code == 1 and f"{tmp_path / 'missing-ca.pem'} does not exist" in \
        result.output, result.output
    cfg = config_factory({"dicom": {"tls": tls_settings(pki, private_key=str(pki.rogue_key))}})
    with pytest.raises(ConfigError, match="cannot use certificate"):
        Sidecar(cfg)
    with pytest.raises(ConfigError, match="ca_certificates are not set|ca_certificates is not"):
        config_factory({"dicom": {"tls": {"enabled": True, "certificate": "c.pem",
                                          "private_key": "k.pem"}}})


def test_receiver_processes_serve_tls_too(
    pki: Pki, config_factory: Callable[..., Config],
) -> None:
    cfg = config_factory({"dicom": {"tls": tls_settings(pki)}})
    app = Sidecar(cfg, receiver_processes=2)
    app.start()
    try:
        good = client_context(pki, pki.client_cert, pki.client_key)
        deadline = time.monotonic() + 30.0
        while pynetdicom_echo(cfg.dicom.port, good) != Status.SUCCESS:  # children still starting
            assert time.monotonic() < deadline, "no TLS echo from the receiver processes"
            time.sleep(0.2)
        assert all(pynetdicom_echo(cfg.dicom.port, good) == Status.SUCCESS for _ in range(4))
        assert pynetdicom_echo(cfg.dicom.port, None) is None
    finally:
        app.stop()


@pytest.mark.orthanc
def test_orthanc_forwards_over_tls(
    pki: Pki, config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar], tmp_path: Path,
) -> None:
    """Orthanc as the PACS, its modality entry for the sidecar with UseDicomTls: its store
    job presents Orthanc's certificate (signed by the PACS CA) and checks ours."""
    if not orthanc_available():
        pytest.skip("Orthanc not installed at /usr/sbin/Orthanc (apt-get install orthanc)")
    cfg = config_factory({"dicom": {"tls": tls_settings(pki)}})
    app = sidecar_factory(cfg)
    assert app.address is not None
    pacs = OrthancPacs(
        tmp_path / "orthanc", stable_age=1,
        sidecar=Modality(cfg.dicom.ae_title, *app.address, use_tls=True),
        tls=OrthancTls(pki.client_cert, pki.client_key, pki.ca),
    )
    study, series = generate_uid(), generate_uid()
    sops = []
    try:
        pacs.start()
        for i in range(3):
            ds = make_ct(study_uid=study, series_uid=series, instance_number=i + 1, seed=i)
            pacs.upload(part10(ds))
            sops.append(str(ds.SOPInstanceUID))
        try:
            wait_until(lambda: app.repository.status().studies == 1 and len(
                list(cfg.storage_dir.rglob("*.dcm"))) == 3, timeout=30,
                what="the study forwarded over TLS")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{pacs.log_tail()}") from exc
        stored = sorted(p.stem for p in cfg.storage_dir.rglob("*.dcm"))
        assert stored == sorted(sops)
        jobs = pacs.jobs()
        assert [(j["Type"], j["State"]) for j in jobs] == [("DicomModalityStore", "Success")]
    finally:
        pacs.stop()


def test_the_evaluation_sidecar_runs_without_tls_on_a_tls_site(
    pki: Pki, config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    """`sidecar evaluate` path (b) starts its own loopback sidecar and talks plain DICOM
    to it: a site's TLS settings must not reach that sidecar."""
    from sidecar.lab.pipeline import pipeline_config

    site = config_factory({"dicom": {"tls": tls_settings(pki)}})
    cfg = pipeline_config(site, tmp_path / "eval", top_k=5, examples=1, gallery=10)
    assert site.dicom.tls.enabled and not cfg.dicom.tls.enabled
    assert cfg.dicom.bind_address == "127.0.0.1"


def tls_yaml(cert: Path, key: Path, ca: Path) -> str:
    return ("dicom:\n  tls:\n    enabled: true\n"
            f"    certificate: {cert}\n    private_key: {key}\n    ca_certificates: {ca}\n")


def self_signed(directory: Path, name: str, not_before: dt.datetime,
                not_after: dt.datetime) -> tuple[Path, Path]:
    """A self-signed certificate valid between two dates, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_certificate_validity_is_checked_reported_and_exported(
    pki: Pki, config_factory: Callable[..., Config],
    sidecar_factory: Callable[[Config], Sidecar], tmp_path: Path,
    caplog: pytest.LogCaptureFixture, cli_isolation: None,
) -> None:
    # The test PKI's certificates live two days: valid, within the warning period.
    # The running node logs that and exports the expiry for monitoring.
    with caplog.at_level("INFO", logger="sidecar.service.app"):
        app = sidecar_factory(config_factory({"dicom": {"tls": tls_settings(pki)}}))
    assert any(r.levelname == "WARNING" and "DICOM TLS certificate CN=sidecar, valid until "
               in r.getMessage() and "(2 days): renew it" in r.getMessage()
               for r in caplog.records), caplog.text
    not_after = x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).not_valid_after_utc
    exported = [line for line in app.metrics.render().decode().splitlines()
                if line.startswith("sidecar_tls_certificate_expiry_timestamp_seconds ")]
    assert len(exported) == 1 and float(exported[0].split()[1]) == not_after.timestamp()
    plain = sidecar_factory(config_factory())
    assert "sidecar_tls_certificate_expiry" not in plain.metrics.render().decode()
    # ... and says it again every day while the service runs, ERROR once it has expired
    job = app.scheduler.get_job("report_tls_certificate")
    assert job is not None and job.trigger.interval == dt.timedelta(days=1)
    assert plain.scheduler.get_job("report_tls_certificate") is None
    assert app.tls_certificate is not None
    app.tls_certificate = dataclasses.replace(
        app.tls_certificate, not_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    caplog.clear()
    with caplog.at_level("INFO", logger="sidecar.service.app"):
        app.report_tls_certificate()
    assert [(r.levelname, "has expired: TLS peers refuse every association" in r.getMessage())
            for r in caplog.records] == [("ERROR", True)], caplog.text
    # check-config says the same (the CLI sets logging up: after the caplog part)
    conf = tmp_path / "sidecar.yaml"
    conf.write_text(tls_yaml(pki.server_cert, pki.server_key, pki.ca))
    result = CliRunner().invoke(main, ["check-config", "--config", str(conf)])
    assert result.exit_code == 0, result.output
    assert "# WARNING: DICOM TLS certificate CN=sidecar, valid until " in result.stderr
    assert "(2 days): renew it soon" in result.stderr
    # an expired certificate, or one not valid yet, is refused by check-config and at start
    now = dt.datetime.now(dt.UTC)
    for name, start, end, problem in (
        ("expired", now - dt.timedelta(days=30), now - dt.timedelta(days=1), "expired on"),
        ("future", now + dt.timedelta(days=1), now + dt.timedelta(days=400), "not valid before"),
    ):
        cert, key = self_signed(tmp_path, name, start, end)
        conf.write_text(tls_yaml(cert, key, pki.ca))
        result = CliRunner().invoke(main, ["check-config", "--config", str(conf)])
        assert result.exit_code == 1 and problem in result.output, result.output
        bad = config_factory({"dicom": {"tls": tls_settings(
            pki, certificate=str(cert), private_key=str(key))}})
        with pytest.raises(ConfigError, match=problem):
            Sidecar(bad)
    # a year-long certificate is reported without a warning
    cert, key = self_signed(tmp_path, "year", now - dt.timedelta(days=1),
                            now + dt.timedelta(days=365))
    conf.write_text(tls_yaml(cert, key, pki.ca))
    result = CliRunner().invoke(main, ["check-config", "--config", str(conf)])
    assert result.exit_code == 0, result.output
    assert "# DICOM TLS certificate CN=year, valid until " in result.stderr
    assert "(365 days)" in result.stderr and "WARNING" not in result.stderr
