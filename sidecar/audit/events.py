"""The audit events the sidecar reports, one method each (:class:`Auditor`).

Every method builds a PS3.15 A.5.3 message and hands it to the sink; none
blocks or raises (a failure is logged). The DICOM node, the service and
the HTTP API call these; what each message holds: docs/design/audit.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from pydicom.uid import UID

from sidecar.audit.messages import (
    APPLICATION,
    APPLICATION_ACTIVITY,
    APPLICATION_LAUNCHER,
    APPLICATION_START,
    APPLICATION_STOP,
    DESTINATION,
    HTTP_SEARCH,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    LOGIN,
    LOGOUT,
    NODE_AUTHENTICATION,
    NODE_ID,
    QUERY,
    RESTRICTED_FUNCTION,
    SECURITY_ALERT,
    SOP_CLASS_UID,
    SOURCE,
    STUDY_DELETED,
    USER_AUTHENTICATION,
    Code,
    Detail,
    Event,
    Outcome,
    Participant,
    ParticipantObject,
    SopClassCount,
    Source,
)
from sidecar.audit.trail import NullSink, Sink

logger = logging.getLogger(__name__)


def _sop_class_name(uid: str) -> str:
    try:
        return str(UID(uid).name) or uid
    except Exception:  # noqa: BLE001 - an unknown UID names itself
        return uid


class Auditor:
    """Builds and hands over the sidecar's audit messages.

    Parameters
    ----------
    source
        Who reports (AuditSourceID, our AE title, process, host).
    sink
        Where messages go (an :class:`~sidecar.audit.trail.AuditTrail`); ``None``: nowhere.
    accepted_associations
        Audit accepted associations too (``audit.associations: all``).
    """

    def __init__(self, source: Source, sink: Sink | None = None, *,
                 accepted_associations: bool = True) -> None:
        self.source = source
        self.sink: Sink = sink or NullSink()
        self._accepted = accepted_associations

    def _emit(self, event: Event) -> None:
        try:  # rendered to XML by the sink's thread; the time is now
            self.sink.emit(replace(event, when=event.when or datetime.now(UTC)), self.source)
        except Exception:  # noqa: BLE001 - auditing must never break the caller
            logger.exception("cannot hand over the audit message %s", event.event_id.meaning)

    def _peer(self, ae_title: str, host: str, role: Code | None = SOURCE) -> Participant:
        return Participant.peer(ae_title, host, role)

    # ------------------------------------------------------- application
    def application_start(self, user: str = "") -> None:
        """Application Activity, Application Start (110100 / 110120)."""
        self._application(APPLICATION_START, user)

    def application_stop(self, user: str = "") -> None:
        """Application Activity, Application Stop (110100 / 110121)."""
        self._application(APPLICATION_STOP, user)

    def _application(self, what: Code, user: str) -> None:
        people = (Participant(user, True, APPLICATION_LAUNCHER),) if user else ()
        self._emit(Event(APPLICATION_ACTIVITY, "E", type_codes=(what,), participants=(
            self.source.application(requestor=not user, role=APPLICATION), *people)))

    # ------------------------------------------------------- associations
    def association_refused(self, calling: str, called: str, host: str, reason: str) -> None:
        """Security Alert, Node Authentication, minor failure: an association was rejected."""
        self._node_authentication(calling, host, Outcome.MINOR_FAILURE,
                                  f"association refused: {reason} (called {called or '-'})")

    def association_accepted(self, calling: str, host: str, tls: str = "") -> None:
        """Security Alert, Node Authentication, success (when ``audit.associations: all``)."""
        if self._accepted:
            self._node_authentication(calling, host, Outcome.SUCCESS, "association accepted"
                                      + (f" over {tls}" if tls else ""))

    def _node_authentication(self, calling: str, host: str, outcome: Outcome,
                             text: str) -> None:
        node = ParticipantObject(f"{calling}@{host}", NODE_ID, "2", role="13", name=calling)
        self._emit(Event(SECURITY_ALERT, "E", outcome, (NODE_AUTHENTICATION,), text, (
            self.source.application(role=APPLICATION),
            Participant.peer(calling, host, None),
        ), (node,)))

    def node_authentication_failed(self, host: str, reason: str) -> None:
        """Security Alert, Node Authentication, minor failure: a TLS handshake failed
        (an untrusted or missing certificate); no AE title is known yet."""
        node = ParticipantObject(host, NODE_ID, "2", role="13", name=host)
        self._emit(Event(SECURITY_ALERT, "E", Outcome.MINOR_FAILURE, (NODE_AUTHENTICATION,),
                         reason, (self.source.application(role=APPLICATION),
                                  Participant(host, True, None, address=host)), (node,)))

    def permission_refused(self, calling: str, host: str, operation: str, what: str) -> None:
        """Security Alert, Use of Restricted Function: a peer lacks a ``dicom.allowed_peers``
        permission (answered 0x0124)."""
        node = ParticipantObject(f"{calling}@{host}", NODE_ID, "2", role="13", name=calling)
        self._emit(Event(SECURITY_ALERT, "E", Outcome.MINOR_FAILURE, (RESTRICTED_FUNCTION,),
                         f"{what} refused: no {operation} permission", (
                             self.source.application(role=APPLICATION),
                             Participant.peer(calling, host, None),
                         ), (node,)))

    # ------------------------------------------------------- HTTP access
    def authentication_failure(self, user: str, address: str, reason: str) -> None:
        """User Authentication, Login, minor failure: a bad or missing HTTP token.

        ``user``: what the request claimed (the token's name when known, else
        empty); never the token itself.
        """
        self._emit(Event(USER_AUTHENTICATION, "E", Outcome.MINOR_FAILURE, (LOGIN,), reason, (
            Participant(user or "(unknown)", True, None, address=address),
            self.source.application(role=APPLICATION),
        )))

    def user_session(self, user: str, address: str, *, logout: bool = False) -> None:
        """User Authentication, Login or Logout, success: the page's sign-in with a token
        named ``user`` (never the token), or its sign-out."""
        self._emit(Event(USER_AUTHENTICATION, "E", Outcome.SUCCESS,
                         (LOGOUT if logout else LOGIN,), "", (
                             Participant(user or "(unknown)", True, None, address=address),
                             self.source.application(role=APPLICATION),
                         )))

    def access_refused(self, user: str, address: str, what: str) -> None:
        """Security Alert, Use of Restricted Function: an HTTP token lacks the scope."""
        self._emit(Event(SECURITY_ALERT, "E", Outcome.MINOR_FAILURE, (RESTRICTED_FUNCTION,),
                         f"{what} refused", (
                             self.source.application(role=APPLICATION),
                             Participant(user or "(unknown)", True, None, address=address),
                         )))

    # ------------------------------------------------------- instances
    def instances_received(self, calling: str, host: str, study_uid: str, patient_id: str,
                           issuer: str, sop_classes: Sequence[SopClassCount], *,
                           failed: int = 0, example: bool = False) -> None:
        """DICOM Instances Transferred (110104, Create): one study from one association.

        ``failed``: instances of the study that were not kept (outcome minor
        failure, or serious when none was). ``example``: images for query by
        example (held in memory, never archived).
        """
        kept = sum(sc.count for sc in sop_classes)
        outcome = (Outcome.SUCCESS if not failed else
                   Outcome.MINOR_FAILURE if kept else Outcome.SERIOUS_FAILURE)
        details = [Detail("Purpose", b"query example, held in memory, not archived")] \
            if example else []
        text = f"{failed} instance(s) not stored" if failed else ""
        self._emit(Event(INSTANCES_TRANSFERRED, "C", outcome, (), text, (
            self._peer(calling, host, SOURCE),
            self.source.application(role=DESTINATION),
        ), (ParticipantObject.study(study_uid, sop_classes, details=details),
            ParticipantObject.patient(patient_id, issuer))))

    def study_deleted(self, user: str, study_uid: str, patient_id: str, issuer: str,
                      sop_classes: Sequence[SopClassCount] = (), reason: str = "") -> None:
        """DICOM Study Deleted (110105, Delete): files, rows and vectors removed."""
        self._emit(Event(STUDY_DELETED, "D", Outcome.SUCCESS, (), reason, (
            Participant(user or "(unknown)", True, None),
            self.source.application(role=APPLICATION),
        ), (ParticipantObject.study(study_uid, sop_classes, life_cycle="14"),
            ParticipantObject.patient(patient_id, issuer))))

    def instances_deleted(self, calling: str, host: str, study_uid: str, patient_id: str,
                          issuer: str, sop_classes: Sequence[SopClassCount], *,
                          reason: str, permanent: bool) -> None:
        """DICOM Instances Accessed (110103, Delete): instances of one study rejected by an
        IOCM rejection note from ``calling``; ``permanent``: files erased (data life
        cycle 15), else hidden (14, logical deletion). The SOPClass elements list the
        SOP Instance UIDs."""
        self._emit(Event(INSTANCES_ACCESSED, "D", Outcome.SUCCESS, (), reason, (
            self._peer(calling, host, None),
            self.source.application(role=APPLICATION),
        ), (ParticipantObject.study(study_uid, sop_classes,
                                    life_cycle="15" if permanent else "14"),
            ParticipantObject.patient(patient_id, issuer))))

    def files_released(self, study_uid: str, patient_id: str, issuer: str,
                       sop_classes: Sequence[SopClassCount], *, policy: str) -> None:
        """DICOM Instances Accessed (110103, Delete): the sidecar's own copies of one
        study's files erased by ``storage.keep_files`` (data life cycle 15); the
        catalogue, vectors and previews stay, the PACS keeps the originals."""
        self._emit(Event(INSTANCES_ACCESSED, "D", Outcome.SUCCESS, (),
                         f"storage.keep_files {policy}: local copies released", (
                             self.source.application(requestor=True, role=APPLICATION),
                         ), (ParticipantObject.study(study_uid, sop_classes, life_cycle="15"),
                             ParticipantObject.patient(patient_id, issuer))))

    # ------------------------------------------------------- queries
    def dicom_query(self, calling: str, host: str, sop_class: str, identifier: bytes,
                    transfer_syntax: str, *, matches: int, status: int,
                    similarity: bool = False, detail: Mapping[str, str] | None = None) -> None:
        """Query (110112, Execute): one C-FIND, ordinary or similarity.

        The identifier as received (base64 in ParticipantObjectQuery) with its
        transfer syntax; ``matches`` sent, the final ``status`` and the kind
        (``ordinary``/``similarity``) as ParticipantObjectDetail.
        """
        outcome = Outcome.SUCCESS if status in (0x0000, 0xFE00) else Outcome.MINOR_FAILURE
        details = [Detail("TransferSyntax", transfer_syntax.encode("ascii", "replace")),
                   Detail("QueryKind", b"similarity" if similarity else b"ordinary"),
                   Detail("NumberOfMatches", str(matches).encode()),
                   Detail("Status", f"{status:04X}".encode())]
        details += [Detail(k, v.encode("utf-8")) for k, v in (detail or {}).items()]
        details.append(Detail("SOPClassName", _sop_class_name(sop_class).encode("utf-8")))
        # role 3 (Report) for a C-FIND query, as PS3.15 A.5.3.12 asks
        query = ParticipantObject(sop_class, SOP_CLASS_UID, "2", role="3",
                                  query=identifier, details=tuple(details))
        self._emit(Event(QUERY, "E", outcome, (), "" if outcome == Outcome.SUCCESS
                         else f"C-FIND ended with status 0x{status:04X}", (
                             self._peer(calling, host, SOURCE),
                             self.source.application(role=DESTINATION),
                         ), (query,)))

    def http_query(self, requestor: str, address: str, keys: Mapping[str, object] | bytes, *,
                   results: int, ok: bool = True, path: str = "/v1/search",
                   description: str = "") -> None:
        """Query (110112, Execute): one HTTP search.

        ``requestor``: the token's name (or the client address without
        authentication); ``keys``: what was asked (JSON-encoded unless bytes:
        reference UIDs, k, filters; never the uploaded image); ``results``:
        hits returned.
        """
        query = keys if isinstance(keys, bytes) else json.dumps(
            keys, sort_keys=True, default=str).encode("utf-8")
        obj = ParticipantObject(path, HTTP_SEARCH, "2", role="24", query=query, details=(
            Detail("QueryEncoding", b"UTF-8"), Detail("NumberOfMatches", str(results).encode())))
        self._emit(Event(QUERY, "E", Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE, (),
                         description, (
                             Participant(requestor or address or "(unknown)", True, SOURCE,
                                         address=address),
                             self.source.application(role=DESTINATION),
                         ), (obj,)))


__all__ = ["Auditor"]
