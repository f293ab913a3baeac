"""Self-supervised training (``sidecar.training.selfsup``, ``sidecar train``).

Tiny recipes on synthetic images (a few seconds each): the loss falls, a seed
gives the same weights twice, saved weights load back with their model id,
the label-free score tells a trained model from a random one, DICOM series
become groups, and the CLI reads only the train split of an ``.npz`` (the
val and test arrays of the test file cannot be read at all).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydicom.uid import generate_uid

from sidecar.cli.main import main
from sidecar.config import Config
from sidecar.embeddings.model import TorchEmbedder, load_weights
from sidecar.embeddings.network import SliceNetV1, SliceNetV1Params
from sidecar.files import sha256_file
from sidecar.lab import evaluate as ev
from sidecar.training import selfsup as tr
from sidecar.training.augment import augment
from sidecar.training.contrastive import (
    negative_exclusions,
    pick_partners,
    series_neighbours,
    study_others,
)
from sidecar.training.data import load_training_data
from tests.conftest import make_ct, part10

SIZE = 32
TINY = SliceNetV1Params(stem_width=8, widths=(16, 32), depths=(1, 1), separable=(False, True),
                        dim=16)


def tiny_recipe(**override: Any) -> tr.TrainRecipe:
    base: dict[str, Any] = {
        "epochs": 8, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 1, "seed": 0,
        "input_size": SIZE, "threads": 1, "hparams": TINY.to_json(),
        "projection_hidden": 32, "projection_dim": 16, "blur_sigma": (0.3, 1.0),
    }
    base.update(override)
    return tr.TrainRecipe.from_dict(base)


def synthetic(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """Structured images: a few bright discs and bars of random place, size and level
    on a smooth background, (n, 1, size, size) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        img = 0.15 + 0.1 * (rng.uniform() * xx + rng.uniform() * yy)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, rng.uniform(0.5, 1.0), img)
        if rng.uniform() < 0.5:
            a = int(rng.integers(2, size - 8))
            img[a:a + int(rng.integers(2, 6)), :] = rng.uniform(0.6, 1.0)
        out[i, 0] = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return out


@pytest.fixture(scope="module")
def trained() -> tuple[tr.TrainRecipe, tr.TrainResult]:
    recipe = tiny_recipe()
    return recipe, tr.train_model(synthetic(96, seed=1), recipe)


def embedder(result: tr.TrainResult | None, model_id: str = "m") -> TorchEmbedder:
    if result is None:
        net = SliceNetV1(TINY)
        net.reset_parameters(torch.Generator().manual_seed(0))
    else:
        net = result.model(TINY)
    return TorchEmbedder(net, model_id=model_id, input_size=SIZE)


# ------------------------------------------------------------------ recipe
def test_recipe_round_trip_and_validation() -> None:
    recipe = tiny_recipe(crop_scale=(0.5, 0.9))
    data = json.loads(json.dumps(recipe.to_dict()))
    assert tr.TrainRecipe.from_dict(data) == recipe
    assert tr.TrainRecipe.from_dict({}) == tr.TrainRecipe()
    with pytest.raises(ValueError, match="unknown recipe keys"):
        tr.TrainRecipe.from_dict({"epochs": 1, "learning_rate": 1})
    with pytest.raises(ValueError, match="crop_scale"):
        tr.TrainRecipe.from_dict({"crop_scale": [0.9, 0.5]})


