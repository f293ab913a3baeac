"""Invalid DIMSE requests are refused with an A-ABORT, not left unanswered.

pynetdicom ignores a request whose command set lacks a required element (an empty
Affected SOP Instance UID, say): it logs a warning and never answers, so the peer
waits for its own DIMSE timeout while the association holds one of our slots.
DCMTK's SCPs abort such an association ("Command Parse Failed"); so does this node.
:func:`install` wraps ``Association._serve_request`` once per process.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom.association import Association

logger = logging.getLogger(__name__)

_original = Association._serve_request  # noqa: SLF001 - wrapped, see the module notes


def _serve_or_abort(self: Association, msg: Any, context_id: int) -> None:
    if not getattr(self, "_sent_release", False) and not msg.is_valid_request:
        missing = [k for k in getattr(msg, "REQUEST_KEYWORDS", ()) if getattr(msg, k) is None]
        requestor = self.requestor
        logger.warning(
            "invalid %s request from %s@%s (missing or invalid in the command set: %s): "
            "association aborted",
            getattr(msg, "msg_type", type(msg).__name__), requestor.ae_title,
            requestor.address, ", ".join(missing) or "unknown",
        )
        self.abort()
        return
    _original(self, msg, context_id)


def install() -> None:
    """Make every association of this process abort on an invalid request (idempotent)."""
    if Association._serve_request is not _serve_or_abort:  # noqa: SLF001
        Association._serve_request = _serve_or_abort  # type: ignore[method-assign]  # noqa: SLF001
