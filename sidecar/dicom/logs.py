"""pynetdicom's identifier logging, switched with the log level."""

from __future__ import annotations

from pynetdicom import _config as pnd_config


def log_identifiers(level: str) -> None:
    """Let pynetdicom log request and response identifiers only at DEBUG.

    They can carry patient names and IDs, so they are shown only when the
    operator asks for DEBUG.
    """
    pnd_config.LOG_REQUEST_IDENTIFIERS = level == "DEBUG"
    pnd_config.LOG_RESPONSE_IDENTIFIERS = level == "DEBUG"