def test_augment_keeps_shape_and_range_and_is_seeded() -> None:
    x = torch.from_numpy(synthetic(8, seed=2))
    recipe = tiny_recipe()
    a = augment(x, recipe, torch.Generator().manual_seed(5))
    b = augment(x, recipe, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


# ----------------------------------------------------------------- training
def test_training_reduces_the_loss(trained: tuple[tr.TrainRecipe, tr.TrainResult]) -> None:
    recipe, result = trained
    assert len(result.history) == recipe.epochs
    assert np.isfinite(result.history).all()
    assert np.mean(result.history[-2:]) < result.history[0] - 0.3
    assert result.seconds > 0 and len(result.model_id) == 16
    assert set(result.state_dict) == set(SliceNetV1(TINY).state_dict())  # no projector


def test_same_seed_same_weights_other_seed_others() -> None:
    images = synthetic(48, seed=3)
    recipe = tiny_recipe(epochs=2)
    first = tr.train_model(images, recipe)
    again = tr.train_model(images, recipe)
    assert first.model_id == again.model_id
    for key, value in first.state_dict.items():
        assert torch.equal(value, again.state_dict[key]), key
    other = tr.train_model(images, tiny_recipe(epochs=2, seed=1))
    assert other.model_id != first.model_id


def test_groups_give_neighbour_positives_and_init_state_is_used() -> None:
    images = synthetic(40, seed=4)
    groups = np.repeat(np.arange(4), 10)
    recipe = tiny_recipe(epochs=1, neighbour_prob=1.0)
    seen: list[tuple[int, float]] = []
    result = tr.train_model(images, recipe, groups=groups,
                            progress=lambda e, loss: seen.append((e, loss)))
    assert [e for e, _ in seen] == [1] and np.isfinite(seen[0][1])
    # starting from given weights with lr ~ 0 keeps them (the BatchNorm statistics move)
    start = tr.train_model(images, tiny_recipe(epochs=1, lr=1e-12, warmup_epochs=0),
                           init_state=result.state_dict)
    for key, value in result.state_dict.items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(start.state_dict[key], value, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        tr.train_model(images, recipe, groups=np.zeros(3))
    with pytest.raises(ValueError, match="init_state"):
        tr.train_model(images, recipe, init_state={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        tr.train_model(np.zeros((4, 1, 8, 8), np.float32), recipe)


def test_study_positives_come_from_other_series_of_the_study() -> None:
    # study 0: series 0 (images 0-4) and series 1 (5-9); study 1: series 2 only (10-14);
    # images 15-17 have neither
    groups = np.array([0] * 5 + [1] * 5 + [2] * 5 + [-1] * 3)
    studies = np.array([0] * 10 + [1] * 5 + [-1] * 3)
    series = series_neighbours(groups)
    others = study_others(groups, studies)
    assert others[0].tolist() == [5, 6, 7, 8, 9] and others[7].tolist() == [0, 1, 2, 3, 4]
    assert all(others[i].size == 0 for i in range(10, 18))
    idx = np.arange(18)
    always = tiny_recipe(study_prob=1.0, neighbour_prob=0.0)
    partner = pick_partners(idx, series, others, always, np.random.default_rng(0))
    assert all((groups[partner[i]] == 1) for i in range(5))  # series 0 -> series 1
    assert all((groups[partner[i]] == 0) for i in range(5, 10))
    assert partner[10:].tolist() == list(range(10, 18))  # no other series: itself
    mixed = tiny_recipe(study_prob=0.5, neighbour_prob=1.0, neighbour_span=1)
    draws = np.stack([pick_partners(idx[:10], series, others, mixed,
                                       np.random.default_rng(k)) for k in range(200)])
    other_series = (groups[draws] != groups[:10]).mean()
    assert 0.4 < other_series < 0.6  # about study_prob of the time
    for k in range(10):  # otherwise a neighbour within one position, never farther
        col = draws[:, k][groups[draws[:, k]] == groups[k]]
        assert np.abs(col - k).max() <= 1
    # study_prob 0: the same partners and random draws as data without studies
    never = tiny_recipe(study_prob=0.0, neighbour_prob=0.5)
    none = [np.zeros(0, np.intp)] * 18
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert pick_partners(idx, series, others, never, rng_a).tolist() == \
        pick_partners(idx, series, none, never, rng_b).tolist()
    assert rng_a.random() == rng_b.random()

    # negatives: with studies, a slice of the other series of the study is no negative
    batch = np.array([0, 6, 11, 15])
    by_series = negative_exclusions(batch, groups, None, repeated=False)
    by_study = negative_exclusions(batch, groups, studies, repeated=False)
    assert by_series is not None and by_study is not None
    assert not by_series[0, 2] and by_study[0, 2]  # views of images 0 and 6
    assert not by_study[0, 4] and not by_study[4, 6]  # other study, no study
    drawn_twice = negative_exclusions(np.array([15, 15, 16]), groups, studies,
                                         repeated=True)
    assert drawn_twice is not None and drawn_twice[0, 3] and not drawn_twice[0, 4]
    assert negative_exclusions(np.array([15, 16]), np.full(18, -1), None,
                                  repeated=False) is None

    images = synthetic(18, seed=6)
    result = tr.train_model(images, tiny_recipe(epochs=1, batch_size=8, study_prob=0.5),
                            groups=groups, studies=studies)
    assert np.isfinite(result.history).all()
    with pytest.raises(ValueError, match="studies"):
        tr.train_model(images, always, groups=groups, studies=np.zeros(3))
    with pytest.raises(ValueError, match="study_prob"):
        tiny_recipe(study_prob=1.5)


# -------------------------------------------------------------- save, load
def test_save_weights_load_round_trip(
    tmp_path: Path, trained: tuple[tr.TrainRecipe, tr.TrainResult]
) -> None:
    recipe, result = trained
    manifest = {"inputs": [{"kind": "synthetic", "sha256": "0" * 64}], "images": 96}
    path = tr.save_weights(tmp_path, result, recipe, manifest)
    assert path.suffix == ".pt" and path.with_suffix(".json").is_file()
    net, info = load_weights(path)
    assert info.model_id == result.model_id and info.trained is True
    assert info.input_size == SIZE and info.hparams == TINY
    desc = info.description
    assert desc["training"]["recipe"] == recipe.to_dict()
    assert desc["training"]["data"] == manifest
    assert desc["training"]["seed"] == 0 and desc["training"]["labels_used"] is False
    assert desc["torch_version"] == torch.__version__ and desc["training"]["seconds"] > 0
    # the evaluation harness loads it too, with the same id and vectors
    cfg = Config.model_validate({"embedding": {"input_size": SIZE, "threads": 1}})
    loaded = ev.load_model(cfg, path)
    assert loaded.model_id == result.model_id
    batch = synthetic(5, seed=9)[:, 0]
    np.testing.assert_allclose(loaded.embed(batch), embedder(result).embed(batch), atol=1e-6)
    # saving again (another name) gives the same bytes and id
    again = tr.save_weights(tmp_path / "copy.pt", result, recipe, manifest)
    assert again.read_bytes() == path.read_bytes()


# --------------------------------------------------------- label-free score
def test_label_free_score_prefers_the_trained_model(
    trained: tuple[tr.TrainRecipe, tr.TrainResult]
) -> None:
    _, result = trained
    held_out = synthetic(64, seed=77)
    good = tr.label_free_report(embedder(result), held_out, seed=0)
    bad = tr.label_free_report(embedder(None), held_out, seed=0)
    assert 0.0 <= bad["score"] < good["score"] <= 1.0
    assert good["uniformity"] < bad["uniformity"]
    assert tr.label_free_score(embedder(result), held_out, seed=0) == good["score"]
    with pytest.raises(ValueError):
        tr.label_free_score(embedder(result), held_out[:1], seed=0)


# ------------------------------------------------------------------- data
def test_dicom_series_become_groups_in_slice_order(tmp_path: Path) -> None:
    study, other_study = generate_uid(), generate_uid()
    for s in range(3):
        series = generate_uid()
        for k in (3, 1, 2):  # written out of order
            ds = make_ct(study_uid=study if s < 2 else other_study, series_uid=series,
                         instance_number=k, seed=10 * s + k)
            (tmp_path / f"s{s}_{k}.dcm").write_bytes(part10(ds))
    (tmp_path / "notes.txt").write_text("not DICOM")
    data = load_training_data([tmp_path], Config(), SIZE)
    assert data.images.shape == (9, 1, SIZE, SIZE)
    assert sorted(np.unique(data.groups).tolist()) == [0, 1, 2]
    assert (np.bincount(data.groups) == 3).all()
    # two series of one study share a study number, the third series has another
    assert sorted(np.bincount(data.studies).tolist()) == [3, 6]
    for g in range(3):
        assert len(np.unique(data.studies[data.groups == g])) == 1
    files = [e for e in data.manifest["inputs"] if e.get("kind") == "dicom"]
    assert len(files) == 9 and all(len(e["sha256"]) == 64 for e in files)
    folders = [e for e in data.manifest["inputs"] if e.get("kind") == "dicom-folders"]
    assert folders[0]["series"] == 3 and folders[0]["studies"] == 2
    # within a series, the slices come in slice order (positions 1, 2, 3)
    for g in (0, 1, 2):
        names = [Path(e["path"]).name for e in files if e["series"] == g]
        assert sorted(names) == names or len(set(names)) == 3


def _poisoned_npz(path: Path, n: int = 24) -> Path:
    """An .npz whose train split is fine and whose val/test arrays cannot be read:
    object arrays refuse to load with allow_pickle=False."""
    rng = np.random.default_rng(0)
    poison = np.empty(2, dtype=object)
    np.savez(path, train_images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
             train_labels=poison, val_images=poison, val_labels=poison,
             test_images=poison, test_labels=poison)
    with np.load(path, allow_pickle=False) as npz, pytest.raises(ValueError):
        npz["test_images"]
    return path


def test_cli_train_reads_only_the_train_split(
    tmp_path: Path, cli_isolation: None
) -> None:
    npz = _poisoned_npz(tmp_path / "tiny.npz")
    recipe = tiny_recipe(epochs=2, batch_size=8).to_dict()
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    out = tmp_path / "weights"
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--data", str(npz), "--out", str(out),
                               "--recipe", str(tmp_path / "recipe.json"), "--seed", "3",
                               "--epochs", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    pts = list(out.glob("*.pt"))
    assert len(pts) == 1 and "model id" in res.stdout
    _, info = load_weights(pts[0])
    training = info.description["training"]
    assert training["recipe"]["seed"] == 3 and training["recipe"]["epochs"] == 1
    (entry,) = training["data"]["inputs"]
    assert entry["arrays_read"] == ["train_images"] and entry["images"] == 24
    assert entry["sha256"] == sha256_file(npz)
    assert training["data"]["splits_read"] == ["train"] and training["labels_used"] is False
    bad = runner.invoke(main, ["train", "--data", str(npz), "--out", str(out),
                               "--recipe", str(tmp_path / "recipe.json"), "--epochs", "1",
                               "--init", str(pts[0])], catch_exceptions=False)
    assert bad.exit_code == 0, bad.output
    # the JSON beside trained weights is a recipe: the same run, the same bytes
    again = runner.invoke(main, ["train", "--data", str(npz), "--out", str(tmp_path / "again"),
                                 "--recipe", str(pts[0].with_suffix(".json"))],
                          catch_exceptions=False)
    assert again.exit_code == 0, again.output
    (twin,) = (tmp_path / "again").glob("*.pt")
    assert twin.read_bytes() == pts[0].read_bytes()
    (tmp_path / "bad.json").write_text(json.dumps({"lr": -1}))
    err = runner.invoke(main, ["train", "--data", str(npz), "--out", str(out),
                               "--recipe", str(tmp_path / "bad.json")])
    assert err.exit_code == 1 and "bad recipe" in err.output
