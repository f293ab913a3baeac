"""`sidecar serve` as a real process: receiver processes sharing the port,
parallel associations, and clean shutdown on SIGTERM and on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE

from sidecar.dicom.statuses import Status
from sidecar.sdnotify import notify
from tests.conftest import CT_IMAGE_STORAGE, c_find, free_port, make_ct, wait_for

SIDECAR = str(Path(sys.executable).with_name("sidecar"))


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def listeners(port: int) -> int:
    """Listening TCP sockets on 127.0.0.1:port (from /proc/net/tcp)."""
    wanted = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # 0A = LISTEN
            count += 1
    return count


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, cfg: Path, log: Path) -> None:
        self.proc, self.port, self.cfg, self.log = proc, port, cfg, log

    def status(self) -> dict[str, object]:
        out = subprocess.run(
            [SIDECAR, "--config", str(self.cfg), "status", "--json"],
            capture_output=True, text=True, check=True, env=_env(),
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR")}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    port = free_port()
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"port": port, "receiver_processes": 2},
        "worker": {"enabled": False},
        "storage": {"data_dir": "data", "min_free_mb": 1},
        "logging": {"level": "INFO"},
    }))
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [SIDECAR, "--config", str(cfg), "serve"],
            stdout=fh, stderr=subprocess.STDOUT, text=True, env=_env(),
            start_new_session=True,  # its own process group, like a terminal job
        )
    served = Served(proc, port, cfg, log)
    try:
        wait_for(lambda: "sidecar ready" in log.read_text() or proc.poll() is not None,
                 60, "sidecar ready")
        assert proc.poll() is None, log.read_text()
        yield served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _send(port: int, study: str, n: int, results: list[int]) -> None:
    ae = AE(ae_title="PARALLEL")
    ae.add_requested_context(CT_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
    assert assoc.is_established
    series = generate_uid()
    for i in range(n):
        st = assoc.send_c_store(make_ct(study_uid=study, series_uid=series, instance_number=i))
        results.append(int(st.Status))
    assoc.release()


def test_receivers_share_the_port_and_stop_on_sigterm(served: Served) -> None:
    # The main process plus one spawned receiver listen on the same port.
    wait_for(lambda: len(children_of(served.proc.pid)) >= 1, 30, "receiver process")
    # Two listening sockets on the one port: the kernel spreads associations.
    assert listeners(served.port) == 2
    study = generate_uid()
    results: list[int] = []
    threads = [threading.Thread(target=_send, args=(served.port, study, 10, results))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [Status.SUCCESS] * 40
    status = served.status()
    assert status["instances_total"] == 40 and status["studies"] == 1 and status["series"] == 4

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    log = served.log.read_text()
    assert "Traceback" not in log, log


def test_ctrl_c_to_the_process_group_stops_everything(served: Served) -> None:
    wait_for(lambda: len(children_of(served.proc.pid)) >= 1, 30, "receiver process")
    kids = children_of(served.proc.pid)
    os.killpg(served.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert served.proc.wait(30) == 0, served.log.read_text()
    for kid in kids:
        wait_for(lambda k=kid: not Path(f"/proc/{k}").exists() or
                 "zombie" in Path(f"/proc/{k}/status").read_text().lower(),
                 10, f"receiver {kid} to exit")
    assert "Traceback" not in served.log.read_text()


def test_serve_answers_similarity_over_dicom_and_http(tmp_path: Path) -> None:
    """`sidecar serve` end to end: receivers in child processes, the shipped model, HTTP on."""
    import urllib.request

    from tests.test_similarity_find import similarity

    port, http_port = free_port(), free_port()
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"port": port, "receiver_processes": 2, "retrieve_ae_title": "PACS"},
        "worker": {"enabled": True, "interval": 0.5},
        "stability": {"stable_age": 0.5, "check_interval": 0.5},
        "storage": {"data_dir": "data", "min_free_mb": 1},
        "http": {"enabled": True, "port": http_port},
        "logging": {"level": "INFO"},
    }))
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([SIDECAR, "--config", str(cfg), "serve"], stdout=fh,
                                stderr=subprocess.STDOUT, text=True, env=_env(),
                                start_new_session=True)
    served = Served(proc, port, cfg, log)
    try:
        wait_for(lambda: "sidecar ready" in log.read_text() or proc.poll() is not None,
                 60, "sidecar ready")
        assert proc.poll() is None, log.read_text()
        studies = [generate_uid() for _ in range(3)]
        series = [generate_uid() for _ in range(3)]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CT_IMAGE_STORAGE)
        assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
        for i, study in enumerate(studies):
            for n in range(2):  # studies 0 and 1 hold the same pixels
                ds = make_ct(study_uid=study, series_uid=series[i], instance_number=n + 1,
                             seed=100 + (i // 2) * 10 + n, patient_id=f"P{i}")
                assert assoc.send_c_store(ds).Status == Status.SUCCESS
        assoc.release()
        wait_for(lambda: served.status()["instances"]["embedded"] == 6, 90,  # type: ignore[index]
                 "six embedded instances")

        res = c_find(("127.0.0.1", port), similarity(study=studies[0], k=2,
                                                     StudyInstanceUID=""))
        assert res.status == Status.SUCCESS
        assert [str(ds.StudyInstanceUID) for ds in res.identifiers][0] == studies[1]
        assert res.private(0x10)[0] > 0.999 and res.identifiers[0].RetrieveAETitle == "PACS"

        base = f"http://127.0.0.1:{http_port}"
        with urllib.request.urlopen(f"{base}/v1/similar?study={studies[0]}&k=2") as rsp:
            body = json.loads(rsp.read())
        assert [h["study_instance_uid"] for h in body["hits"]][0] == studies[1]
        with urllib.request.urlopen(f"{base}/healthz") as rsp:
            health = json.loads(rsp.read())
        assert health["status"] == "ok", health
        with urllib.request.urlopen(f"{base}/metrics") as rsp:
            metrics = rsp.read().decode()
        assert 'sidecar_instances{state="embedded"} 6.0' in metrics
        assert "sidecar_quarantine_datasets 0.0" in metrics
        assert "sidecar_quarantine_bytes 0.0" in metrics
        assert 'sidecar_queries_total{interface="dicom",outcome="ok"} 1.0' in metrics
        assert 'sidecar_queries_total{interface="http",outcome="ok"} 1.0' in metrics
        audit = (tmp_path / "data" / "audit" / "similarity-queries.jsonl").read_text()
        assert [json.loads(x)["interface"] for x in audit.splitlines()] == ["dicom", "http"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log.read_text()
        assert "Traceback" not in text, text
        assert studies[0] not in text and "P0" not in text.split()  # no UIDs/IDs at INFO
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_systemd_is_told_ready_only_once_the_port_answers_and_then_stopping(
    tmp_path: Path,
) -> None:
    """Type=notify (deploy/pacs-sidecar.service): READY=1 once the DICOM port accepts
    associations, STOPPING=1 when SIGTERM arrives; a socket stands in for systemd's."""
    port = free_port()
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({
        "dicom": {"port": port, "receiver_processes": 2}, "worker": {"enabled": False},
        "storage": {"data_dir": "data", "min_free_mb": 1},
    }))
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(address))
        systemd.settimeout(60)
        proc = subprocess.Popen(
            [SIDECAR, "--config", str(cfg), "serve"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**_env(), "NOTIFY_SOCKET": str(address)},
            start_new_session=True,
        )
        try:
            ready = systemd.recv(4096).decode()
            assert ready.startswith("READY=1\n") and f"127.0.0.1:{port}" in ready, ready
            # ready means ready: both listening sockets are there, an echo succeeds now
            assert listeners(port) == 2
            ae = AE(ae_title="SYSTEMD")
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == Status.SUCCESS
            assoc.release()
            proc.send_signal(signal.SIGTERM)
            assert systemd.recv(4096) == b"STOPPING=1"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_notify_abstract_socket_and_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pacs-sidecar-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + name)
        systemd.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STATUS=x") is True
        assert systemd.recv(100) == b"STATUS=x"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False  # a terminal or a container: nothing to tell
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify("READY=1") is False
