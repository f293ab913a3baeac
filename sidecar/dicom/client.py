"""A small SCU for the sidecar's own similarity service: C-STORE, similarity C-FIND.

One association, opened again (and the request repeated) when a response is lost;
``sidecar evaluate``'s path (b) talks to its in-process sidecar through it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from sidecar.dicom.find import SIMILARITY_CREATOR, STUDY_ROOT_FIND
from sidecar.dicom.similarity import RANK, SCORE
from sidecar.errors import SidecarError

logger = logging.getLogger(__name__)

ATTEMPTS: Final = 3
"""Tries per request before :class:`ScuError` (a lost response opens a new association)."""
DIMSE_TIMEOUT: Final = 30.0
"""Seconds to wait for a response before the association is given up."""

T = TypeVar("T")


class ScuError(SidecarError):
    """No association, a C-STORE or similarity C-FIND failure status, or no response."""


class _LostMessage(Exception):
    """No response came (the association was aborted): worth one more try."""


@dataclass(frozen=True)
class SimilarityHit:
    """One Pending response of a similarity C-FIND."""

    rank: int
    """1-based rank (0099,xx11)."""
    score: float
    """Cosine similarity (0099,xx10)."""
    study_uid: str
    """Study Instance UID of the hit."""


def similarity_identifier(sop_uid: str, top_k: int) -> Dataset:
    """A STUDY-level similarity C-FIND identifier: ``top_k`` studies like instance ``sop_uid``
    (an example image sent before, (0099,xx05) ``YES``)."""
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    block = ident.private_block(0x0099, SIMILARITY_CREATOR, create=True)
    block.add_new(0x01, "UI", sop_uid)
    block.add_new(0x04, "US", top_k)
    block.add_new(0x05, "CS", "YES")
    return ident


def _no_delay(assoc: Any) -> None:
    """TCP_NODELAY on an SCU association (Nagle and delayed ACKs cost ~40 ms per message)."""
    try:
        transport = assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # pragma: no cover - platform specific
        logger.debug("could not set TCP_NODELAY: %s", exc)


class SimilarityClient:
    """An SCU association that is opened again after a lost message.

    pynetdicom (3.0.4) has a race between its reactor thread and back-to-back
    requests on one association (pydicom/pynetdicom#875): now and then a
    response is taken by the reactor ("Received unexpected C-STORE service
    message"), the request waits for :data:`DIMSE_TIMEOUT` and the association
    is aborted. The client then opens a new association and repeats the request
    (:data:`ATTEMPTS` tries); the sidecar treats the repeat like the first
    (duplicate C-STORE of identical bytes, example images replaced by UID).

    Parameters
    ----------
    host, port, called
        The peer and its AE title.
    storage
        ``(SOP Class UID, transfer syntax UID)`` presentation contexts for C-STORE.
    find
        Also request Study Root C-FIND (for :meth:`similar`).
    calling
        This client's AE title.
    name
        Prefix of the log line written before a retry.
    """

    def __init__(self, host: str, port: int, called: str, storage: Sequence[tuple[str, str]],
                 *, find: bool = False, calling: str = "EVALUATE", name: str = "scu"):
        self._host, self._port, self._called, self._calling = host, port, called, calling
        self._contexts = list(storage)
        if find:
            self._contexts.append((STUDY_ROOT_FIND, ExplicitVRLittleEndian))
        self._name = name
        self._assoc: Any = None
        self.lost = 0
        """Responses lost so far (each answered by a new association and a repeat)."""

    def store(self, ds: Dataset, what: str) -> None:
        """C-STORE ``ds`` (``what`` names it in errors).

        Raises
        ------
        ScuError
            No association, a failure status, or no response in :data:`ATTEMPTS` tries.
        """
        self._retrying(what, lambda: self._store(ds, what))

    def similar(self, ds: Dataset, top_k: int, what: str) -> list[SimilarityHit]:
        """C-STORE the example image ``ds``, then a similarity C-FIND for ``top_k`` studies.

        Returns the Pending responses in order. Both requests are repeated
        together after a lost response.

        Raises
        ------
        ScuError
            As :meth:`store`, or the C-FIND's final status is not Success.
        """
        def ask() -> list[SimilarityHit]:
            self._store(ds, what)
            return self._find(similarity_identifier(str(ds.SOPInstanceUID), top_k), what)

        return self._retrying(what, ask)

    def close(self) -> None:
        """Release the association."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def _get(self) -> Any:
        """The established association (opened when needed)."""
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        ae = AE(ae_title=self._calling)
        ae.acse_timeout = ae.network_timeout = 300
        ae.dimse_timeout = DIMSE_TIMEOUT
        for abstract, ts in self._contexts:
            ae.add_requested_context(abstract, ts)
        assoc = ae.associate(self._host, self._port, ae_title=self._called)
        if not assoc.is_established:
            raise ScuError(f"cannot associate with {self._called} at "
                           f"{self._host}:{self._port}")
        _no_delay(assoc)
        self._assoc = assoc
        return assoc

    def _drop(self) -> None:
        """Forget the association (aborting it if it is still up)."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.abort()
        self._assoc = None

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return action()
            except _LostMessage:
                self.lost += 1
                self._drop()
                if attempt == ATTEMPTS:
                    raise ScuError(f"{what}: no response in {ATTEMPTS} tries") from None
                logger.warning("%s: %s: no response (association aborted), trying again",
                               self._name, what)
        raise AssertionError("unreachable")  # pragma: no cover

    def _store(self, ds: Dataset, what: str) -> None:
        status = self._get().send_c_store(ds)
        if "Status" not in status:
            raise _LostMessage(what)
        if int(status.Status) != 0:
            raise ScuError(f"{what}: C-STORE failed: status 0x{int(status.Status):04X} "
                           f"{status.get('ErrorComment', '')}")

    def _find(self, ident: Dataset, what: str) -> list[SimilarityHit]:
        found: list[Dataset] = []
        final: Dataset | None = None
        for rsp, ds in self._get().send_c_find(ident, STUDY_ROOT_FIND):
            if "Status" not in rsp:
                raise _LostMessage(what)
            if int(rsp.Status) in (0xFF00, 0xFF01):
                if ds is not None:
                    found.append(ds)
            else:
                final = rsp
        if final is None:
            raise _LostMessage(what)
        if int(final.Status) != 0:
            raise ScuError(f"{what}: similarity C-FIND failed: status "
                           f"0x{int(final.Status):04X} {final.get('ErrorComment', '')}")
        hits = []
        for hit in found:
            block = hit.private_block(0x0099, SIMILARITY_CREATOR)
            hits.append(SimilarityHit(rank=int(block[RANK].value),
                                      score=float(block[SCORE].value),
                                      study_uid=str(hit.StudyInstanceUID)))
        return hits
