"""What a store killed at the worst moments leaves, and the tidy that clears it.

Each case runs the real store path in a child process that SIGKILLs itself at one
moment (before the link, between the link and the commit, after the commit but
before the temporary is removed); a store made afterwards tidies at start.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from sidecar.archive.store import InstanceStore, Origin
from sidecar.archive.verify import verify_storage
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.errors import OutOfResources
from tests.conftest import make_ct, part10

ROOT = Path(__file__).resolve().parents[1]

# The child stores one file and SIGKILLs itself at the moment named by argv[3].
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import sidecar.archive.store as store_mod
    from sidecar.archive.store import InstanceStore, Origin
    from sidecar.config import load_config
    from sidecar.db.connect import open_catalogue

    cfg = load_config(Path(sys.argv[1]), environ={})
    data = Path(sys.argv[2]).read_bytes()
    moment = sys.argv[3]
    engine, repo = open_catalogue(cfg)
    store = InstanceStore(cfg, repo)

    def die(*_a, **_k):
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "before_link":
        store_mod.os.link = die
    elif moment == "before_commit":
        repo.record_instance = die
    elif moment == "after_commit":
        store_mod.unlink_quietly = die
    store.store(data, None, Origin("PACS", "127.0.0.1"))
    print("not killed")
""")


def killed_store(cfg_path: Path, ds: Dataset, moment: str, tmp_path: Path) -> None:
    blob = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    blob.write_bytes(part10(ds))
    res = subprocess.run([sys.executable, "-c", CHILD, str(cfg_path), str(blob), moment],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr


def leftovers(cfg: Config) -> list[Path]:
    tmp = cfg.storage_dir / ".tmp"
    return sorted(p for p in tmp.rglob("*.part"))


def test_a_store_killed_at_each_moment_is_tidied_at_the_next_start(
    config_factory: Callable[..., Config], tmp_path: Path,
) -> None:
    cfg = config_factory()
    cfg_path = tmp_path / "sidecar.yaml"
    never_linked, linked_no_row, acknowledged = make_ct(seed=1), make_ct(seed=2), make_ct(seed=3)
    for ds, moment in ((never_linked, "before_link"), (linked_no_row, "before_commit"),
                       (acknowledged, "after_commit")):
        killed_store(cfg_path, ds, moment, tmp_path)
        # its own leftover only: the next child's start tidied the one before, at any
        # age (seconds old here)
        assert [p.name.split("_")[2].rsplit(".", 2)[0] for p in leftovers(cfg)] \
            == [ds.SOPInstanceUID]

    engine, repo = open_catalogue(cfg)
    try:
        store = InstanceStore(cfg, repo)  # tidies at start
        try:
            assert leftovers(cfg) == []
            # dead owners' directories and locks are gone (ours is made at the first store)
            assert sorted((cfg.storage_dir / ".tmp").iterdir()) == []
            # acknowledged: file and row kept; linked without a row: quarantined as an orphan
            kept = repo.find_instance(str(acknowledged.SOPInstanceUID))
            assert kept is not None and (cfg.storage_dir / kept.file_path).read_bytes() \
                == part10(acknowledged)
            assert repo.find_instance(str(linked_no_row.SOPInstanceUID)) is None
            orphans = list((cfg.quarantine_dir / "orphans").rglob("*.dcm"))
            assert [p.name for p in orphans] == [f"{linked_no_row.SOPInstanceUID}.dcm"]
            assert orphans[0].read_bytes() == part10(linked_no_row)
            report = verify_storage(cfg, engine, checksums=True, min_age=0)
            assert report.clean and report.rows == 1 and report.files == 1, report.to_dict()
            # a second tidy finds nothing; the resend of the orphan's instance is stored
            assert not store.tidy().anything
            store.store(part10(linked_no_row), None, Origin("PACS", "127.0.0.1"))
            assert repo.find_instance(str(linked_no_row.SOPInstanceUID)) is not None
        finally:
            store.close()
    finally:
        engine.dispose()


def test_a_live_stores_temporaries_are_never_tidied(config_factory: Callable[..., Config]) -> None:
    cfg = config_factory()
    engine, repo = open_catalogue(cfg)
    try:
        live = InstanceStore(cfg, repo)
        ds = make_ct()
        live.store(part10(ds), None, Origin("PACS", "h"))  # makes its spool
        spool = live._spool  # noqa: SLF001 - the directory a store in flight writes into
        assert spool is not None
        in_flight = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, "1.2.3")
        in_flight.write_bytes(b"being written")
        other = InstanceStore(cfg, repo)  # another process's start, e.g. `sidecar ingest`
        report = other.tidy()
        assert in_flight.exists() and report.owners == 0 and report.temporaries == 0
        in_flight.unlink()
        other.close()
        live.close()
        assert sorted((cfg.storage_dir / ".tmp").iterdir()) == []  # closed: nothing left
    finally:
        engine.dispose()


def test_a_full_disk_answers_out_of_resources_and_keeps_nothing(
    config_factory: Callable[..., Config], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC while writing (injected at the write: the resources campaign of `make
    torture` fills a real filesystem) is out of resources, and leaves no file or row."""
    import sidecar.files as files_mod

    cfg = config_factory()
    engine, repo = open_catalogue(cfg)
    try:
        store = InstanceStore(cfg, repo)
        real_write = os.write

        def full(fd: int, data: bytes | memoryview) -> int:
            if len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(files_mod.os, "write", full)
        ds = make_ct()
        with pytest.raises(OutOfResources, match="storage full"):
            store.store(part10(ds), None, Origin("PACS", "h"))
        monkeypatch.undo()
        assert repo.find_instance(str(ds.SOPInstanceUID)) is None
        assert [p for p in cfg.storage_dir.rglob("*") if p.is_file()
                and p.suffix != ".lock"] == []
        store.store(part10(ds), None, Origin("PACS", "h"))  # space again: stored
        assert repo.find_instance(str(ds.SOPInstanceUID)) is not None
        store.close()
    finally:
        engine.dispose()


def test_a_dead_owners_empty_directory_is_removed_without_a_log_line(
    config_factory: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_factory()
    engine, repo = open_catalogue(cfg)
    try:
        first = InstanceStore(cfg, repo)
        first.store(part10(make_ct()), None, Origin("PACS", "h"))  # makes its spool
        spool = first._spool  # noqa: SLF001 - its directory, empty between two stores
        assert spool is not None
        os.close(spool._fd)  # noqa: SLF001 - its lock released, as if its process died
        spool._fd = -1  # noqa: SLF001
        with caplog.at_level(logging.INFO, logger="sidecar.archive.store"):
            second = InstanceStore(cfg, repo)  # the restart: tidies at start
        report = second.tidy()
        assert not report.anything
        assert not [r for r in caplog.records if "tidied" in r.getMessage()]
        assert sorted((cfg.storage_dir / ".tmp").iterdir()) == []
        second.close()
    finally:
        engine.dispose()
