"""deploy/pacs-sidecar.service: systemd accepts the unit as written.

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
UNIT = REPO / "deploy" / "pacs-sidecar.service"
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_unit_verifies_clean(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and "ExecStart=/opt/pacs-sidecar/.venv/bin/sidecar serve" in text
    here = Path(sys.executable).parent / "sidecar"
    local = tmp_path / UNIT.name
    local.write_text(text.replace("/opt/pacs-sidecar/.venv/bin/sidecar", str(here)))
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "verify", str(local)], capture_output=True, text=True,
                          timeout=60)
    # unknown or misspelt keys are only warnings: any output at all fails the test
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        done.stdout + done.stderr
