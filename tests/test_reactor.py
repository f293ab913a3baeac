"""pynetdicom's reactors wake on work (``sidecar.dicom.reactor``): same behaviour, no leaks.

No timing is asserted (the benchmark measures it: ``bench/ingest.py --profile``);
these tests check that the patched loops still do everything the originals do
(stores, a release, an abort, a network timeout), wake on what they wait for,
and close every wake pipe when an association ends.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dul import DULServiceProvider

from sidecar.dicom import reactor
from sidecar.service.app import Sidecar
from tests.conftest import make_ct, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"


def open_fds() -> int:
    return len(pipes())


def pipes() -> list[str]:
    """This process's open pipes (the wake pipes are the only pipes pynetdicom has)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            out.append(target)
    return out


def associate(port: int) -> object:
    ae = AE(ae_title="REACTOR")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", port, ae_title="SIDECAR")
    assert assoc.is_established
    return assoc


def test_install_is_idempotent_and_patches_both_loops(running: Sidecar) -> None:
    reactor.install()
    reactor.install()
    assert DULServiceProvider.run_reactor is reactor._run_reactor  # noqa: SLF001


def test_stores_releases_and_aborts_work_and_leave_no_descriptor_behind(
    running: Sidecar, tmp_path: Path,
) -> None:
    port = running.config.dicom.port
    for _ in range(3):  # warm up: pools, caches, the first association's threads
        a = associate(port)
        a.release()  # type: ignore[attr-defined]
    wait_for(lambda: threading.active_count() < 40, 30, "threads to end")
    before = open_fds()
    for i in range(20):
        a = associate(port)
        ds = make_ct(instance_number=i + 1, seed=i)
        status = a.send_c_store(ds)  # type: ignore[attr-defined]
        assert status.Status == 0x0000
        if i % 2:
            a.release()  # type: ignore[attr-defined]
        else:
            a.abort()  # type: ignore[attr-defined]
    assert running.repository.status().instances_by_state["pending"] == 20
    # both ends' DUL threads end and close their pipes (the server's a moment later)
    wait_for(lambda: open_fds() <= before, 30, "the wake pipes to be closed")


def test_a_sleeping_dul_wakes_for_a_primitive_to_send(running: Sidecar) -> None:
    """A C-ECHO on an idle association: the request goes out although the DUL loop
    waits in select(); many in a row prove the wake-up path (each would otherwise
    still work, only later: the loop's timeout is kept)."""
    a = associate(running.config.dicom.port)
    woken: list[int] = []
    original = reactor._dul_wait  # noqa: SLF001

    def counting(dul: object, seconds: float) -> None:
        woken.append(1)
        original(dul, seconds)

    reactor._dul_wait = counting  # type: ignore[assignment]  # noqa: SLF001
    try:
        for _ in range(10):
            assert a.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
    finally:
        reactor._dul_wait = original  # noqa: SLF001
        a.release()  # type: ignore[attr-defined]
    assert woken  # the patched wait was in use


def test_the_network_timeout_still_ends_an_idle_association(
    config_factory: object,
) -> None:
    cfg = config_factory({"dicom": {"network_timeout": 1}})  # type: ignore[operator]
    app = Sidecar(cfg)
    app.start()
    try:
        a = associate(cfg.dicom.port)
        wait_for(lambda: not a.is_established, 30, "the idle association to end")  # type: ignore[attr-defined]
    finally:
        app.stop()


def test_a_waiting_loop_never_swallows_the_wake_up_of_a_thread_that_takes_the_message() -> None:
    """The loop's wait and a ``get_msg(block=True)`` share the queue's condition: the
    one ``notify`` of a ``put`` must reach the thread that takes the message (else it
    sleeps until its DIMSE timeout, seen as a 5 s stall of a C-ECHO)."""
    import queue  # noqa: PLC0415
    import time  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    q: queue.Queue[int] = queue.Queue()
    acceptor = SimpleNamespace(dimse=SimpleNamespace(msg_queue=q), is_acceptor=True)
    stop = threading.Event()

    def loop() -> None:  # the reactor: waits, never takes the message itself here
        while not stop.is_set():
            reactor._assoc_wait(acceptor, 0.5)  # noqa: SLF001

    got: list[float] = []

    def taker() -> None:
        t0 = time.monotonic()
        q.get(timeout=20)
        got.append(time.monotonic() - t0)

    threads = [threading.Thread(target=loop), threading.Thread(target=taker)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)  # both wait on the condition now
        q.put(1)
        threads[1].join(30)
        assert got and got[0] < 10, got  # woken by the put, not by its 20 s timeout
    finally:
        stop.set()
        threads[0].join(5)
