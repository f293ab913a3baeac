"""The CNN embedder: shipped weights, model ids, TorchScript replacement, TinyEmbedder."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.config import EmbeddingConfig
from sidecar.embeddings import model as model_mod
from sidecar.embeddings.model import (
    Embedder,
    ModelError,
    TinyEmbedder,
    TorchEmbedder,
    export_torchscript,
    load_embedder,
    load_weights,
)
from sidecar.embeddings.network import (
    BUILTIN_WEIGHTS,
    SliceNetV1,
    SliceNetV1Params,
    builtin_weights_path,
)
from sidecar.errors import SidecarError

REPO = Path(__file__).resolve().parent.parent
PACKAGE_WEIGHTS = REPO / "sidecar" / "embeddings" / "weights"
SIZE = 128


def _hash16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _slices(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Smooth structured test slices: a bright disc on a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        radius = rng.uniform(0.1, 0.3)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2
        out[i] = 0.2 + 0.6 * disc + 0.1 * np.sin(xx * rng.uniform(5, 30))
    return out


@pytest.fixture(scope="module")
def builtin() -> TorchEmbedder:
    return TorchEmbedder.from_config(EmbeddingConfig())


# ------------------------------------------------------------ built-in embedder
def test_output_shape_dtype_and_unit_norm(builtin: TorchEmbedder) -> None:
    assert isinstance(builtin, Embedder)
    assert builtin.input_size == SIZE
    assert builtin.dim == 128
    vectors = builtin.embed(_slices(5))
    assert vectors.shape == (5, 128)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # uniform slices (all black, all white) still give unit vectors
    flat = builtin.embed(np.stack([np.zeros((SIZE, SIZE)), np.ones((SIZE, SIZE))]))
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, atol=1e-5)


def test_empty_batch(builtin: TorchEmbedder) -> None:
    out = builtin.embed(np.zeros((0, SIZE, SIZE), dtype=np.float32))
    assert out.shape == (0, builtin.dim)
    assert out.dtype == np.float32


def test_bad_batches_are_refused(builtin: TorchEmbedder) -> None:
    with pytest.raises(ValueError, match="shape"):
        builtin.embed(np.zeros((2, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        builtin.embed(np.zeros((SIZE, SIZE), dtype=np.float32))
    bad = _slices(2)
    bad[1, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        builtin.embed(bad)


def test_three_channel_network_takes_rgb_batches_only() -> None:
    net = SliceNetV1(SliceNetV1Params(in_channels=3, stem_width=8, widths=(8, 16), depths=(1, 1),
                                      separable=(False, False), dim=16))
    rgb = TorchEmbedder(net, model_id="rgb", input_size=32, channels=3)
    assert rgb.channels == 3
    out = rgb.embed(np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32))
    assert out.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        rgb.embed(np.zeros((2, 3, 16, 16), dtype=np.float32))
    grey = np.random.default_rng(1).random((2, 32, 32), dtype=np.float32)  # replicated
    np.testing.assert_allclose(rgb.embed(grey), rgb.embed(np.repeat(grey[:, None], 3, axis=1)),
                               atol=1e-6)
    # A network made for grey input fails its dry run when told it gets three channels.
    with pytest.raises(ModelError, match="2 x 3 x 32 x 32"):
        TorchEmbedder(SliceNetV1(SliceNetV1Params()), model_id="g", input_size=32, channels=3)


def test_large_batches_match_one_at_a_time() -> None:
    embedder = TorchEmbedder.from_config(EmbeddingConfig(batch_size=4))
    batch = _slices(11)
    together = embedder.embed(batch)
    single = np.concatenate([embedder.embed(batch[i : i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(together, single, atol=1e-5)


def test_deterministic_across_calls_and_loads(builtin: TorchEmbedder) -> None:
    batch = _slices(6, seed=3)
    first = builtin.embed(batch)
    np.testing.assert_array_equal(first, builtin.embed(batch))
    again = load_embedder(EmbeddingConfig())
    assert again.model_id == builtin.model_id
    np.testing.assert_allclose(again.embed(batch), first, atol=1e-6)


def test_threads_come_from_config() -> None:
    import torch

    TorchEmbedder.from_config(EmbeddingConfig(threads=1))
    assert torch.get_num_threads() == 1


def test_model_id_is_hash_of_shipped_file(builtin: TorchEmbedder) -> None:
    path = builtin_weights_path()
    assert path == PACKAGE_WEIGHTS / BUILTIN_WEIGHTS
    assert path.is_file() and path.stat().st_size < 2 * 2**20
    assert builtin.model_id == _hash16(path)
    assert len(builtin.model_id) == 16


def test_other_input_size_gets_its_own_model_id() -> None:
    embedder = TorchEmbedder.from_config(EmbeddingConfig(input_size=64))
    assert embedder.model_id == f"{_hash16(builtin_weights_path())}-s64"
    out = embedder.embed(_slices(3, size=64))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.hub

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network or hub access while loading the model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("load", "load_state_dict_from_url", "download_url_to_file"):
        monkeypatch.setattr(torch.hub, name, refuse)
    embedder = load_embedder(EmbeddingConfig())
    assert embedder.embed(_slices(1)).shape == (1, embedder.dim)


def test_weights_json_documents_how_the_shipped_model_was_trained() -> None:
    desc = json.loads(builtin_weights_path().with_suffix(".json").read_text())
    assert desc["trained"] is True
    assert desc["architecture"] == "SliceNetV1"
    assert desc["input_size"] == SIZE
    assert desc["dim"] == 128
    assert "sidecar train" in desc["made_by"]
    assert desc["weights_file"] == BUILTIN_WEIGHTS
    assert desc["model_id"] == _hash16(builtin_weights_path())
    training = desc["training"]
    assert training["labels_used"] is False
    recipe = training["recipe"]
    assert recipe["seed"] == desc["seed"] and recipe["hparams"] == desc["hparams"]
    # the data manifest: every input with its SHA-256; of the .npz only train_images
    inputs = training["data"]["inputs"]
    npz = [i for i in inputs if i["kind"] == "npz"]
    assert {i["name"] for i in npz} == {"breastmnist.npz", "pneumoniamnist.npz"}
    assert all(i["arrays_read"] == ["train_images"] for i in npz)
    assert all(len(i["sha256"]) == 64 for i in inputs if "sha256" in i)
    assert len(training["loss_history"]) == recipe["epochs"]
    model, info = load_weights()
    assert info.trained is True
    assert desc["parameters"] == model.parameter_count()


def test_regenerating_random_weights_gives_same_files(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "sidecar.training.make_initial_weights"]
    made = []
    for out in (tmp_path / "a", tmp_path / "b"):
        proc = subprocess.run([*cmd, "--out-dir", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        made.append(out / "slicenet-v1-initial-random-seed0.pt")
    assert made[0].read_bytes() == made[1].read_bytes()
    assert made[0].with_suffix(".json").read_text() == made[1].with_suffix(".json").read_text()
    model, info = load_weights(made[0])
    assert info.trained is False and info.model_id == _hash16(made[0])
    desc = json.loads(made[0].with_suffix(".json").read_text())
    assert "NOT TRAINED" in desc["status"] and desc["parameters"] == model.parameter_count()


def test_corrupt_or_mismatched_weights_raise_model_error(tmp_path: Path) -> None:
    pt = tmp_path / BUILTIN_WEIGHTS
    shutil.copy(builtin_weights_path(), pt)
    shutil.copy(builtin_weights_path().with_suffix(".json"), pt.with_suffix(".json"))
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256") as err:
        load_weights(pt)
    assert str(pt) in str(err.value)
    assert isinstance(err.value, SidecarError)
    pt.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="not found") as err:
        load_weights(pt)
    assert str(pt.with_suffix(".json")) in str(err.value)
    with pytest.raises(ModelError, match="not found"):
        load_weights(tmp_path / "absent.pt")


# ------------------------------------------------------------ TorchScript
# torch 2.13 marks torch.jit deprecated; the configuration's model_path is TorchScript.
jit_deprecated = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

def test_torchscript_replacement_matches_builtin(tmp_path: Path, builtin: TorchEmbedder) -> None:
    model, info = load_weights()
    path = tmp_path / "slicenet.ts"
    new_id = export_torchscript(model, path, input_size=SIZE, source_model_id=info.model_id)
    embedder = load_embedder(EmbeddingConfig(model_path=path, batch_size=8))
    # the id names the file, so an export is a new model id with the same outputs
    assert embedder.model_id == new_id == _hash16(path)
    assert embedder.model_id != builtin.model_id
    assert embedder.dim == builtin.dim
    batch = _slices(10, seed=7)
    np.testing.assert_allclose(embedder.embed(batch), builtin.embed(batch), atol=1e-5)
    _, _, meta = model_mod.load_torchscript(path)
    assert meta["source_model_id"] == builtin.model_id
    assert meta["input_size"] == SIZE


@jit_deprecated
def test_torchscript_dim_is_found_by_dry_run(tmp_path: Path) -> None:
    import torch

    small = SliceNetV1(SliceNetV1Params(stem_width=8, widths=(8, 16), depths=(1, 1),
                                        separable=(False, True), dim=24))
    small.reset_parameters(torch.Generator().manual_seed(1))
    path = tmp_path / "small.ts"
    export_torchscript(small, path, input_size=32)
    embedder = load_embedder(EmbeddingConfig(model_path=path, input_size=32))
    assert embedder.dim == 24
    assert embedder.model_id == _hash16(path)
    out = embedder.embed(_slices(3, size=32))
    assert out.shape == (3, 24)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # a TorchScript file without our metadata: the id carries the input size
    plain = tmp_path / "plain.ts"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(small.eval(), torch.rand(2, 1, 32, 32)), str(plain))
    other = load_embedder(EmbeddingConfig(model_path=plain, input_size=32))
    assert other.model_id == f"{_hash16(plain)}-s32"
    assert other.dim == 24


def test_bad_torchscript_files_raise_model_error_naming_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ts"
    corrupt.write_bytes(b"PK\x03\x04 this is not a model")
    with pytest.raises(ModelError, match="not a readable TorchScript file") as err:
        load_embedder(EmbeddingConfig(model_path=corrupt))
    assert str(corrupt) in str(err.value)
    missing = tmp_path / "missing.ts"
    with pytest.raises(ModelError, match="not found") as err:
        load_embedder(EmbeddingConfig(model_path=missing))
    assert str(missing) in str(err.value)
    # a state_dict is not TorchScript
    with pytest.raises(ModelError, match="TorchScript"):
        load_embedder(EmbeddingConfig(model_path=builtin_weights_path()))


@jit_deprecated
def test_torchscript_with_wrong_output_raises_model_error(tmp_path: Path) -> None:
    import torch

    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))[:, 0]  # (N,) instead of (N, D)

    path = tmp_path / "flat.ts"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(Flat(), torch.rand(2, 1, 16, 16)), str(path))
    with pytest.raises(ModelError, match=r"expected \(2, D\)") as err:
        load_embedder(EmbeddingConfig(model_path=path, input_size=16))
    assert str(path) in str(err.value)


# ------------------------------------------------------------ TinyEmbedder
def test_tiny_embedder_is_deterministic_and_unit_norm() -> None:
    tiny = TinyEmbedder(input_size=64)
    assert isinstance(tiny, Embedder)
    assert tiny.model_id.startswith("tiny-")
    batch = _slices(4, size=64)
    first = tiny.embed(batch)
    assert first.shape == (4, tiny.dim) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, TinyEmbedder(input_size=64).embed(batch))
    assert tiny.embed(np.zeros((0, 64, 64), dtype=np.float32)).shape == (0, tiny.dim)
    assert TinyEmbedder(input_size=64, seed=1).model_id != tiny.model_id


def test_tiny_embedder_ranks_noisy_copy_above_unrelated() -> None:
    tiny = TinyEmbedder(input_size=60)  # not a multiple of the 8 x 8 grid
    images = _slices(8, size=60, seed=11)
    rng = np.random.default_rng(5)
    noisy = np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1)
    a, b = tiny.embed(images), tiny.embed(noisy)
    same = np.sum(a * b, axis=1)
    cross = a @ a.T
    for i in range(len(images)):
        unrelated = np.delete(cross[i], i)
        assert same[i] > unrelated.max()
