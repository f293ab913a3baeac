"""Fetch-back: released files come back from the PACS (``storage.fetch``) when work needs them.

Re-embedding after a model change, or ``sidecar reindex --reembed``, needs the
pixels that ``storage.keep_files`` released. Such series wait
(:mod:`sidecar.db.retention`); this job asks the PACS for them, one series at a
time, Study Root at SERIES level:

* ``c-get``: the PACS sends the instances on the same association (the sidecar
  takes the SCP role for their storage SOP classes); each wanted instance goes
  through :meth:`InstanceStore.store`, which restores the released row (fsynced,
  committed) before the sub-operation is answered. Instances of the series the
  sidecar does not hold released are answered Success and not kept.
* ``c-move``: the PACS sends them to ``storage.fetch.move_destination`` (the
  sidecar's own AE title by default) over new associations, through the
  receivers, like any C-STORE from that peer.

The PACS's final status and sub-operation counts are logged and returned; a
series that did not come back is tried again on the next run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_role, evt

from sidecar.archive.store import InstanceStore, Origin, Outcome
from sidecar.audit.events import Auditor
from sidecar.audit.messages import sop_class_counts
from sidecar.config import Config
from sidecar.db.retention import RetentionRepository, SeriesToFetch
from sidecar.dicom.statuses import Status
from sidecar.errors import SidecarError

logger = logging.getLogger(__name__)

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
"""Study Root Query/Retrieve Information Model - GET."""
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
"""Study Root Query/Retrieve Information Model - MOVE."""

#: Transfer syntaxes offered for the instances a C-GET brings back (the PACS picks one).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless,
    JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
)
#: Presentation contexts are at most 128; one goes to the C-GET itself.
MAX_STORAGE_CONTEXTS = 127


class FetchError(SidecarError):
    """The PACS could not be reached or refused the association."""


@dataclass
class FetchStats:
    """What one fetch-back run did."""

    series: int = 0
    restored: int = 0
    not_returned: int = 0
    failed_series: list[str] = field(default_factory=list)


class FetchBack:
    """Asks the PACS (``storage.fetch``) for the series that wait for their pixels.

    Parameters
    ----------
    config
        ``storage.fetch`` and ``dicom.ae_title``.
    store
        Where a C-GET's instances are kept (restoring released rows).
    repository
        Which series wait for their pixels.
    auditor
        Audits what a C-GET brought back (DICOM Instances Transferred, one message
        per study; a C-MOVE's instances are audited by the receivers).
    """

    def __init__(self, config: Config, store: InstanceStore,
                 repository: RetentionRepository, *, auditor: Auditor | None = None) -> None:
        self._cfg = config
        self._auditor = auditor
        self._fetch = config.storage.fetch
        self._store = store
        self._repo = repository

    def run_once(self, model_id: str) -> FetchStats:
        """Fetch up to ``storage.fetch.max_series`` waiting series; never raises."""
        stats = FetchStats()
        if not self._fetch.configured:
            return stats
        work = self._repo.to_fetch(model_id, max_attempts=self._cfg.worker.max_attempts,
                                   max_series=self._fetch.max_series)
        for item in work:
            stats.series += 1
            try:
                back = self.fetch_series(item)
            except Exception as exc:  # noqa: BLE001 - logged; the series is tried again later
                logger.warning("fetch-back of a series from %s failed: %s",
                               self._fetch.ae_title, exc)
                stats.failed_series.append(item.series_instance_uid)
                continue
            stats.restored += back
            stats.not_returned += len(item.sop_instance_uids) - back
        if stats.series:
            logger.info("fetch-back from %s by %s: %d series, %d file(s) restored, %d not "
                        "returned", self._fetch.ae_title, self._fetch.method.upper(),
                        stats.series, stats.restored, stats.not_returned)
        return stats

    def fetch_series(self, item: SeriesToFetch) -> int:
        """Fetch one series; returns how many of its released files are back."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = item.study_instance_uid
        ident.SeriesInstanceUID = item.series_instance_uid
        if self._fetch.method == "c-get":
            self._get(ident, item)
        else:
            self._move(ident)
        return self._repo.restored_count(item.sop_instance_uids)

    # ----------------------------------------------------------------- private
    def _ae(self) -> AE:
        ae = AE(ae_title=self._cfg.dicom.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self._fetch.timeout
        return ae

    def _associate(self, ae: AE, **kwargs: Any) -> Any:
        assoc = ae.associate(self._fetch.host, self._fetch.port, ae_title=self._fetch.ae_title,
                             **kwargs)
        if not assoc.is_established:
            raise FetchError(f"{self._fetch.ae_title}@{self._fetch.host}:{self._fetch.port} "
                             "refused or did not answer the association")
        return assoc

    def _final(self, responses: Any, what: str) -> None:
        final: Dataset | None = None
        for status, _ in responses:
            if "Status" not in status:
                raise FetchError(f"{what}: no response (the association was aborted)")
            final = status
        if final is None:
            raise FetchError(f"{what}: no final response")
        code = int(final.Status)
        counts = {k: int(getattr(final, f"NumberOf{k}Suboperations", 0) or 0)
                  for k in ("Completed", "Failed", "Warning")}
        if code not in (Status.SUCCESS, 0xB000):
            comment = str(getattr(final, "ErrorComment", "") or "")
            raise FetchError(f"{what}: status 0x{code:04X} {comment} {counts}".strip())
        logger.debug("%s: status 0x%04X %s", what, code, counts)

    def _get(self, ident: Dataset, item: SeriesToFetch) -> None:
        classes = sorted(item.sop_class_uids)[:MAX_STORAGE_CONTEXTS]
        ae = self._ae()
        ae.add_requested_context(STUDY_ROOT_GET)
        for uid in classes:
            ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
        roles = [build_role(uid, scp_role=True) for uid in classes]
        wanted = set(item.sop_instance_uids)
        origin = Origin(ae_title=self._fetch.ae_title, host=self._fetch.host)
        kept: dict[str, int] = {}
        patient: list[str] = []
        failed = 0

        def on_store(event: Any) -> int:
            sop = str(event.request.AffectedSOPInstanceUID)
            if sop not in wanted:
                logger.debug("fetch-back: %s is not one of the released files; not kept", sop)
                return int(Status.SUCCESS)
            nonlocal failed
            try:
                result = self._store.store(
                    event.encoded_dataset(include_meta=True), str(event.context.transfer_syntax),
                    origin, expected_sop_class_uid=str(event.request.AffectedSOPClassUID),
                    expected_sop_instance_uid=sop)
            except Exception as exc:  # noqa: BLE001 - answered as a failed sub-operation
                failed += 1
                logger.warning("fetch-back: a returned instance was not kept: %s", exc)
                return int(Status.PROCESSING_FAILURE)
            sop_class = str(event.request.AffectedSOPClassUID)
            kept[sop_class] = kept.get(sop_class, 0) + 1
            patient[:] = [result.patient_id, result.issuer_of_patient_id]
            if result.outcome is not Outcome.RESTORED:
                logger.debug("fetch-back: %s was %s", sop, result.outcome.value)
            return int(Status.SUCCESS)

        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            self._final(assoc.send_c_get(ident, STUDY_ROOT_GET),
                        "C-GET")
        finally:
            if assoc.is_established:
                assoc.release()
            if self._auditor is not None and (kept or failed):
                pid, issuer = patient or ["", ""]
                self._auditor.instances_received(
                    self._fetch.ae_title, self._fetch.host, item.study_instance_uid, pid,
                    issuer, sop_class_counts(kept.items()), failed=failed)

    def _move(self, ident: Dataset) -> None:
        ae = self._ae()
        ae.add_requested_context(STUDY_ROOT_MOVE)
        destination = self._fetch.move_destination or self._cfg.dicom.ae_title
        assoc = self._associate(ae)
        try:
            self._final(assoc.send_c_move(ident, destination,
                                          STUDY_ROOT_MOVE),
                        f"C-MOVE to {destination}")
        finally:
            if assoc.is_established:
                assoc.release()


__all__ = ["FetchBack", "FetchError", "FetchStats"]
