"""On-site adaptation: fine-tune on the archive, accept only a better model, switch, restore.

The archive is small and synthetic (six CT series of distinct slices); the
models are tiny SliceNetV1 networks at 32 px. The decision tests use a
training stand-in (it returns chosen weights) and a label-free stand-in score
(near-duplicate retrieval: how often a slightly noisy copy of a held-out slice
finds its original first), so the outcome is known in advance: a *collapsed*
model (every slice gets the same vector) scores about 1/N, a working random
network about 1. The weights are saved with the real library's
``save_weights`` when it exists. One test runs the real training library end
to end.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydicom.uid import generate_uid

from sidecar.archive.store import InstanceStore, Origin
from sidecar.cli.main import main
from sidecar.config import Config, load_config
from sidecar.db.connect import open_catalogue
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.embeddings.model import Embedder, atomic_write
from sidecar.embeddings.network import (
    WEIGHTS_FORMAT,
    SliceNetV1,
    SliceNetV1Params,
    file_model_id,
    serialise_state_dict,
)
from sidecar.embeddings.registry import (
    ADAPTED_MODEL_KEY,
    ModelRecord,
    model_history,
    record_adapted_model,
)
from sidecar.errors import ConfigError
from sidecar.search.service import SearchService
from sidecar.search.types import Reference
from sidecar.service.app import Sidecar
from sidecar.service.lifecycle import Embedding
from sidecar.training import adapt
from sidecar.training.adapt import TrainingLibrary
from tests.conftest import make_ct, part10

pytestmark = pytest.mark.usefixtures("cli_isolation")  # env, cwd and logging restored

SIZE = 32
TINY = SliceNetV1Params(stem_width=4, widths=(8, 16), depths=(1, 1), separable=(False, True),
                        dim=16)
SERIES, SLICES = 6, 5
OVERRIDES: dict[str, Any] = {
    "embedding": {"input_size": SIZE, "batch_size": 16},
    "preprocess": {"slice_spacing_mm": 0, "max_slices_per_series": 64},
    # two series per job run: re-embedding the six takes several runs
    "worker": {"batch_instances": 2 * SLICES},
    "adaptation": {"max_slices": 200, "holdout_fraction": 0.34, "epochs": 1,
                   "min_improvement": 0.2, "seed": 3},
}


# The recipe the base weights say they were trained with (adaptation continues it).
PARENT_RECIPE: dict[str, Any] = {"epochs": 60, "temperature": 0.07, "padding": "border",
                                 "crop_scale": [0.4, 1.0], "source_balance": 0.5, "seed": 42,
                                 "input_size": 999, "max_seconds": 5.0}


# ------------------------------------------------------------------- models
def proper_model(seed: int) -> SliceNetV1:
    """A working (random) network: distinct slices get distinct vectors."""
    net = SliceNetV1(TINY)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net.eval()


def collapsed_model(seed: int) -> SliceNetV1:
    """A network whose output ignores the input: every slice gets the same vector."""
    net = proper_model(seed)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.randn(TINY.dim, generator=torch.Generator().manual_seed(seed)))
    return net


def write_weights(path: Path, net: SliceNetV1) -> str:
    """``path`` (.pt) and its .json in the layout ``load_weights`` reads; returns the file id."""
    data = serialise_state_dict(net)
    atomic_write(path, data)
    import hashlib

    desc = {"format": WEIGHTS_FORMAT, "architecture": SliceNetV1.ARCHITECTURE,
            "hparams": net.hparams.to_json(), "input_size": SIZE, "trained": True,
            "dim": TINY.dim, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "training": {"recipe": PARENT_RECIPE}}
    path.with_suffix(".json").write_text(json.dumps(desc))
    return file_model_id(data)


# ------------------------------------------------------- training stand-ins
def near_duplicate_score(embedder: Embedder, images: np.ndarray, *, seed: int) -> float:
    """Label-free stand-in: how often a noisy copy's nearest held-out slice is its original."""
    x = np.asarray(images, dtype=np.float32).reshape(-1, SIZE, SIZE)
    noisy = np.clip(x + np.random.default_rng(seed).normal(0, 0.01, x.shape), 0, 1)
    a = embedder.embed(x)
    b = embedder.embed(noisy.astype(np.float32))
    return float(np.mean(np.argmax(b @ a.T, axis=1) == np.arange(len(x))))


