"""IOCM rejection notes: recognise a Key Object Selection "Rejection Note", apply it.

A KOS (1.2.840.10008.5.1.4.1.1.88.59) whose document title (ConceptNameCodeSequence)
is one of the rejection titles (PS3.16 CID 7010 / IHE IOCM) rejects the instances
of its CurrentRequestedProcedureEvidenceSequence. Per title (``iocm.actions``):
``hide`` removes rows and vectors and moves the file to ``quarantine/rejected/``,
``delete`` removes the file too, ``ignore`` does nothing. The note itself is kept
as any instance. Behaviour and statuses: docs/conformance.md (IOCM).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset

from sidecar.archive.layout import prune_empty_dirs, remove_previews, remove_stored, stored_path
from sidecar.archive.parse import is_valid_uid
from sidecar.audit.events import Auditor
from sidecar.audit.messages import SopClassCount
from sidecar.config import IocmConfig
from sidecar.db.rejections import RejectedRef, RejectionRecord, Rejections
from sidecar.errors import InvalidDataset

logger = logging.getLogger(__name__)

KEY_OBJECT_SELECTION: Final = "1.2.840.10008.5.1.4.1.1.88.59"

#: The rejection document titles (code value, scheme) and their ``iocm.actions`` key.
TITLES: Final[dict[tuple[str, str], str]] = {
    ("113001", "DCM"): "quality",  # Rejected for Quality Reasons
    ("113037", "DCM"): "patient_safety",  # Rejected for Patient Safety Reasons
    ("113038", "DCM"): "incorrect_worklist",  # Incorrect Modality Worklist Entry
    ("113039", "DCM"): "retention_expired",  # Data Retention Policy Expired
}

REJECTED_DIR: Final = "rejected"
"""Where hidden instances' files go, inside the quarantine directory."""


@dataclass(frozen=True)
class RejectionNote:
    """A parsed rejection note."""

    sop_instance_uid: str
    study_instance_uid: str
    code_value: str
    meaning: str
    title: str  # the iocm.actions key
    patient: tuple[str, str]  # Patient ID, issuer
    references: tuple[RejectedRef, ...]


@dataclass(frozen=True)
class RejectionOutcome:
    """What applying a note did (for the audit and the log)."""

    note: RejectionNote
    action: str
    record: RejectionRecord | None  # None: ignored


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def rejection_note(ds: Dataset) -> RejectionNote | None:
    """The rejection note ``ds`` is, or ``None`` (not a KOS, or another title).

    Raises
    ------
    InvalidDataset
        ``kind="mismatch"``: a rejection title whose evidence is missing,
        empty or names invalid or absent UIDs, or the note itself.
    """
    if _text(ds, "SOPClassUID") != KEY_OBJECT_SELECTION:
        return None
    titles = ds.get("ConceptNameCodeSequence") or []
    if len(titles) != 1:
        return None
    code = titles[0]
    key = (_text(code, "CodeValue"), _text(code, "CodingSchemeDesignator"))
    title = TITLES.get(key)
    if title is None:
        return None
    meaning = _text(code, "CodeMeaning") or key[0]
    own = _text(ds, "SOPInstanceUID")
    refs: list[RejectedRef] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study_uid = _text(study, "StudyInstanceUID")
        for series in study.get("ReferencedSeriesSequence") or []:
            series_uid = _text(series, "SeriesInstanceUID")
            for item in series.get("ReferencedSOPSequence") or []:
                refs.append(RejectedRef(study_uid, series_uid,
                                        _text(item, "ReferencedSOPInstanceUID")))
    if not refs:
        raise InvalidDataset("mismatch", "rejection note references no instance "
                             f"(CurrentRequestedProcedureEvidenceSequence; {meaning})")
    for ref in refs:
        for what, uid in (("StudyInstanceUID", ref.study_instance_uid),
                          ("SeriesInstanceUID", ref.series_instance_uid),
                          ("ReferencedSOPInstanceUID", ref.sop_instance_uid)):
            if not is_valid_uid(uid):
                raise InvalidDataset("mismatch", f"rejection note: invalid {what} "
                                     f"{uid[:64]!r} in the evidence")
        if ref.sop_instance_uid == own:
            raise InvalidDataset("mismatch", "rejection note references itself")
    return RejectionNote(own, _text(ds, "StudyInstanceUID"), key[0], meaning, title,
                         (_text(ds, "PatientID"), _text(ds, "IssuerOfPatientID")),
                         tuple(refs))


