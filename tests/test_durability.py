"""The durability order of a C-STORE: file fsynced, its directory fsynced, row committed,
and only then the Success response (issue 19's "durability order" test).

The calls are recorded as they happen in the running node (os.fsync, the catalogue's
commit, pynetdicom sending the C-STORE-RSP); the test fails if any of the three comes
after the response, or is missing (storage.fsync: true, the default).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import event

from sidecar.config import Config
from sidecar.service.app import Sidecar
from tests.conftest import CT_IMAGE_STORAGE, make_ct


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, what: str) -> None:
        with self._lock:
            self.events.append((kind, what))


def test_success_is_sent_only_after_file_directory_and_row_are_durable(
    config: Config, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert config.storage.fsync
    rec = Recorder()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        try:
            rec.add("fsync", os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            rec.add("fsync", "?")

    real_send = DIMSEServiceProvider.send_msg

    def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            rec.add("response", f"{primitive.AffectedSOPInstanceUID}:{int(primitive.Status)}")
        real_send(self, primitive, context_id)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", send_msg)
    app = Sidecar(config)
    event.listen(app.engine, "commit", lambda conn: rec.add("commit", ""))
    app.start()
    try:
        assert app.address is not None
        datasets = [make_ct(seed=i) for i in range(3)]
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", app.address[1], ae_title="SIDECAR")
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
        finally:
            assoc.release()
    finally:
        app.stop()
    assert statuses == [0, 0, 0]
    storage = config.storage_dir.resolve()
    start = 0
    for ds in datasets:
        end = rec.events.index(("response", f"{ds.SOPInstanceUID}:0"), start)
        before = rec.events[start:end]
        series = storage / ds.StudyInstanceUID / ds.SeriesInstanceUID

        sop, series_dir = str(ds.SOPInstanceUID), str(series)
        i_file = next(i for i, e in enumerate(before) if e[0] == "fsync"
                      and e[1].endswith(".part") and sop in Path(e[1]).name)
        i_dir = next(i for i, e in enumerate(before) if e == ("fsync", series_dir))
        i_commit = max(i for i, e in enumerate(before) if e[0] == "commit")
        assert i_file < i_dir < i_commit, before
        start = end + 1
