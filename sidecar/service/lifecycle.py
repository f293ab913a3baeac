"""The model-switch state machine: one process's model, index services and worker.

Opens the indexes, runs the embedding job, switches to a new model (after an
on-site adaptation run or a restore) while the old index serves, then swaps.
See docs/design/models.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from pydicom.dataset import Dataset

from sidecar.config import Config
from sidecar.db.retention import Releasable, RetentionRepository
from sidecar.db.types import Engine
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.db.volumes import VolumeRepository
from sidecar.embeddings.index_files import read_saved_facts
from sidecar.embeddings.model import Embedder
from sidecar.embeddings.previews import keep_previews
from sidecar.embeddings.registry import load_service_embedder
from sidecar.embeddings.service import IndexService
from sidecar.embeddings.volume_worker import VolumeWorker
from sidecar.embeddings.worker import EmbeddingWorker, IngestWatch, WorkStats
from sidecar.errors import SidecarError
from sidecar.training.adapt import AdaptationOutcome, TrainingLibrary, run_adaptation

logger = logging.getLogger(__name__)

MAX_PACE_PAUSE = 5.0
"""Longest pause (seconds) the embedding job takes after one series while instances arrive."""


def _lower_thread_priority(nice: int) -> None:
    """Make the calling thread nicer (Linux schedules threads as tasks)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:  # pragma: no cover - not permitted on some systems
        logger.debug("cannot lower the embedding thread's priority: %s", exc)


