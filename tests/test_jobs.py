"""Scheduled jobs log their own failures: a full disk or database on one line, not a
traceback a second (found by the torture ``resources`` campaign, issue 19)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from sidecar.config import Config
from sidecar.service import jobs
from sidecar.service.jobs import REPEAT_FAILURE_S, GuardedJob, out_of_space


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write_to_full_disk() -> None:
    with open("/dev/full", "wb", buffering=0) as fh:  # every write: a real ENOSPC
        fh.write(b"x")


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sidecar.service.jobs"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_full_disk_is_one_line_while_it_lasts_then_works_again(
        caplog: pytest.LogCaptureFixture) -> None:
    clock, full = Clock(), {"on": True}

    def job() -> str:
        if full["on"]:
            _write_to_full_disk()
        return "done"

    guarded = GuardedJob("save_index", job, clock=clock)
    with caplog.at_level(logging.INFO, logger="sidecar.service.jobs"):
        assert [guarded() for _ in range(5)] == [None] * 5
        recs = _records(caplog)
        assert len(recs) == 1 and recs[0].levelno == logging.ERROR
        assert recs[0].exc_info is None and "full" in recs[0].getMessage()
        assert "save_index" in recs[0].getMessage() and guarded.failures == 5
        clock.now += REPEAT_FAILURE_S  # still full: said again, once
        guarded()
        guarded()
        recs = _records(caplog)
        assert len(recs) == 2 and "(6 runs in a row)" in recs[1].getMessage()
        full["on"] = False
        assert guarded() == "done"
        recs = _records(caplog)
        assert len(recs) == 3 and recs[2].levelno == logging.INFO
        assert "works again after 7 failed runs" in recs[2].getMessage()
        assert guarded.failures == 0


def test_a_full_sqlite_database_counts_as_out_of_space(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'small.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (b BLOB)"))
    caught: list[Exception] = []

    def job() -> None:
        with engine.begin() as conn:
            conn.execute(text("PRAGMA max_page_count = 3"))
            conn.execute(text("INSERT INTO t VALUES (zeroblob(1000000))"))

    try:
        job()
    except Exception as exc:  # noqa: BLE001 - the real SQLITE_FULL, through SQLAlchemy
        caught.append(exc)
    assert caught and out_of_space(caught[0])
    assert not out_of_space(ValueError("no")) and not out_of_space(OSError(13, "denied"))
    engine.dispose()


def test_other_failures_log_a_traceback_once_then_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    errors: list[Exception] = [ValueError("bad"), ValueError("bad"), KeyError("k")]

    def job() -> None:
        raise errors.pop(0)

    guarded = GuardedJob("mark_stable", job, clock=clock)
    with caplog.at_level(logging.INFO, logger="sidecar.service.jobs"):
        for _ in range(3):
            assert guarded() is None
    recs = _records(caplog)
    assert len(recs) == 2  # the second ValueError is the same failure: not said again
    assert recs[0].exc_info is not None and "mark_stable" in recs[0].getMessage()
    assert recs[1].exc_info is None and "KeyError" in recs[1].getMessage()


def test_every_scheduled_job_is_guarded(config_factory: Callable[..., Config]) -> None:
    def nothing() -> None:
        return None

    sched = jobs.scheduler(config_factory(), clear_temporaries=nothing, mark_stable=nothing,
                           report_tls_certificate=nothing, embed=nothing, maintain=nothing)
    found = sched.get_jobs()
    assert {j.id for j in found} == {"clear_temporaries", "report_tls_certificate",
                                     "mark_stable", "embed", "save_index"}
    assert all(isinstance(j.func, GuardedJob) and j.func.name == j.id for j in found)
