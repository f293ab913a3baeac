"""The DICOM node: a pynetdicom AE with C-ECHO, C-STORE and C-FIND.

Handlers are thin: they translate between DIMSE and the services that do the
work (:class:`InstanceStore` for storage, the C-FIND branches of
:mod:`sidecar.dicom.find`). Each handler lists the statuses it can return.
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pnd_config
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.transport import ThreadedAssociationServer

from sidecar.archive.iocm import audit_rejection
from sidecar.archive.store import InstanceStore, Origin, Outcome
from sidecar.audit import setup as audit_setup
from sidecar.audit.events import Auditor
from sidecar.audit.messages import sop_class_counts
from sidecar.config import Config
from sidecar.dicom import strict
from sidecar.dicom.access import AccessPolicy
from sidecar.dicom.admission import LOCAL_LIMIT_EXCEEDED, Admission
from sidecar.dicom.find import (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    CatalogueFind,
    FindBranch,
    FindRequest,
    is_similarity_query,
    model_name,
)
from sidecar.dicom.statuses import Status, error_comment
from sidecar.dicom.tls import TlsHandshakeInThread, peer_summary, server_context
from sidecar.errors import (
    InvalidDataset,
    InvalidQuery,
    OutOfResources,
    QueryError,
    RejectedInstance,
    SearchError,
    StorageFailure,
)
from sidecar.search.front import Requester, SimilarityBackend

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
#: C-FIND identifiers: Explicit VR Little Endian first, so that it is chosen
#: whenever the requester offers it (pynetdicom takes the acceptor's order):
#: private attributes then travel with their VR (in Implicit VR they arrive as UN).
FIND_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
FIND_MODELS = (STUDY_ROOT_FIND, PATIENT_ROOT_FIND)
SIMILARITY_NOT_AVAILABLE = "similarity queries not available (embedding is off)"

_INVALID_STATUS = {
    "unparseable": Status.CANNOT_DECODE_DATASET,
    "missing": Status.CANNOT_UNDERSTAND,
    "invalid_uid": Status.INVALID_SOP_INSTANCE,
    "mismatch": Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    "inconsistent": Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
}


@dataclass
class _StudyTransfer:
    """What one association sent of one study (for its audit message)."""

    patient_id: str
    issuer: str
    sop_classes: dict[str, int] = field(default_factory=dict)
    example: bool = False
    failed: int = 0


@dataclass
class _AssocStats:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    studies: dict[tuple[str, bool], _StudyTransfer] = field(default_factory=dict)

    def received(self, study: str, sop_class: str, patient_id: str, issuer: str,
                 example: bool = False) -> None:
        """Count one instance of ``study`` kept (or embedded as an example)."""
        st = self.studies.setdefault((study, example),
                                     _StudyTransfer(patient_id, issuer, example=example))
        st.sop_classes[sop_class] = st.sop_classes.get(sop_class, 0) + 1

    def not_kept(self, event: Any) -> None:
        """Count a failed or refused instance against its study, when it names one."""
        try:
            ds = event.dataset
            study = str(ds.get("StudyInstanceUID", "") or "").strip()
            if not study:
                return
            st = self.studies.setdefault((study, False), _StudyTransfer(
                str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")))
            st.failed += 1
        except Exception:  # noqa: BLE001 - undecodable: it belongs to no study
            return


@dataclass
class _FindState:
    """How a C-FIND ended (for its audit message)."""

    status: int = int(Status.UNHANDLED_EXCEPTION)
    sent: int = 0
    similarity: bool = False


class _ReusePortServer(ThreadedAssociationServer):
    """An association server whose listening socket shares its port (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        sock = self.socket
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _TlsServer(TlsHandshakeInThread, ThreadedAssociationServer):
    """An association server speaking TLS only (handshake in each connection's thread)."""


class _TlsReusePortServer(TlsHandshakeInThread, _ReusePortServer):
    """:class:`_TlsServer` sharing its port (SO_REUSEPORT)."""


def _status(code: Status, comment: str | None = None, offending: int | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = int(code)
    if comment:
        ds.ErrorComment = error_comment(comment)
    if offending is not None:
        ds.OffendingElement = [offending]
    return ds


def _query_failure(exc: QueryError) -> Dataset:
    """The final C-FIND status for a query error."""
    tag = exc.tag if isinstance(exc, InvalidQuery) else None
    return _status(Status(exc.dicom_status), str(exc), tag)


class DicomNode:
    """The sidecar's Application Entity and its handlers.

    Parameters
    ----------
    config
        Full configuration (``dicom`` section).
    store
        Durable instance storage.
    reuse_port
        Bind with ``SO_REUSEPORT`` so that several receiver processes share the
        port and the kernel spreads associations over them.
    max_associations
        This process's share of ``dicom.max_associations``.
    finder
        The ordinary C-FIND branch; ``None`` builds :class:`CatalogueFind` on
        the store's catalogue with ``dicom.max_find_results`` and
        ``dicom.retrieve_ae_title``.
    similarity
        The C-FIND branch for identifiers carrying the ``PACS SIDECAR
        SIMILARITY`` private block; it is asked first. ``None``: such queries
        are answered 0xA900 "similarity queries not available".
    examples
        Takes the images sent by C-STORE to ``query.example_ae_title`` (query
        by example). ``None`` (or an empty ``example_ae_title``): that AE
        title is not served.
    auditor
        Reports associations, received studies, queries and refusals
        (:mod:`sidecar.audit`); ``None``: a null auditor.
    """

    def __init__(
        self,
        config: Config,
        store: InstanceStore,
        *,
        reuse_port: bool = False,
        max_associations: int | None = None,
        finder: FindBranch | None = None,
        similarity: FindBranch | None = None,
        examples: SimilarityBackend | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self._cfg = config.dicom
        self._audit = auditor or audit_setup.auditor(config, None)
        self._example_ae = config.query.example_ae_title if examples is not None else ""
        self._examples = examples
        self._store = store
        self._finder: FindBranch = finder or CatalogueFind(
            store.repository.engine,
            max_results=self._cfg.max_find_results,
            retrieve_ae_title=self._cfg.effective_retrieve_ae_title,
        )
        self._similarity = similarity
        self._reuse_port = reuse_port
        self._max_associations = max_associations or self._cfg.max_associations
        self._policy = AccessPolicy(self._cfg.allowed_peers, self._cfg.allow_loopback)
        self._admission = Admission(self._max_associations, self._cfg.acse_timeout,
                                    self._cfg.network_timeout, tcp_nodelay=self._cfg.tcp_nodelay)
        self._server: ThreadedAssociationServer | None = None
        self._stats: weakref.WeakKeyDictionary[Any, _AssocStats] = weakref.WeakKeyDictionary()
        self._stats_lock = threading.Lock()
        tls = config.dicom.tls
        self._tls = server_context(tls) if tls.enabled else None
        self._tls_timeout = tls.handshake_timeout
        self.ae = self._build_ae()

    # ------------------------------------------------------------ lifecycle
    def _build_ae(self) -> AE:
        strict.install()
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's standard per-PDU/per-message log handlers cost ~10 %
            # of a store; we log per association ourselves.
            pnd_config.LOG_HANDLER_LEVEL = "none"
            # pynetdicom logs C-FIND identifiers (patient names and IDs) at INFO.
            pnd_config.LOG_REQUEST_IDENTIFIERS = False
            pnd_config.LOG_RESPONSE_IDENTIFIERS = False
        ae = AE(ae_title=self._cfg.ae_title)
        ts = list(AllTransferSyntaxes)
        ae.add_supported_context(VERIFICATION, ts)
        for cx in AllStoragePresentationContexts:  # every storage SOP class
            if cx.abstract_syntax:
                ae.add_supported_context(cx.abstract_syntax, ts)
        for uid in FIND_MODELS:
            ae.add_supported_context(uid, FIND_TRANSFER_SYNTAXES)
        ae.maximum_associations = self._admission.connection_limit
        ae.maximum_pdu_size = self._cfg.max_pdu_size
        ae.acse_timeout = self._cfg.acse_timeout
        ae.dimse_timeout = self._cfg.dimse_timeout
        ae.network_timeout = self._cfg.network_timeout
        # Called AE titles are checked in _on_requested: ae_title and the
        # example AE title are both ours.
        ae.require_called_aet = False
        return ae

    def handlers(self) -> list[tuple[Any, ...]]:
        """Event bindings of the node."""
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, lambda event: self._admission.closed(event.assoc)),
            (evt.EVT_REJECTED, lambda event: self._admission.rejected(event.assoc)),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed, ["released"]),
            (evt.EVT_ABORTED, self._on_closed, ["aborted"]),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_FIND, self.handle_find),
        ]

    def start(self) -> tuple[str, int]:
        """Start listening in background threads; returns the bound address."""
        if self._tls is not None:
            server_class: type[ThreadedAssociationServer] = (
                _TlsReusePortServer if self._reuse_port else _TlsServer
            )
        else:
            server_class = _ReusePortServer if self._reuse_port else ThreadedAssociationServer
        server = self.ae.make_server(
            (self._cfg.bind_address, self._cfg.port),
            evt_handlers=self.handlers(),
            server_class=server_class,
        )
        if isinstance(server, TlsHandshakeInThread):
            assert self._tls is not None
            server.tls_context = self._tls
            server.tls_handshake_timeout = self._tls_timeout
            server.tls_handshake_failed = self._audit.node_authentication_failed
        thread = threading.Thread(
            target=server.serve_forever, name="dicom-acceptor", daemon=True
        )
        thread.start()
        self._server = server
        host, port = server.server_address[:2]
        logger.info("DICOM node %s listening on %s:%s%s", self._cfg.ae_title, host, port,
                    " (TLS)" if self._tls is not None else "")
        return str(host), int(port)

    @property
    def listening(self) -> bool:
        """True while the node accepts associations."""
        return self._server is not None

    def stop(self) -> None:
        """Stop accepting associations and wait for running ones to end."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.shutdown()
            except ValueError:
                # Stopped and closed; only its removal from the AE's list of
                # servers failed (AE.make_server does not add it there).
                pass
            logger.info("DICOM node stopped")

    # ------------------------------------------------------------ handlers
    def _on_conn_open(self, event: evt.Event) -> None:
        self._admission.opened(event.assoc)

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse callers that are not allowed (A-ASSOCIATE-RJ).

        Calling AE title or host not allowed: rejected-permanent, "calling AE
        title not recognised"; called AE title neither ``dicom.ae_title`` nor
        the example AE title (when ``dicom.require_called_ae_title``):
        rejected-permanent, "called AE title not recognised".
        """
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive else "").strip()
        called = str(primitive.called_ae_title if primitive else "").strip()
        host = str(assoc.requestor.address)
        if not self._policy.allows(calling, host):
            logger.warning("association from %s@%s refused: peer not allowed", calling, host)
            self._audit.association_refused(calling, called, host,
                                            "calling AE title and host not allowed")
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()
            return
        if called == self._example_ae:
            assoc.acceptor.ae_title = called  # answer with the title that was called
        elif self._cfg.require_called_ae_title and called != self._cfg.ae_title:
            logger.warning("association from %s@%s refused: called AE title %r is not ours",
                           calling, host, called)
            self._audit.association_refused(calling, called, host,
                                            "called AE title not recognised")
            assoc.acse.send_reject(0x01, 0x01, 0x07)
            assoc.kill()
            return
        if not self._admission.admit(assoc):
            logger.warning("association from %s@%s refused: all %d associations in use "
                           "(dicom.max_associations)", calling, host, self._max_associations)
            self._audit.association_refused(calling, called, host, "local limit exceeded")
            assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
            assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._admission.established(assoc)
        with self._stats_lock:
            self._stats[assoc] = _AssocStats()
        transport = getattr(assoc.dul.socket, "socket", None) if assoc.dul.socket else None
        tls = peer_summary(transport)
        logger.info(
            "association from %s@%s:%s accepted%s",
            str(assoc.requestor.ae_title).strip(), assoc.requestor.address, assoc.requestor.port,
            f" over {tls}" if tls else "",
        )
        self._audit.association_accepted(str(assoc.requestor.ae_title).strip(),
                                         str(assoc.requestor.address), tls or "")

    def _on_closed(self, event: evt.Event, how: str) -> None:
        assoc = event.assoc
        with self._stats_lock:
            st = self._stats.pop(assoc, None)
        if st is None:
            return
        logger.info(
            "association from %s@%s %s: %d stored, %d duplicate, %d refused, %d failed",
            str(assoc.requestor.ae_title).strip(), assoc.requestor.address, how,
            st.stored, st.duplicates, st.refused, st.failed,
        )
        for (study, example), tr in st.studies.items():  # one message per study
            self._audit.instances_received(
                str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address), study,
                tr.patient_id, tr.issuer, sop_class_counts(tr.sop_classes.items()),
                failed=tr.failed, example=example,
            )

    def _not_permitted(self, assoc: Any, operation: str, what: str) -> Dataset | None:
        """A 0x0124 status when the peer may not use ``operation``; ``None`` when it may."""
        calling = str(assoc.requestor.ae_title).strip()
        host = str(assoc.requestor.address)
        if self._policy.permits(calling, host, operation):
            return None
        logger.warning("%s from %s@%s refused: the peer lacks the %r permission "
                       "(dicom.allowed_peers)", what, calling, host, operation)
        self._audit.permission_refused(calling, host, operation, what)
        return _status(Status.NOT_AUTHORIZED, f"not authorised: no {operation} permission")

    def handle_echo(self, event: evt.Event) -> int:
        """C-ECHO.

        Returns
        -------
        int
            ``0x0000`` Success.
        """
        return int(Status.SUCCESS)

    def handle_store(self, event: evt.Event) -> Dataset:
        """C-STORE: keep the dataset byte for byte, durably, then acknowledge.

        Returns
        -------
        pydicom.dataset.Dataset
            Status with Error Comment on failure:

            * ``0x0000`` Success (stored, or an identical/kept-first duplicate)
            * ``0xA700`` Out of resources (free disk below the watermark)
            * ``0xA900`` Dataset does not match SOP Class (UIDs disagree with
              the request, inconsistent hierarchy, short pixel data)
            * ``0xC000`` Cannot understand (required UID missing)
            * ``0xC210`` Cannot decode dataset
            * ``0x0117`` Invalid SOP Instance (UID not digits and dots)
            * ``0x0110`` Processing failure (write or database commit failed)
            * ``0x0124`` Refused: not authorised (the peer lacks the ``store``
              permission, or ``example`` for an example image)
            * ``0xA770`` Refused: an IOCM rejection note rejected the instance
            * ``0xC211`` Unexpected error in the handler
        """
        assoc = event.assoc
        if self._example_ae and self._examples is not None:
            primitive = assoc.requestor.primitive
            if primitive is not None and str(primitive.called_ae_title).strip() == (
                self._example_ae
            ):
                refused = self._not_permitted(assoc, "example", "example image")
                return refused if refused is not None else self._store_example(event)
        origin = Origin(
            ae_title=str(assoc.requestor.ae_title).strip(), host=str(assoc.requestor.address)
        )
        st = self._stats.get(assoc) or _AssocStats()
        refused = self._not_permitted(assoc, "store", "C-STORE")
        if refused is not None:
            st.refused += 1
            return refused
        try:
            request = event.request
            if not isinstance(request, C_STORE):  # pragma: no cover - bound to EVT_C_STORE
                raise TypeError("not a C-STORE request")
            data = event.encoded_dataset(include_meta=True)
            result = self._store.store(
                data,
                str(event.context.transfer_syntax),
                origin,
                expected_sop_class_uid=str(request.AffectedSOPClassUID),
                expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
            )
        except OutOfResources as exc:
            st.failed += 1
            st.not_kept(event)
            logger.error("store from %s refused: %s", origin.ae_title, exc)
            return _status(Status.OUT_OF_RESOURCES, str(exc))
        except InvalidDataset as exc:
            st.refused += 1
            st.not_kept(event)
            return _status(_INVALID_STATUS.get(exc.kind, Status.CANNOT_UNDERSTAND), str(exc))
        except RejectedInstance as exc:
            st.refused += 1
            st.not_kept(event)
            logger.info("store from %s refused: %s", origin.ae_title, exc)
            return _status(Status.SUBSEQUENT_OCCURRENCE_OF_REJECTED, "rejected by IOCM note")
        except StorageFailure as exc:
            st.failed += 1
            st.not_kept(event)
            logger.error("store from %s failed: %s", origin.ae_title, exc)
            return _status(Status.PROCESSING_FAILURE, str(exc))
        except Exception as exc:  # noqa: BLE001 - the node must answer, never crash
            st.failed += 1
            st.not_kept(event)
            logger.exception("unexpected error storing from %s", origin.ae_title)
            return _status(Status.UNHANDLED_EXCEPTION, f"internal error: {exc.__class__.__name__}")
        if result.outcome in (Outcome.DUPLICATE, Outcome.KEPT_FIRST):
            st.duplicates += 1
        else:
            st.stored += 1
        st.received(result.study_instance_uid, str(request.AffectedSOPClassUID),
                    result.patient_id, result.issuer_of_patient_id)
        if result.rejection is not None:
            audit_rejection(self._audit, origin.ae_title, origin.host, result.rejection)
        return _status(Status.SUCCESS)

    def _store_example(self, event: evt.Event) -> Dataset:
        """C-STORE to the example AE title: embed now, keep in memory, never archive.

        Returns
        -------
        pydicom.dataset.Dataset
            Status with Error Comment on failure:

            * ``0x0000`` Success: embedded, usable as a reference until it expires
            * ``0xA700`` Out of resources: no model can embed it for the
              serving index now (embedding off, model change in progress)
            * ``0xC000`` Cannot understand: not an image that can be embedded
            * ``0xC211`` Unexpected error
        """
        assoc = event.assoc
        who = Requester("dicom", str(assoc.requestor.ae_title).strip(),
                        str(assoc.requestor.address))
        assert self._examples is not None  # checked by the caller
        try:
            data = event.encoded_dataset(include_meta=True)
            info = self._examples.add_example(data, who)
        except SearchError as exc:
            code = Status(exc.store_status)
            logger.info("example image from %s@%s refused: %s", who.name, who.address,
                        exc.__class__.__name__)
            logger.debug("example image refused: %s", exc)
            return _status(code, f"example: {exc}")
        except Exception as exc:  # noqa: BLE001 - the node must answer, never crash
            logger.exception("unexpected error embedding an example from %s", who.name)
            return _status(Status.UNHANDLED_EXCEPTION, f"internal error: {exc.__class__.__name__}")
        st = self._stats.get(assoc)
        if st is not None:
            ds = event.dataset
            st.received(info.study_instance_uid, str(event.request.AffectedSOPClassUID),
                        str(ds.get("PatientID", "") or ""),
                        str(ds.get("IssuerOfPatientID", "") or ""), example=True)
        return _status(Status.SUCCESS)

    def handle_find(self, event: evt.Event) -> Iterator[tuple[Dataset | int, Dataset | None]]:
        """C-FIND (see :meth:`_find`), audited however it ends."""
        state = _FindState()
        try:
            yield from self._find(event, state)
        finally:
            self._audit_find(event, state)

    def _audit_find(self, event: evt.Event, state: _FindState) -> None:
        assoc = event.assoc
        request = event.request
        raw = getattr(request, "Identifier", None)
        self._audit.dicom_query(
            str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address),
            str(request.AffectedSOPClassUID), raw.getvalue() if raw is not None else b"",
            str(event.context.transfer_syntax), matches=state.sent, status=state.status,
            similarity=state.similarity,
        )

    def _find(self, event: evt.Event, state: _FindState
              ) -> Iterator[tuple[Dataset | int, Dataset | None]]:
        """C-FIND, Study Root and Patient Root: ordinary queries, or the similarity branch.

        An identifier carrying the ``PACS SIDECAR SIMILARITY`` private block
        goes to the similarity branch, any other to the ordinary one (matching
        rules in :mod:`sidecar.dicom.find`). C-CANCEL is checked before
        every match is sent.

        Yields
        ------
        tuple of (pydicom.dataset.Dataset or int, pydicom.dataset.Dataset or None)
            Status and identifier; failures carry an Error Comment:

            * ``0xFF00`` Pending, a match follows
            * ``0xFF01`` Pending, a match follows; an optional key was not supported
            * ``0x0000`` Success, matching complete (sent by pynetdicom)
            * ``0xFE00`` Cancel, matching stopped by a C-CANCEL request
            * ``0xA700`` Out of resources (catalogue unavailable, more matches
              than ``dicom.max_find_results``)
            * ``0xA700`` also: similarity search unavailable (no index, embedding
              off, model change in progress for examples)
            * ``0xA900`` Identifier does not match SOP Class (QueryRetrieveLevel
              missing or invalid, a required unique key missing, a bad value;
              Offending Element names it; a similarity block without exactly one
              valid reference, a bad top-K or filter), or a similarity query
              while no similarity branch is installed
            * ``0xC000`` Unable to process (another query error of a branch)
            * ``0xC001`` Similarity: the reference is not in the archive (nor an
              example image)
            * ``0xC002`` Similarity: the reference is not embedded yet (pending,
              failed, not an image, or not by the serving model)
            * ``0xC210`` Cannot decode the identifier
            * ``0xC211`` Unexpected error in the handler
            * ``0x0124`` Refused: not authorised (the peer lacks the ``find``
              permission, or ``similarity`` for a similarity query)
        """
        assoc = event.assoc
        peer_ae, peer_host = str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)
        request = event.request
        if not isinstance(request, C_FIND):  # pragma: no cover - bound to EVT_C_FIND
            raise TypeError("not a C-FIND request")
        model = str(request.AffectedSOPClassUID)
        try:
            identifier = event.identifier
        except Exception as exc:  # noqa: BLE001 - undecodable bytes from the peer
            logger.warning("C-FIND from %s@%s: cannot decode identifier", peer_ae, peer_host)
            state.status = int(Status.CANNOT_DECODE_DATASET)
            yield _status(Status.CANNOT_DECODE_DATASET, f"cannot decode identifier: {exc}"), None
            return
        what = f"C-FIND {model_name(model)}"
        sent = 0
        try:
            req = FindRequest(identifier, model, peer_ae, peer_host)
            similarity = state.similarity = is_similarity_query(identifier)
            operation = "similarity" if similarity else "find"
            refused = self._not_permitted(
                assoc, operation, f"{what} similarity" if similarity else what
            )
            if refused is not None:
                state.status = int(Status.NOT_AUTHORIZED)
                yield refused, None
                return
            if similarity:
                what += " similarity"
                if self._similarity is None:
                    raise InvalidQuery(SIMILARITY_NOT_AVAILABLE)
                answer = self._similarity(req)
            else:
                answer = self._finder(req)
            what += f" {answer.level.value}"
            for match in answer.identifiers:
                if event.is_cancelled:
                    logger.info(
                        "%s from %s@%s cancelled after %d match(es)", what, peer_ae, peer_host, sent
                    )
                    state.status = int(Status.CANCEL)
                    yield int(Status.CANCEL), None
                    return
                yield int(answer.pending), match
                sent += 1
                state.sent = sent
        except QueryError as exc:
            # The message may quote a value of the query (a birth date): DEBUG only.
            tag = getattr(exc, "tag", None)
            logger.info(
                "%s from %s@%s refused: %s%s", what, peer_ae, peer_host, exc.__class__.__name__,
                f" ({keyword_for_tag(tag) or f'{tag:08X}'})" if tag is not None else "",
            )
            logger.debug("%s refused: %s", what, exc)
            failure = _query_failure(exc)
            state.status = int(failure.Status)
            yield failure, None
            return
        except Exception as exc:  # noqa: BLE001 - the node must answer, never crash
            logger.exception("unexpected error in %s from %s@%s", what, peer_ae, peer_host)
            state.status = int(Status.UNHANDLED_EXCEPTION)
            yield _status(
                Status.UNHANDLED_EXCEPTION, f"internal error: {exc.__class__.__name__}"
            ), None
            return
        state.status = int(Status.SUCCESS)
        logger.info("%s from %s@%s: %d match(es)", what, peer_ae, peer_host, sent)
