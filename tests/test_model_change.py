"""A model change re-embeds in the background and swaps the index in one step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydicom.uid import generate_uid

from sidecar.archive.store import InstanceStore, Origin
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.db.vectors import ACTIVE_MODEL_KEY
from sidecar.embeddings.model import TinyEmbedder
from sidecar.service.lifecycle import Embedding
from tests.conftest import make_ct, part10

OVERRIDES = {"preprocess": {"slice_spacing_mm": 0, "max_slices_per_series": 64}}


def _store_series(cfg: Config, n: int, seed: int) -> str:
    engine, repo = open_catalogue(cfg)
    try:
        store = InstanceStore(cfg, repo)
        study, series = generate_uid(), generate_uid()
        for i in range(n):
            ds = make_ct(study_uid=study, series_uid=series, instance_number=i + 1, seed=seed + i)
            store.store(part10(ds), None, Origin("TEST", "127.0.0.1"))
        repo.mark_stable_studies(0.0)
    finally:
        engine.dispose()
    return study


def _embedding(cfg: Config, seed: int) -> tuple[Embedding, Callable[[], None]]:
    engine, _ = open_catalogue(cfg)
    emb = Embedding(cfg, engine, TinyEmbedder(seed=seed))
    emb.open()

    def close() -> None:
        emb.close()
        engine.dispose()

    return emb, close


def test_model_change_reembeds_then_swaps(config_factory: Callable[..., Config]) -> None:
    cfg = config_factory(OVERRIDES)
    _store_series(cfg, 6, seed=0)
    _store_series(cfg, 4, seed=100)

    old, close = _embedding(cfg, seed=0)
    old.run_job()
    assert not old.reembedding
    assert len(old.serving.index) == 10
    close()

    new, close = _embedding(cfg, seed=1)
    try:
        assert new.embedder.model_id != old.embedder.model_id
        # The old model's index serves while the new one is built.
        assert new.reembedding
        assert new.serving.model_id == old.embedder.model_id
        assert len(new.serving.index) == 10
        assert new.vectors.get_setting(ACTIVE_MODEL_KEY) == old.embedder.model_id
        query = np.ones((1, new.serving.dim), dtype=np.float32)
        assert new.serving.index.search(query, 3)[0].shape == (1, 3)

        stats = new.worker.reembed_once(max_instances=6)  # one series at a time
        assert stats.series == 1 and new.reembedding  # not done: still the old index
        assert new.run_job().series == 1  # the other series; the old index still serves
        assert new.reembedding
        assert new.run_job().series == 0  # nothing left: swap
        assert not new.reembedding
        assert new.serving is new.index
        assert len(new.serving.index) == 10
        assert new.vectors.get_setting(ACTIVE_MODEL_KEY) == new.embedder.model_id
        counts = new.vectors.count_vectors()
        assert counts == {old.embedder.model_id: 10, new.embedder.model_id: 10}
    finally:
        close()

    # Going back to the first model needs no CNN run: its vectors are all there.
    back, close = _embedding(cfg, seed=0)
    try:
        assert back.reembedding
        stats = back.run_job()
        assert stats.slices_embedded == 0
        assert not back.reembedding
        assert back.vectors.get_setting(ACTIVE_MODEL_KEY) == back.embedder.model_id
    finally:
        close()


def test_a_model_change_waits_for_released_files_before_it_swaps(
    config_factory: Callable[..., Config],
) -> None:
    from sidecar.archive.retention import Releaser  # noqa: PLC0415
    from sidecar.db.retention import RetentionRepository  # noqa: PLC0415

    cfg = config_factory({**OVERRIDES, "storage": {"keep_files": "until_embedded"}})
    study, series = generate_uid(), generate_uid()
    files = [part10(make_ct(study_uid=study, series_uid=series, instance_number=i + 1,
                            seed=i)) for i in range(4)]
    engine, repo = open_catalogue(cfg)
    store = InstanceStore(cfg, repo)
    for data in files:
        store.store(data, None, Origin("PACS", "127.0.0.1"))
    repo.mark_stable_studies(0.0)
    old, close = _embedding(cfg, seed=0)
    old.run_job()
    released = Releaser(cfg, old.engine, lambda: old.model.model_id,
                        keep=old.keep_previews).run_once()
    assert released.released == 4 and released.previews == 4
    raw = {p.name: p for p in cfg.storage_dir.rglob("*.dcm")}
    assert raw == {}
    close()

    new, close = _embedding(cfg, seed=1)
    try:
        assert new.reembedding
        for _ in range(3):  # nothing can be re-embedded without the pixels: no swap
            stats = new.run_job()
            assert stats.slices_embedded == 0 and stats.instances_failed == 0
            assert new.reembedding
        waiting = RetentionRepository(new.engine).counts(new.model.model_id, max_attempts=3)
        assert (waiting.waiting_series, waiting.waiting_instances) == (1, 4)
        # the PACS sends the series again: restored, re-embedded, then the swap
        for data in files:
            store.store(data, None, Origin("PACS", "127.0.0.1"))
        assert new.run_job().slices_embedded == 4
        assert new.run_job().series == 0  # nothing left: swap
        assert not new.reembedding
        assert new.vectors.get_setting(ACTIVE_MODEL_KEY) == new.embedder.model_id
        # and its files go again, now that the new model has its vectors
        assert Releaser(cfg, new.engine, lambda: new.model.model_id).run_once().released == 4
    finally:
        close()
        engine.dispose()