def _stand_in_save(path: Path, result: Any, recipe: Any, manifest: dict[str, Any]) -> Path:
    net = SliceNetV1(TINY)
    net.load_state_dict(result.state_dict)
    write_weights(path, net)
    desc = json.loads(path.with_suffix(".json").read_text())
    desc["manifest"] = manifest
    path.with_suffix(".json").write_text(json.dumps(desc))
    return path


@dataclass
class StandIn:
    """A training library whose ``train_model`` returns the weights of ``target``."""

    target: SliceNetV1
    calls: list[dict[str, Any]] = field(default_factory=list)

    def train_model(self, images: np.ndarray, recipe: Any, *, init_state: Any = None,
                    groups: Any = None, progress: Any = None, studies: Any = None) -> Any:
        from sidecar.training.selfsup import TrainResult

        self.calls.append({"images": images, "recipe": recipe, "init_state": init_state,
                           "groups": groups, "studies": studies})
        if progress is not None:
            progress(1, 0.5)
        state = {k: v.clone() for k, v in self.target.state_dict().items()}
        return TrainResult(state, file_model_id(serialise_state_dict(self.target)), [0.5], 0.01)

    def library(self) -> TrainingLibrary:
        from sidecar.training import selfsup as training

        save = getattr(training, "save_weights", None) or _stand_in_save
        return TrainingLibrary(recipe_type=training.TrainRecipe, train_model=self.train_model,
                               save_weights=save, label_free_score=near_duplicate_score)


# ------------------------------------------------------------------ archive
@dataclass
class Site:
    config: Config
    config_path: Path
    studies: list[str]
    base_id: str


def _store_archive(cfg: Config) -> list[str]:
    engine, repo = open_catalogue(cfg)
    studies = []
    try:
        store = InstanceStore(cfg, repo)
        for s in range(SERIES):
            # the last two series are one study (two series of one examination)
            study, series = (studies[-1] if s == SERIES - 1 else generate_uid()), generate_uid()
            if s < SERIES - 1:
                studies.append(study)
            for i in range(SLICES):
                ds = make_ct(study_uid=study, series_uid=series, instance_number=i + 1,
                             seed=100 * s + i, patient_id=f"P{min(s, SERIES - 2)}")
                rng = np.random.default_rng(100 * s + i)
                hu = np.kron(rng.uniform(-150, 230, (8, 8)), np.ones((8, 8)))
                ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
                store.store(part10(ds), None, Origin("TEST", "127.0.0.1"))
        repo.mark_stable_studies(0.0)
    finally:
        engine.dispose()
    return studies


def make_site(config_factory: Callable[..., Config], base: SliceNetV1,
              extra: dict[str, Any] | None = None) -> Site:
    """The archive, with ``base`` recorded as the model in use (as if adapted earlier)."""
    overrides = json.loads(json.dumps(OVERRIDES))
    for key, value in (extra or {}).items():
        overrides.setdefault(key, {}).update(value)
    cfg = config_factory(overrides)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    studies = _store_archive(cfg)
    base_id = write_weights(cfg.data_dir / "models" / "base.pt", base)
    engine, _ = open_catalogue(cfg)
    try:
        record_adapted_model(VectorRepository(engine), ModelRecord(base_id, "models/base.pt"))
    finally:
        engine.dispose()
    return Site(cfg, cfg.data_dir.parent / "sidecar.yaml", studies, base_id)