class Rejector:
    """Apply rejection notes to the catalogue and the stored files.

    Parameters
    ----------
    config
        The ``iocm`` settings.
    rejections
        The catalogue's rejection table.
    storage_dir, quarantine_dir, previews_dir
        Where stored files are; hidden files go to ``quarantine_dir/rejected``; the
        kept previews of released files (removed with their instances).
    """

    def __init__(self, config: IocmConfig, rejections: Rejections, storage_dir: Path,
                 quarantine_dir: Path, previews_dir: Path) -> None:
        self._cfg = config
        self._previews = previews_dir
        self._rejections = rejections
        self._root = storage_dir
        self._hidden = quarantine_dir / REJECTED_DIR

    @property
    def refusing(self) -> bool:
        """Whether an instance a note rejected is refused when it arrives again."""
        return bool(self._cfg.refuse_rejected)

    def apply(self, note: RejectionNote) -> RejectionOutcome:
        """Record the note's references and hide or delete the instances received."""
        action = str(getattr(self._cfg.actions, note.title))
        if action == "ignore":
            logger.info("rejection note %s (%s): ignored (iocm.actions.%s)",
                        note.sop_instance_uid, note.meaning, note.title)
            return RejectionOutcome(note, action, None)
        record = self._rejections.reject(
            note.references, reason=note.code_value, action=action,
            note_sop_instance_uid=note.sop_instance_uid, patient=note.patient,
        )
        paths = [r.file_path for r in record.removed]
        by_study: dict[str, list[str]] = {}
        for r in record.removed:
            by_study.setdefault(r.study_instance_uid, []).append(r.sop_instance_uid)
        for study, sops in by_study.items():
            remove_previews(self._previews, study, sops)
        if action == "delete":
            files = remove_stored(self._root, paths)
        else:
            files = self._hide(paths)
        logger.info("rejection note %s (%s): %d instance(s) %s (%d file(s)), %d not received, "
                    "%d of another patient left alone", note.sop_instance_uid, note.meaning,
                    len(record.removed), "deleted" if action == "delete" else "hidden", files,
                    record.not_received, record.other_patient)
        return RejectionOutcome(note, action, record)

    def _hide(self, file_paths: list[str]) -> int:
        """Move the files under ``quarantine/rejected/`` (same relative paths)."""
        moved = 0
        for rel in file_paths:
            src = stored_path(self._root, rel)
            dst = self._hidden / rel
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                moved += 1
            except FileNotFoundError:
                pass
            except OSError as exc:  # e.g. another file system; its rows are gone already
                logger.error("hidden instance file %s could not be moved to %s (%s): left in "
                             "place, an orphan for `sidecar verify --repair`", rel,
                             self._hidden, exc.__class__.__name__)
                continue
            prune_empty_dirs(self._root, src)
        return moved


def audit_rejection(auditor: Auditor, calling: str, host: str, outcome: RejectionOutcome) -> None:
    """One Instances Accessed (Delete) message per study whose instances the note removed."""
    if outcome.record is None or not outcome.record.removed:
        return
    by_study: dict[str, dict[str, list[str]]] = {}
    for r in outcome.record.removed:
        by_study.setdefault(r.study_instance_uid, {}).setdefault(r.sop_class_uid, []).append(
            r.sop_instance_uid)
    note = outcome.note
    reason = (f"IOCM rejection note {note.sop_instance_uid}: {note.meaning} "
              f"({outcome.action})")
    for study_uid, classes in sorted(by_study.items()):
        auditor.instances_deleted(
            calling, host, study_uid, note.patient[0], note.patient[1],
            [SopClassCount(uid, len(sops), tuple(sops)) for uid, sops in sorted(classes.items())],
            reason=reason, permanent=outcome.action == "delete",
        )
