"""DICOM audit messages (PS3.15 Annex A.5, the RFC 3881 derived XML), built as bytes.

Only the elements and codes the sidecar uses. Element order follows the
schema of PS3.15 A.5.1.1 (tests validate every message against it). Which
event carries which participants: docs/design/audit.md.
"""

from __future__ import annotations

import base64
import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Literal

ActionCode = Literal["C", "R", "U", "D", "E"]


class Outcome(IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, ``codeSystemName``, ``originalText`` (the meaning)."""

    code: str
    meaning: str
    system: str = "DCM"


# Event IDs (PS3.16 CID 400) and event type codes (CID 401, 403)
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DICOM Study Deleted")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
# Active participant roles (CID 402)
APPLICATION = Code("110150", "Application")
APPLICATION_LAUNCHER = Code("110151", "Application Launcher")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
# Participant object ID types (CID 404 and RFC 3881)
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")
NODE_ID = Code("110182", "Node ID")
#: HTTP requests have no DICOM SOP Class; a private code (99 prefix: local scheme).
HTTP_SEARCH = Code("SEARCH", "HTTP similarity search", "99PACS-SIDECAR")
#: AuditSourceTypeCode 4: application server process.
SOURCE_TYPE_APPLICATION = "4"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process, node or person that took part."""

    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_user_id: str = ""
    user_name: str = ""
    address: str = ""  # NetworkAccessPointID: an IP address or a host name

    @staticmethod
    def peer(ae_title: str, host: str, role: Code | None, *, requestor: bool = True
             ) -> Participant:
        """A remote DICOM application: its AE title, at its address."""
        return Participant(ae_title or "(no AE title)", requestor, role,
                           alternative_user_id=f"AETITLES={ae_title}" if ae_title else "",
                           address=host)


@dataclass(frozen=True)
class Detail:
    """A ParticipantObjectDetail (type and value; the value is base64 encoded)."""

    type: str
    value: bytes


@dataclass(frozen=True)
class SopClassCount:
    """One ParticipantObjectDescription SOPClass element: a SOP Class and how many instances."""

    uid: str
    count: int
    instances: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification.

    The schema asks for a ParticipantObjectName or a ParticipantObjectQuery in
    each one; objects that have neither (a study, a patient: the sidecar
    writes no patient names) get an empty ParticipantObjectName.
    """

    id: str
    id_type: Code
    type_code: Literal["1", "2", "3", "4"]
    role: str | None = None
    name: str = ""
    query: bytes | None = None
    details: tuple[Detail, ...] = ()
    sop_classes: tuple[SopClassCount, ...] = ()
    life_cycle: str | None = None

    @staticmethod
    def patient(patient_id: str, issuer: str = "") -> ParticipantObject:
        """The Patient: its Patient ID (``ID^^^issuer`` when an issuer is known), no name."""
        pid = f"{patient_id}^^^{issuer}" if issuer else patient_id
        return ParticipantObject(pid or "(no Patient ID)", PATIENT_NUMBER, "1", role="1")

    @staticmethod
    def study(uid: str, sop_classes: Sequence[SopClassCount] = (), *,
              details: Sequence[Detail] = (), life_cycle: str | None = None
              ) -> ParticipantObject:
        """A study by its Study Instance UID, with its SOP Classes and instance counts."""
        return ParticipantObject(uid, STUDY_INSTANCE_UID, "2", role="3",
                                 sop_classes=tuple(sop_classes), details=tuple(details),
                                 life_cycle=life_cycle)


@dataclass(frozen=True)
class Source:
    """Who reports: AuditSourceIdentification and the reporting process's participant."""

    source_id: str
    enterprise_site_id: str = ""
    ae_title: str = ""
    process: str = ""  # e.g. "pacs-sidecar[1234]"
    host: str = ""

    def application(self, *, requestor: bool = False, role: Code | None = None) -> Participant:
        """The sidecar itself as an ActiveParticipant."""
        return Participant(
            self.process or self.source_id, requestor, role,
            alternative_user_id=f"AETITLES={self.ae_title}" if self.ae_title else "",
            address=self.host,
        )


@dataclass(frozen=True)
class Event:
    """One audit event, ready to be rendered."""

    event_id: Code
    action: ActionCode
    outcome: Outcome = Outcome.SUCCESS
    type_codes: tuple[Code, ...] = ()
    description: str = ""
    participants: tuple[Participant, ...] = ()
    objects: tuple[ParticipantObject, ...] = field(default_factory=tuple)
    when: datetime | None = None


def _clean(text: str) -> str:
    """``text`` without control characters (one record is one line; XML 1.0 forbids most)."""
    return "".join(ch if ch >= " " else " " for ch in text)


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                "originalText": code.meaning})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def render(event: Event, source: Source) -> bytes:
    """The AuditMessage XML of ``event`` reported by ``source``: UTF-8, one line."""
    when = (event.when or datetime.now(UTC)).astimezone(UTC)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": event.action,
        "EventDateTime": when.isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": str(int(event.outcome)),
    })
    _code(ident, "EventID", event.event_id)
    for tc in event.type_codes:
        _code(ident, "EventTypeCode", tc)
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _clean(event.description)
    for p in event.participants:
        attrs = {"UserID": _clean(p.user_id), "UserIsRequestor": "true" if p.requestor else "false"}
        if p.alternative_user_id:
            attrs["AlternativeUserID"] = _clean(p.alternative_user_id)
        if p.user_name:
            attrs["UserName"] = _clean(p.user_name)
        if p.address:
            attrs["NetworkAccessPointID"] = _clean(p.address).replace(" ", "")
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.address) else "1"
        el = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _code(el, "RoleIDCode", p.role)
    src_attrs = {"AuditSourceID": _clean(source.source_id)}
    if source.enterprise_site_id:
        src_attrs["AuditEnterpriseSiteID"] = _clean(source.enterprise_site_id)
    src = ET.SubElement(root, "AuditSourceIdentification", src_attrs)
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": SOURCE_TYPE_APPLICATION})
    for obj in event.objects:
        _object(root, obj)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return data


def _object(root: ET.Element, obj: ParticipantObject) -> None:
    attrs = {"ParticipantObjectID": _clean(obj.id), "ParticipantObjectTypeCode": obj.type_code}
    if obj.role is not None:
        attrs["ParticipantObjectTypeCodeRole"] = obj.role
    if obj.life_cycle is not None:
        attrs["ParticipantObjectDataLifeCycle"] = obj.life_cycle
    el = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
    _code(el, "ParticipantObjectIDTypeCode", obj.id_type)
    if obj.query is not None:
        ET.SubElement(el, "ParticipantObjectQuery").text = _b64(obj.query)
    else:
        ET.SubElement(el, "ParticipantObjectName").text = _clean(obj.name)
    for d in obj.details:
        ET.SubElement(el, "ParticipantObjectDetail", {"type": d.type, "value": _b64(d.value)})
    if obj.sop_classes:
        desc = ET.SubElement(el, "ParticipantObjectDescription")
        for sc in obj.sop_classes:
            cls = ET.SubElement(desc, "SOPClass",
                                {"UID": sc.uid, "NumberOfInstances": str(sc.count)})
            for uid in sc.instances:
                ET.SubElement(cls, "Instance", {"UID": uid})


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return True


def sop_class_counts(counts: Iterable[tuple[str, int]]) -> tuple[SopClassCount, ...]:
    """SOPClass elements from (SOP Class UID, count) pairs, in UID order."""
    return tuple(SopClassCount(uid, n) for uid, n in sorted(counts) if n > 0)
