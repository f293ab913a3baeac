"""Logging set-up, shared by the CLI and the receiver processes it spawns.

Nothing else in the package configures logging.
"""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    """Log to stderr; third-party DICOM libraries stay at WARNING unless DEBUG.

    pynetdicom's own INFO/DEBUG logs can print identifiers that carry patient
    names and IDs, so they are only shown when the operator asks for DEBUG
    (with :func:`sidecar.dicom.logs.log_identifiers`, called beside this).
    """
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    noisy = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("pynetdicom", "pydicom", "apscheduler", "alembic"):
        logging.getLogger(name).setLevel(noisy)
