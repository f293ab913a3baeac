"""Short versions of the torture campaigns (`make torture` runs the long ones).

Each starts real `sidecar serve` processes on a temporary data directory and drives them
with real DICOM traffic (torture/): a few kill -9 cycles, a few hundred malformed
inputs, concurrent senders of the same instances, a small filesystem filled up (skipped
where mounting is not permitted) and connections that never finish. A campaign's report
lists every loss, crash, hang or leftover it found; the test fails on any.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from torture import concurrency, fuzz, kill9, resources

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def test_kill9_cycles_lose_nothing_and_leave_nothing(tmp_path: Path) -> None:
    rep = kill9.run(tmp_path, cycles=2, per_cycle=30, seed=1, log=None)
    assert rep.ok, "\n".join(rep.lines())
    assert rep.acknowledged > 0 and rep.temporaries_after_restart == 0 and rep.orphans == 0


def test_malformed_inputs_are_all_answered_and_harm_nothing(tmp_path: Path) -> None:
    extra = sorted(SHARED_DICOM.rglob("*.dcm"))[:40] if SHARED_DICOM.is_dir() else []
    rep = fuzz.run(tmp_path, inputs=150, seed=1, extra_seeds=extra, log=None)
    assert rep.ok, "\n".join(rep.lines())


def test_the_same_instances_from_two_associations_at_once(tmp_path: Path) -> None:
    rep = concurrency.run(tmp_path, associations=4, per_association=40, seed=1, log=None)
    assert rep.ok, "\n".join(rep.lines())


def test_a_full_disk_is_refused_out_of_resources_and_recovers(tmp_path: Path) -> None:
    rep = resources.run(tmp_path, mib=16, watermark_mib=4, room=6, worker=False, receivers=1,
                        connections=False, log=None)
    if rep.skipped:
        pytest.skip(rep.skipped)  # mounting the small filesystem needs root
    assert rep.ok, "\n".join(rep.lines())
    assert rep.a_refused and rep.b_refused and rep.c_stored == rep.c_sent > 0
    assert rep.temporaries == 0 and rep.files == rep.rows


def test_silent_and_half_open_connections_are_dropped_and_block_no_one(tmp_path: Path) -> None:
    rep = resources.run(tmp_path, disk=False, acse_timeout=1.5, network_timeout=2.5, receivers=1,
                        log=None)
    assert rep.ok, "\n".join(rep.lines())