@pytest.fixture
def opened() -> Iterator[Callable[[Config], Embedding]]:
    """Open Embedding parts (the configured/recorded model); all are closed afterwards."""
    parts: list[tuple[Embedding, Any]] = []

    def make(cfg: Config) -> Embedding:
        engine, _ = open_catalogue(cfg)
        emb = Embedding(cfg, engine)
        emb.open()
        parts.append((emb, engine))
        return emb

    yield make
    for emb, engine in parts:
        emb.close()
        engine.dispose()


def embed_all(emb: Embedding) -> None:
    while emb.run_job().series:
        pass


def cli(site: Site, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", str(site.config_path), *args])


# -------------------------------------------------------------------- tests
def test_held_out_split_keeps_studies_whole() -> None:
    groups = np.repeat(np.arange(8), 3)  # 8 series of 3 slices
    studies = np.repeat(np.array([0, 0, 0, 1, 2, 3, 4, 4]), 3)  # 5 studies
    for seed in range(20):
        train, held = adapt.split_by_series(groups, 0.4, seed, studies)
        assert (train ^ held).all() and train.any() and held.any()
        for st in range(5):
            side = set(held[studies == st].tolist())
            assert len(side) == 1, (seed, st)  # never on both sides
        assert len(np.unique(studies[held])) == 2  # 40 % of 5 studies
    # one study only, or no studies: whole series
    one = np.zeros_like(groups)
    for st in (one, None):
        train, held = adapt.split_by_series(groups, 0.25, 1, st)
        assert len(np.unique(groups[held])) == 2
        assert not set(groups[held].tolist()) & set(groups[train].tolist())


def test_schedule_is_off_by_default_and_validated(
    tmp_path: Path, config_factory: Callable[..., Config]
) -> None:
    cfg = Config()
    assert cfg.adaptation.enabled is False
    assert cfg.adaptation.schedule == "0 3 * * 0"
    for bad in ("61 3 * * *", "0 3 * *", "every sunday"):
        path = tmp_path / "bad.yaml"
        path.write_text(f"adaptation:\n  schedule: '{bad}'\n")
        with pytest.raises(ConfigError) as err:
            load_config(path, environ={})
        assert "adaptation.schedule" in str(err.value) and "crontab" in str(err.value)
    env = load_config(None, environ={"SIDECAR__ADAPTATION__SCHEDULE": "30 2 * * 1-5"})
    assert env.adaptation.schedule == "30 2 * * 1-5"

    off = Sidecar(config_factory({"worker": {"enabled": True}}))
    try:
        assert off.scheduler.get_job("adapt") is None
        assert off.scheduler.get_job("embed") is not None
    finally:
        off.stop()
    on = Sidecar(config_factory({"worker": {"enabled": True},
                                 "adaptation": {"enabled": True, "schedule": "15 4 * * 6"}}))
    try:
        job = on.scheduler.get_job("adapt")
        assert job is not None and job.max_instances == 1
        fields = {f.name: str(f) for f in job.trigger.fields}
        assert (fields["minute"], fields["hour"], fields["day_of_week"]) == ("15", "4", "6")
        assert str(job.trigger.timezone) == "UTC"
        assert job.func.func == on.adapt  # through jobs.GuardedJob
    finally:
        on.stop()


def test_scheduled_job_logs_failures_and_never_raises(
    config_factory: Callable[..., Config], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sidecar.embeddings.model import TinyEmbedder

    app = Sidecar(config_factory({"adaptation": {"enabled": True}}), embedder=TinyEmbedder())
    try:
        assert app.embedding is not None
        app.embedding.open()
        with caplog.at_level(logging.INFO):
            app.adapt()  # a test embedder is not the recorded weights: skipped, logged
        assert "skipped: the running model tiny-" in caplog.text

        def boom(**_: Any) -> Any:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(app.embedding, "adapt", boom)
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            app.adapt()
        assert "on-site adaptation failed" in caplog.text and "disk on fire" in caplog.text

        def busy(**_: Any) -> Any:
            raise adapt.AdaptationBusy("an adaptation run is already in progress")

        monkeypatch.setattr(app.embedding, "adapt", busy)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            app.adapt()
        assert "skipped: an adaptation run is already in progress" in caplog.text
    finally:
        app.stop()


def test_start_up_loads_the_recorded_adapted_model(
    config_factory: Callable[..., Config], opened: Callable[[Config], Embedding],
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = make_site(config_factory, proper_model(1))
    with caplog.at_level(logging.INFO, logger="sidecar.embeddings.registry"):
        emb = opened(site.config)
    assert emb.model.model_id == site.base_id
    assert "instead of the shipped weights" in caplog.text
    emb.close()
    # A TorchScript model in the configuration wins over the recorded model.
    from sidecar.embeddings.model import export_torchscript

    ts = site.config.data_dir / "other.ts"
    export_torchscript(proper_model(2), ts, input_size=SIZE)
    cfg = site.config.model_copy(update={"embedding": site.config.embedding.model_copy(
        update={"model_path": ts})})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidecar.embeddings.registry"):
        emb2 = opened(cfg)
    assert emb2.model.model_id != site.base_id
    assert "is not used" in caplog.text


def test_better_model_is_accepted_reembedded_in_background_then_swapped_and_restored(
    config_factory: Callable[..., Config], opened: Callable[[Config], Embedding],
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = make_site(config_factory, collapsed_model(1))
    emb = opened(site.config)
    embed_all(emb)
    assert emb.serving.model_id == site.base_id
    service = SearchService(site.config, emb.engine, emb, refresh_interval=0.0)
    ref = Reference(study_instance_uid=site.studies[0])
    assert service.search(ref, k=3).model_id == site.base_id
    query_ds = make_ct(seed=5)

    stand_in = StandIn(proper_model(7))
    with caplog.at_level(logging.INFO, logger="sidecar.training.adapt"):
        outcome = emb.adapt(library=stand_in.library())
    assert outcome.accepted, outcome.reason
    new_id = outcome.candidate_model_id
    assert new_id is not None and new_id != site.base_id
    # Fine-tuned from the current weights, on whole series, held-out series left out.
    call = stand_in.calls[0]
    assert call["images"].shape[1:] == (1, SIZE, SIZE)
    base_state = SliceNetV1(TINY)
    base_state.load_state_dict(collapsed_model(1).state_dict())
    assert all(torch.equal(call["init_state"][k], v) for k, v in base_state.state_dict().items())
    assert len(call["images"]) + outcome.holdout_slices == SERIES * SLICES
    assert outcome.series == SERIES and outcome.holdout_series in (2, 3)  # 2 of 5 studies
    assert call["recipe"].epochs == 1 and call["recipe"].input_size == SIZE
    # the parent's objective and augmentations, the adaptation's epochs, seed and budget
    recipe = call["recipe"]
    assert (recipe.temperature, recipe.padding, recipe.crop_scale) == (0.07, "border",
                                                                        (0.4, 1.0))
    assert recipe.seed == 3 and recipe.source_balance == 0.0
    assert recipe.max_seconds is not None and recipe.max_seconds != 5.0
    # every slice carries its study: one study per series, the two series of the
    # shared study under one number (positives from other series of the study)
    assert call["recipe"].study_prob == site.config.adaptation.study_positives == 0.25
    groups, studies = np.asarray(call["groups"]), np.asarray(call["studies"])
    assert groups.shape == studies.shape == (len(call["images"]),)
    pairs = set(zip(groups.tolist(), studies.tolist(), strict=True))
    assert len(pairs) == len(set(groups.tolist()))  # a series lies in one study
    assert len(set(groups.tolist())) + outcome.holdout_series == SERIES
    # whole studies on each side: a study in training has all its series there
    # (the shared study's two, or none of them)
    per_study = {st: {g for g, s2 in pairs if s2 == st} for st in set(studies.tolist())}
    shared = [st for st, members in per_study.items() if len(members) == 2]
    assert len(shared) == (1 if outcome.holdout_series == 2 else 0)
    assert outcome.candidate_score is not None and outcome.current_score is not None
    assert outcome.candidate_score >= outcome.current_score + 0.2
    assert "accepted" in caplog.text

    # Recorded: the weights file, the selection, the history with parent and scores.
    vectors = VectorRepository(emb.engine)
    weights = Path(str(outcome.weights_path))
    assert vectors.get_setting(ADAPTED_MODEL_KEY) == f"models/{weights.name}"
    assert (site.config.data_dir / str(vectors.get_setting(ADAPTED_MODEL_KEY))).is_file()
    record = {r.model_id: r for r in model_history(vectors)}[new_id]
    assert record.parent == site.base_id and record.slices == SERIES * SLICES
    assert record.scores["candidate"] == outcome.candidate_score
    manifest = json.loads(Path(str(outcome.weights_path)).with_suffix(".json").read_text())
    assert json.dumps(manifest).count(site.base_id) >= 1

    # Switched: the old index serves (queries, also by image) while the new one fills.
    assert emb.reembedding and emb.model.model_id == new_id
    assert emb.serving.model_id == site.base_id and emb.embedder.model_id == site.base_id
    assert vectors.get_setting(ACTIVE_MODEL_KEY) == site.base_id
    stats = emb.run_job()
    assert stats.series == 2 and emb.reembedding  # two series a run: not done
    assert service.search(ref, k=3).model_id == site.base_id
    assert service.search(Reference(datasets=(query_ds,)), k=3).model_id == site.base_id
    assert 0 < vectors.count_vectors()[new_id] < SERIES * SLICES
    embed_all(emb)
    assert not emb.reembedding and emb.serving is emb.index
    assert vectors.get_setting(ACTIVE_MODEL_KEY) == new_id
    assert service.search(ref, k=3).model_id == new_id
    assert service.search(Reference(datasets=(query_ds,)), k=3).model_id == new_id
    assert vectors.count_vectors() == {site.base_id: SERIES * SLICES, new_id: SERIES * SLICES}
    emb.close()

    listed = cli(site, "model", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["model_id"]: r for r in json.loads(listed.output)["models"]}
    assert rows[new_id]["active"] and rows[new_id]["selected"]
    assert rows[new_id]["parent"] == site.base_id and rows[new_id]["vectors"] == SERIES * SLICES
    assert not rows[site.base_id]["active"] and rows[site.base_id]["vectors"] == SERIES * SLICES
    text = cli(site, "model", "list")
    assert f"*>{new_id}" in text.output

    # Restore the previous model: its vectors cover the archive, so no CNN run.
    restored = cli(site, "model", "restore")
    assert restored.exit_code == 0, restored.output
    assert f"model {site.base_id}" in restored.output and "active model now" in restored.output
    back = opened(site.config)
    assert back.model.model_id == site.base_id and not back.reembedding
    stats = back.run_job()
    assert stats.slices_embedded == 0 and stats.series == 0
    assert len(back.serving.index) == SERIES * SLICES
    again = SearchService(site.config, back.engine, back, refresh_interval=0.0)
    assert again.search(ref, k=3).model_id == site.base_id
    # Forward again, by id, while a process holds the index: applied at the next start.
    running = cli(site, "model", "restore", new_id)
    assert running.exit_code == 0, running.output
    assert "restart it to apply" in running.output
    assert VectorRepository(back.engine).get_setting(ACTIVE_MODEL_KEY) == site.base_id
    back.close()
    forward = opened(site.config)
    assert forward.model.model_id == new_id and forward.reembedding  # a model change ...
    assert forward.run_job().slices_embedded == 0  # ... that needs no CNN run
    assert not forward.reembedding and forward.serving.model_id == new_id
    forward.close()
    # Unknown ids are refused with the known ones.
    unknown = cli(site, "model", "restore", "feedfacefeedface")
    assert unknown.exit_code == 1 and "unknown model" in unknown.output


def test_worse_candidate_is_rejected_and_logged(
    config_factory: Callable[..., Config], opened: Callable[[Config], Embedding],
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = make_site(config_factory, proper_model(1))
    emb = opened(site.config)
    embed_all(emb)
    vectors = VectorRepository(emb.engine)
    history = vectors.get_setting("embedding.model_history")
    with caplog.at_level(logging.INFO, logger="sidecar.training.adapt"):
        outcome = emb.adapt(library=StandIn(collapsed_model(9)).library())
    assert not outcome.accepted
    assert outcome.current_score is not None and outcome.candidate_score is not None
    assert outcome.candidate_score < outcome.current_score
    line = next(r for r in caplog.records if "rejected" in r.getMessage())
    assert line.levelno == logging.INFO
    assert f"{outcome.candidate_score:.4f}" in line.getMessage()
    assert f"{outcome.current_score:.4f}" in line.getMessage()
    # Nothing recorded, nothing saved, no switch.
    assert vectors.get_setting(ADAPTED_MODEL_KEY) == "models/base.pt"
    assert vectors.get_setting("embedding.model_history") == history
    assert sorted(p.name for p in (site.config.data_dir / "models").glob("*.pt")) == ["base.pt"]
    assert not emb.reembedding and emb.model.model_id == site.base_id


def test_runs_that_cannot_compare_record_nothing(
    config_factory: Callable[..., Config], opened: Callable[[Config], Embedding],
) -> None:
    site = make_site(config_factory, collapsed_model(1))
    emb = opened(site.config)
    lib = StandIn(proper_model(7)).library()
    # Nothing embedded yet: too few slices.
    outcome = emb.adapt(library=lib)
    assert not outcome.accepted and "too few" in outcome.reason
    embed_all(emb)
    # Cancelled (the service stops): nothing is trained or recorded.
    emb.cancel()
    outcome = emb.adapt(library=lib)
    assert not outcome.accepted and "cancelled" in outcome.reason
    # Interrupted while the weights are written: nothing is recorded.
    emb._cancel = threading.Event()

    def broken_save(*_args: Any, **_kwargs: Any) -> Path:
        raise KeyboardInterrupt

    from dataclasses import replace

    with pytest.raises(KeyboardInterrupt):
        emb.adapt(library=replace(lib, save_weights=broken_save))
    vectors = VectorRepository(emb.engine)
    assert vectors.get_setting(ADAPTED_MODEL_KEY) == "models/base.pt"
    assert [r.model_id for r in model_history(vectors)] == [site.base_id]
    # One run at a time.
    with adapt.adaptation_lock(site.config), pytest.raises(adapt.AdaptationBusy):
        emb.adapt(library=lib)
    # The time budget is kept: a training that outlives it is dropped.
    slow = site.config.model_copy(update={"adaptation": site.config.adaptation.model_copy(
        update={"time_budget_minutes": 0.02})})
    emb.config = slow

    def slow_train(images: Any, recipe: Any, *, progress: Any = None, **_: Any) -> Any:
        import time

        time.sleep(1.3)
        progress(1, 0.5)
        raise AssertionError("not reached")

    outcome = emb.adapt(library=replace(lib, train_model=slow_train))
    assert "time budget" in outcome.reason and not outcome.accepted


def test_cli_adapt_offline_reembeds_and_refuses_beside_a_running_service(
    config_factory: Callable[..., Config], opened: Callable[[Config], Embedding],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = make_site(config_factory, collapsed_model(1))
    emb = opened(site.config)
    embed_all(emb)
    stand_in = StandIn(proper_model(7))
    monkeypatch.setattr(adapt, "training_library", stand_in.library)
    busy = cli(site, "adapt")
    assert busy.exit_code == 1 and "in use by sidecar serve" in busy.output
    emb.close()

    result = cli(site, "adapt", "--json", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["accepted"] and data["current_model_id"] == site.base_id
    new_id = data["candidate_model_id"]
    engine, _ = open_catalogue(site.config)
    try:
        vectors = VectorRepository(engine)
        assert vectors.get_setting(ACTIVE_MODEL_KEY) == new_id  # re-embedded and swapped
        assert vectors.count_vectors()[new_id] == SERIES * SLICES
    finally:
        engine.dispose()


def test_real_training_library_end_to_end(
    config_factory: Callable[..., Config], opened: Callable[[Config], Embedding],
) -> None:
    from sidecar.training import selfsup as training

    if not all(hasattr(training, n) for n in ("save_weights", "label_free_score")):
        pytest.skip("the training library has no save_weights/label_free_score yet")
    site = make_site(config_factory, proper_model(1), {"adaptation": {"min_improvement": 0.0}})
    emb = opened(site.config)
    embed_all(emb)
    outcome = emb.adapt()
    assert outcome.current_score is not None and outcome.candidate_score is not None
    gain = outcome.candidate_score - outcome.current_score
    assert outcome.accepted == (gain >= 0.0), outcome.reason
    vectors = VectorRepository(emb.engine)
    if outcome.accepted:
        assert emb.reembedding and emb.model.model_id == outcome.candidate_model_id
        assert Path(str(outcome.weights_path)).with_suffix(".json").is_file()
        assert model_history(vectors)[-1].parent == site.base_id
    else:
        assert vectors.get_setting(ADAPTED_MODEL_KEY) == "models/base.pt"


def test_cli_adapt_from_npz_keeps_the_candidate_for_evaluation(
    config_factory: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sidecar.lab import evaluate

    cfg = config_factory(OVERRIDES)
    config_path = cfg.data_dir.parent / "sidecar.yaml"
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (60, 7, 7)).astype(np.uint8)
    images = np.kron(blocks, np.ones((1, 4, 4), dtype=np.uint8))  # 60 distinct 28 x 28 images
    npz = tmp_path / "set.npz"
    np.savez(npz, train_images=images[:40], train_labels=np.arange(40) % 2,
             test_images=images[40:], test_labels=np.arange(20) % 2)
    start = tmp_path / "start.pt"
    start_id = write_weights(start, collapsed_model(1))
    stand_in = StandIn(proper_model(7))
    monkeypatch.setattr(adapt, "training_library", stand_in.library)
    out = tmp_path / "out"
    runner = CliRunner()
    usage = runner.invoke(main, ["--config", str(config_path), "adapt", "--from-npz", str(npz)])
    assert usage.exit_code == 2 and "--out" in usage.output
    result = runner.invoke(main, ["--config", str(config_path), "adapt", "--from-npz", str(npz),
                                  "--out", str(out), "--model", str(start), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["current_model_id"] == start_id and data["accepted"]
    assert data["slices"] == 40 and data["holdout_slices"] == round(0.34 * 40)
    call = stand_in.calls[0]
    assert call["groups"] is None  # independent images: no series positives
    assert call["images"].shape == (40 - data["holdout_slices"], 1, SIZE, SIZE)
    weights = Path(data["weights_path"])
    assert weights.parent == out and weights.with_suffix(".json").is_file()
    loaded = evaluate.load_model(cfg, weights)
    assert loaded.model_id == data["candidate_model_id"]
    assert not (cfg.data_dir / "models").exists()  # the archive is not touched
    # A rejected candidate is kept too (for evaluation), and says so.
    good = tmp_path / "good.pt"
    write_weights(good, proper_model(1))
    monkeypatch.setattr(adapt, "training_library", StandIn(collapsed_model(9)).library)
    result = runner.invoke(main, ["--config", str(config_path), "adapt", "--from-npz", str(npz),
                                  "--out", str(out), "--model", str(good)])
    assert result.exit_code == 0, result.output
    assert "rejected" in result.stdout and "adapt: weights" in result.stdout
    assert len(list(out.glob("*.pt"))) == 2
