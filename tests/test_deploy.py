"""deploy/: systemd accepts the units as written.

``systemd-analyze verify`` checks every key and that the commands exist; the
unit's /opt/pacs-sidecar paths are pointed at this checkout's virtualenv for
the check. Readiness (Type=notify) itself is tested in tests/test_serve.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_units_verify_clean(tmp_path: Path) -> None:
    units = sorted(DEPLOY.glob("pacs-sidecar*.*"))
    assert [u.name for u in units] == [
        "pacs-sidecar-verify.service", "pacs-sidecar-verify.timer", "pacs-sidecar.service"]
    service = (DEPLOY / "pacs-sidecar.service").read_text()
    assert "Type=notify" in service
    assert "ExecStart=/opt/pacs-sidecar/.venv/bin/sidecar serve" in service
    assert "ExecStart=/opt/pacs-sidecar/.venv/bin/sidecar verify --checksums" in \
        (DEPLOY / "pacs-sidecar-verify.service").read_text()
    here = Path(sys.executable).parent / "sidecar"
    local = []
    for unit in units:  # the timer finds its service by name in the same folder
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/pacs-sidecar/.venv/bin/sidecar", str(here)))
        local.append(str(copy))
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "verify", *local], capture_output=True, text=True, timeout=60)
    # unknown or misspelt keys are only warnings: any output at all fails the test
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        done.stdout + done.stderr
