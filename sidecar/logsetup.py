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
    if level != "DEBUG":
        quiet_decoder_plugin_failures()


class _PluginFailures(logging.Filter):
    """Drops pydicom's ERROR-with-traceback for each decoding plugin that fails on a frame."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == "_decode_frame" and record.exc_info is not None)


_PLUGIN_FAILURES = _PluginFailures()


def quiet_decoder_plugin_failures() -> None:
    """pydicom logs every decoding plugin that fails on a frame at ERROR with a full
    traceback, then raises one error naming them all (or decodes with the next plugin).
    The worker records that error on the instance and logs it on one line, so a damaged
    compressed file put tracebacks in the service's log (torture fuzz campaign, issue 19).
    Those records are dropped; pydicom's warnings stay. Idempotent."""
    logger = logging.getLogger("pydicom.pixels.decoders.base")
    if _PLUGIN_FAILURES not in logger.filters:
        logger.addFilter(_PLUGIN_FAILURES)
