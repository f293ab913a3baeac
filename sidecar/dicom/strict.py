"""Invalid DIMSE requests are answered (C-STORE: 0xA900) or aborted, never left unanswered.

pynetdicom ignores a request whose command set lacks a required element (an empty
Affected SOP Instance UID, say): it logs a warning and never answers, so the peer
waits for its own DIMSE timeout while the association holds one of our slots.
DCMTK's SCPs abort such an association ("Command Parse Failed"). This node answers a
C-STORE that carries a Message ID with 0xA900 and an Error Comment naming the element
(the peer hears why and the association goes on) and aborts any other invalid request.
:func:`install` wraps ``Association._serve_request`` once per process.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from sidecar.dimse import Status

logger = logging.getLogger(__name__)

_original = Association._serve_request  # noqa: SLF001 - wrapped, see the module notes


def _serve_or_abort(self: Association, msg: Any, context_id: int) -> None:
    if not getattr(self, "_sent_release", False) and not msg.is_valid_request:
        missing = [k for k in getattr(msg, "REQUEST_KEYWORDS", ()) if getattr(msg, k) is None]
        requestor = self.requestor
        answerable = isinstance(msg, C_STORE) and msg.MessageID is not None
        logger.warning(
            "invalid %s request from %s@%s (missing or invalid in the command set: %s): %s",
            getattr(msg, "msg_type", type(msg).__name__), requestor.ae_title,
            requestor.address, ", ".join(missing) or "unknown",
            "answered 0xA900" if answerable else "association aborted",
        )
        if answerable:
            # A C-STORE whose command names no valid instance (a broken UID copied from
            # the file) gets a failure status, so the peer hears why and goes on.
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            if msg.AffectedSOPClassUID is not None:
                rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            rsp.Status = int(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
            rsp.ErrorComment = (f"invalid in the command set: "  # type: ignore[assignment]
                                f"{', '.join(missing) or 'unknown'}")[:64]
            self.dimse.send_msg(rsp, context_id)
            return
        self.abort()
        return
    _original(self, msg, context_id)


def install() -> None:
    """Make every association of this process abort on an invalid request (idempotent)."""
    if Association._serve_request is not _serve_or_abort:  # noqa: SLF001
        Association._serve_request = _serve_or_abort  # type: ignore[method-assign]  # noqa: SLF001
