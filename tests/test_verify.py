"""``sidecar verify``: the catalogue against the stored files (``sidecar.archive.verify``).

A small archive stored through the real store; then files are removed,
changed, added by hand and left half-written, and the check must name each
one, exit with the documented code and repair only what is safe to repair.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydicom.uid import generate_uid

from sidecar.archive.store import InstanceStore, Origin
from sidecar.archive.verify import verify_storage
from sidecar.cli.main import main
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.service.app import Sidecar
from sidecar.service.jobs import TIDY_INTERVAL_S
from tests.conftest import make_ct, part10

#: Every test that reaches the catalogue runs on SQLite and on PostgreSQL (tests/conftest.py).
pytestmark = pytest.mark.catalogue

OLD = time.time() - 3600.0


def store_archive(cfg: Config, n: int = 4) -> list[Path]:
    engine, repo = open_catalogue(cfg)
    try:
        store = InstanceStore(cfg, repo)
        study, series = generate_uid(), generate_uid()
        paths = []
        for i in range(n):
            ds = make_ct(study_uid=study, series_uid=series, instance_number=i + 1, seed=i)
            paths.append(store.store(part10(ds), None, Origin("TEST", "127.0.0.1")).path)
    finally:
        engine.dispose()
    return paths


def run(cfg_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(cfg_path), "verify", *args],
                              catch_exceptions=False)


@pytest.fixture
def site(config_factory: Callable[..., Config], cli_isolation: None,
         tmp_path: Path) -> tuple[Config, Path, list[Path]]:
    cfg = config_factory()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    return cfg, tmp_path / "sidecar.yaml", store_archive(cfg)


def test_a_sound_archive_verifies_clean(site: tuple[Config, Path, list[Path]]) -> None:
    cfg, conf, paths = site
    result = run(conf, "--checksums", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"] == data["files"] == len(paths) and data["clean"]
    assert data["bytes_checked"] == sum(p.stat().st_size for p in paths)
    assert run(conf).stdout.rstrip().endswith("verify: OK")


def test_missing_and_changed_files_are_named_and_exit_1(
    site: tuple[Config, Path, list[Path]]
) -> None:
    cfg, conf, paths = site
    root = cfg.storage_dir
    paths[0].unlink()  # an acknowledged instance lost
    with paths[1].open("ab") as fh:  # grew after reception
        fh.write(b"\0\0")
    raw = bytearray(paths[2].read_bytes())  # same size, one byte flipped
    raw[-1] ^= 0xFF
    paths[2].write_bytes(bytes(raw))

    quick = json.loads(run(conf, "--json").stdout)
    assert quick["missing"] == [paths[0].relative_to(root).as_posix()]
    assert quick["wrong_size"] == [paths[1].relative_to(root).as_posix()]
    assert quick["wrong_checksum"] == []  # not read without --checksums
    full = run(conf, "--checksums")
    assert full.exit_code == 1
    assert f"MISSING (acknowledged, file gone): {paths[0].relative_to(root).as_posix()}" \
        in full.stdout
    assert f"WRONG CHECKSUM (changed after reception): " \
        f"{paths[2].relative_to(root).as_posix()}" in full.stdout
    assert "verify: 3 damaged" in full.stdout
    # --repair never touches damaged rows or files
    again = run(conf, "--repair", "--checksums", "--json")
    assert again.exit_code == 1
    assert paths[1].is_file() and paths[2].is_file()
    assert json.loads(again.stdout)["damaged"] == 3


def test_orphans_and_temporaries_are_reported_then_moved_by_repair(
    site: tuple[Config, Path, list[Path]]
) -> None:
    cfg, conf, paths = site
    root = cfg.storage_dir
    # a file whose row never committed (crash between fsync and commit), an hour old
    orphan = root / generate_uid() / generate_uid() / f"{generate_uid()}.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(paths[0].read_bytes())
    os.utime(orphan, (OLD, OLD))
    # a store in flight: its file is there, its row not yet
    young = paths[0].parent / f"{generate_uid()}.dcm"
    young.write_bytes(b"in flight")
    stale = root / ".tmp" / "0123abcd.part"
    stale.write_bytes(b"half")
    os.utime(stale, (OLD, OLD))
    fresh_tmp = root / ".tmp" / "fedc3210.part"
    fresh_tmp.write_bytes(b"being written")

    result = run(conf, "--json")
    assert result.exit_code == 2, result.output
    data = json.loads(result.stdout)
    rel = orphan.relative_to(root).as_posix()
    assert data["orphans"] == [rel] and data["young_unrecorded"] == 1
    assert data["stale_temporaries"] == ["0123abcd.part"] and data["damaged"] == 0

    fixed = run(conf, "--repair")
    assert fixed.exit_code == 0, fixed.output
    moved = cfg.quarantine_dir / "orphans" / rel
    assert moved.read_bytes() == paths[0].read_bytes()  # kept, not deleted
    assert not orphan.exists() and not orphan.parent.exists()  # empty folders removed
    assert not stale.exists() and fresh_tmp.exists() and young.exists()
    assert "1 orphan(s) moved" in fixed.stdout and "1 temporary file(s) removed" in fixed.stdout
    assert all(p.is_file() for p in paths)
    # a younger limit judges the in-flight file too
    engine, _ = open_catalogue(cfg)
    try:
        later = verify_storage(cfg, engine, min_age=0.0)
    finally:
        engine.dispose()
    assert later.orphans == [young.relative_to(root).as_posix()]


def test_repair_is_refused_while_the_service_holds_the_index(
    site: tuple[Config, Path, list[Path]]
) -> None:
    cfg, conf, _ = site
    lock = cfg.index_dir / "model" / ".lock"
    lock.parent.mkdir(parents=True)
    with lock.open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        refused = run(conf, "--repair")
        assert refused.exit_code == 1 and "stop it to --repair" in refused.output
        assert run(conf).exit_code == 0  # checking alone is fine while it runs


def test_the_service_removes_temporaries_an_interrupted_store_left_at_start(
    config_factory: Callable[..., Config], sidecar_factory: Callable[[Config], Sidecar],
) -> None:
    cfg = config_factory()
    tmp = cfg.storage_dir / ".tmp"
    tmp.mkdir(parents=True)
    stale = tmp / "0123abcd.part"
    stale.write_bytes(b"half")
    os.utime(stale, (OLD - 60.0, OLD - 60.0))
    fresh = tmp / "fedc3210.part"  # another writer's (sidecar ingest) store in flight
    fresh.write_bytes(b"being written")
    app = sidecar_factory(cfg)
    deadline = time.monotonic() + 10.0
    while stale.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stale.exists() and fresh.exists()
    job = app.scheduler.get_job("clear_temporaries")
    assert job is not None and job.trigger.interval.total_seconds() == TIDY_INTERVAL_S


def test_recorded_paths_are_found_and_others_are_not() -> None:
    # The catalogue's paths are held as 64-bit digests (8 bytes a row): every
    # recorded path must be found, and paths never recorded must not be.
    from sidecar.archive.verify import _RecordedPaths

    recorded = _RecordedPaths()
    paths = [f"1.2.840.{s}/1.3.{s}.{i}/{i:08d}.dcm" for s in range(50) for i in range(400)]
    for rel in paths:
        recorded.add(rel)
    assert all(rel in recorded for rel in paths)
    assert not any(f"{rel}.orphan" in recorded for rel in paths[:2000])
    assert "é/ü/odd name.dcm" not in recorded