class Embedding:
    """The embedding parts of one process: model, index services and worker.

    Normally one index serves queries and receives the worker's vectors. After
    a model change (the configured model's id differs from the active one
    recorded in the database) the index of the previous model keeps serving
    queries while the worker embeds new studies and re-embeds old ones with
    the new model into a second index; once nothing is left, the new index is
    saved and becomes the active one in one step (``swap``). The old model's
    vectors and index stay on disk, so going back needs no CNN run.

    A model change starts either at start-up (the loaded model is not the
    active one) or in the running process (``switch_model``, after an on-site
    adaptation run accepted a new model: ``adapt``). In the second case the
    previous model is still in memory, so queries by image keep working with
    it until the swap (:attr:`embedder`).

    Parameters
    ----------
    config
        The configuration.
    engine
        The process's engine.
    embedder
        A ready embedder (tests); ``None`` loads the model the configuration
        and the catalogue name (``embedding.model_path``, else the adapted
        model recorded by on-site adaptation, else the shipped weights; see
        :func:`sidecar.embeddings.registry.load_service_embedder`).
    """

    def __init__(self, config: Config, engine: Engine, embedder: Embedder | None = None) -> None:
        self.config = config
        self.engine = engine
        self.vectors = VectorRepository(engine)
        self.model: Embedder = embedder or load_service_embedder(config, self.vectors)
        self.index: IndexService = IndexService(
            config, self.vectors, self.model.model_id, self.model.dim
        )
        self._ingest = IngestWatch(self.vectors.latest_instance_pk)
        self.worker: EmbeddingWorker = EmbeddingWorker(
            config, self.vectors, self.model, self.index, pace=self.pace
        )
        self.volume_worker = VolumeWorker(config, VolumeRepository(engine), pace=self.pace)
        self.serving: IndexService = self.index
        # The serving model's embedder while a switch made in this process re-embeds.
        self._serving_model: Embedder | None = None
        self._swap_lock = threading.Lock()
        # Held by a job run, by maintenance and by a switch: a switch waits for the run.
        self._job_lock = threading.Lock()
        self._cancel = threading.Event()

    @property
    def embedder(self) -> Embedder:
        """The embedder for queries by image: the serving model's when this process has it.

        That is the model the worker embeds with (:attr:`model`), except while a
        switch made in this process (``switch_model``) re-embeds: then the
        previous model, whose index still answers queries.
        """
        serving = self._serving_model
        return serving if serving is not None and self.reembedding else self.model

    @property
    def reembedding(self) -> bool:
        """True while a previous model's index still serves queries."""
        return self.serving is not self.index

    def open(self) -> None:
        """Take the index locks, load or rebuild the indexes and repair them."""
        report = self.index.open()
        logger.info(
            "index for model %s: %d vectors (%s)",
            self.model.model_id, report.count,
            "loaded" if report.loaded else "rebuilt",
        )
        active = self.vectors.get_setting(ACTIVE_MODEL_KEY)
        previous = self.vectors.count_vectors().get(active or "", 0)
        if active and active != self.model.model_id and previous:
            old_dim = self._stored_dim(active)
            self.serving = IndexService(self.config, self.vectors, active, old_dim)
            try:
                self.serving.open()
            except Exception:
                self.serving = self.index
                self.index.close()
                raise
            logger.warning(
                "model changed from %s to %s: %d vectors of the old model keep serving "
                "queries while studies are re-embedded in the background",
                active, self.model.model_id, previous,
            )
        else:
            self.vectors.set_setting(ACTIVE_MODEL_KEY, self.model.model_id)

    def _stored_dim(self, model_id: str) -> int:
        try:
            return int(read_saved_facts(self.config.index_dir / model_id)["dim"])
        except Exception:  # noqa: BLE001 - fall back to the stored blobs' size
            for batch in self.vectors.slice_vectors(model_id, batch=1):
                return len(batch[0][1]) // 2  # float16
            raise

    def run_job(self, progress: Callable[[int], None] | None = None) -> WorkStats:
        """The scheduled job: embed due work, re-embed after a model change, swap when done.

        Returns what was done; a run that did nothing means nothing is due now.
        """
        _lower_thread_priority(self.config.worker.nice)
        with self._job_lock:
            stats = self.worker.run_once(progress=progress)
            if self.reembedding:
                again = self.worker.reembed_once()
                stats.merge(again)
                # New and pending studies go to the new index anyway (they were never
                # in the old one), so the swap waits only for the old studies.
                if again.series == 0 and not self._waiting_for_pixels():
                    self.swap()
            # Series volumes once their slices are done (the model that writes them).
            stats.volumes = self.volume_worker.run_once(self.model)
        return stats

    def _waiting_for_pixels(self) -> bool:
        """Whether series the new model needs wait for released files (storage.fetch)."""
        waiting = RetentionRepository(self.engine).counts(
            self.model.model_id, max_attempts=self.config.worker.max_attempts)
        if waiting.waiting_series:
            logger.info("model change: %d series wait for their released files before the "
                        "swap (storage.fetch)", waiting.waiting_series)
        return waiting.waiting_series > 0

    def run_exclusive(self, job: Callable[[], object]) -> None:
        """Run ``job`` (the release job) never beside an embedding job run or a switch."""
        with self._job_lock:
            job()

    def keep_previews(self, ds: Dataset, item: Releasable) -> int:
        """Keep the page's previews of a file about to be released, at the serving shape."""
        serving = self.embedder
        return keep_previews(self.config.previews_dir, ds, item.frames,
                             cfg=self.config.preprocess, size=int(serving.input_size),
                             channels=int(serving.channels), fsync=self.config.storage.fsync)

    def pace(self, busy: float) -> float:
        """The worker's pause after a series that took ``busy`` seconds; returns the pause.

        While instances are arriving (:class:`~sidecar.embeddings.worker.IngestWatch`)
        the job keeps to ``worker.ingest_share`` of the time: it waits
        ``busy * (1 / share - 1)`` seconds (at most :data:`MAX_PACE_PAUSE`; a
        stop ends the wait at once). Otherwise it goes on at once.
        """
        share = self.config.worker.ingest_share
        if share >= 1.0 or busy <= 0.0 or self._cancel.is_set() or not self._ingest.active():
            return 0.0
        pause = min(busy * (1.0 / share - 1.0), MAX_PACE_PAUSE)
        started = time.monotonic()
        self._cancel.wait(pause)
        return time.monotonic() - started

    def maintain(self) -> None:
        """Periodic job: reconcile the indexes with the database, then save them."""
        with self._job_lock, self.worker.run_lock:
            for service in {id(self.index): self.index, id(self.serving): self.serving}.values():
                service.reconcile(save=False)
                service.save()

    def switch_model(self, embedder: Embedder) -> bool:
        """Start a model change in the running process: ``embedder`` becomes the model to write.

        The current index keeps serving queries (and the current model keeps
        embedding query images) while the next job runs embed new studies and
        re-embed the archive into ``embedder``'s index (``worker.reembed_once``);
        when nothing is left, ``swap`` makes that index the active one. Waits for
        a running job run. Vectors ``embedder`` already has (a switch back) are
        reused, not embedded again.

        Returns
        -------
        bool
            Whether a change started (``False``: ``embedder`` is already the model).

        Raises
        ------
        sidecar.errors.SidecarError
            A model change is already in progress.
        sidecar.embeddings.service.IndexBusy
            Another process owns ``embedder``'s index.
        """
        with self._job_lock:
            if embedder.model_id == self.model.model_id:
                return False
            if self.reembedding:
                raise SidecarError(
                    f"a model change to {self.model.model_id} is in progress; "
                    f"cannot switch to {embedder.model_id} now"
                )
            index = IndexService(self.config, self.vectors, embedder.model_id, embedder.dim)
            report = index.open()
            old = self.model
            # Order matters for concurrent queries: the old model stays the query
            # embedder from the moment the new index is the write target.
            self._serving_model = old
            self.serving = self.index
            self.index = index
            self.model = embedder
            self.worker = EmbeddingWorker(self.config, self.vectors, embedder, index,
                                          pace=self.pace)
        logger.warning(
            "model change from %s to %s: the index of %s keeps serving queries while studies "
            "are re-embedded in the background (%d vectors of the new model already stored)",
            old.model_id, embedder.model_id, old.model_id, report.count,
        )
        return True

    def adapt(self, library: TrainingLibrary | None = None) -> AdaptationOutcome:
        """One on-site adaptation run; an accepted model is switched to (``switch_model``).

        Skipped (with the reason in the outcome, logged at INFO) while a model
        change re-embeds. See :mod:`sidecar.training.adapt`.

        Raises
        ------
        sidecar.training.adapt.AdaptationBusy
            Another adaptation run is in progress.
        """
        if self.reembedding:
            reason = (f"skipped: a model change to {self.model.model_id} is still re-embedding; "
                      f"model {self.serving.model_id} serves")
            logger.info("on-site adaptation: %s", reason)
            return AdaptationOutcome(False, reason, self.model.model_id)
        _lower_thread_priority(self.config.worker.nice)
        outcome = run_adaptation(self.config, self.engine, self.model, library=library,
                                 cancel=self._cancel)
        if outcome.accepted and outcome.embedder is not None:
            try:
                self.switch_model(outcome.embedder)
            except Exception:
                # Recorded in the catalogue already: the next start switches to it.
                logger.exception("cannot switch to the adapted model %s now; it is used from "
                                 "the next start", outcome.embedder.model_id)
        return outcome

    def cancel(self) -> None:
        """Ask a running adaptation run to stop soon (at the next epoch); nothing is recorded."""
        self._cancel.set()

    def swap(self) -> None:
        """Make the new model's index the active one (atomically for queries)."""
        with self._swap_lock:
            if not self.reembedding:
                return
            old = self.serving
            self.index.save(force=True)
            self.vectors.set_setting(ACTIVE_MODEL_KEY, self.model.model_id)
            self.serving = self.index
            self._serving_model = None
            old.close()
            logger.warning(
                "model %s is now active (%d vectors); model %s kept on disk for rollback",
                self.model.model_id, len(self.index.index), old.model_id,
            )

    def close(self) -> None:
        """Save the indexes if they changed and release their locks."""
        if self.reembedding:
            self.serving.close()
        self.index.close()
