"""ONNX site models: ``embedding.model_path`` naming a ``.onnx`` file with its JSON contract.

Real torch models are exported with torch's exporter (``export_onnx``, the
``onnx-export`` extra) and run by onnxruntime; their vectors are compared with
the torch module's on the same batch. Graphs that no sane exporter writes (a
4-D output, NaN output, two inputs) are built with ``onnx.helper``. The worker
test runs the real commands: ``sidecar ingest``, ``embed``, ``status``,
``search`` with the ONNX model configured.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper
from pydicom.uid import generate_uid

from sidecar.cli.main import main
from sidecar.config import Config, EmbeddingConfig
from sidecar.embeddings.model import (
    Embedder,
    ModelError,
    TorchEmbedder,
    export_torchscript,
    load_embedder,
    load_weights,
)
from sidecar.embeddings.network import SliceNetV1, SliceNetV1Params, serialise_state_dict
from sidecar.embeddings.onnx_export import export_onnx
from sidecar.embeddings.onnx_model import OnnxContract, OnnxEmbedder, contract_path, load_onnx
from sidecar.embeddings.registry import weights_embedder
from tests.conftest import part10
from tests.test_worker import ct_series

SIZE = 32
DIM = 24
jit_deprecated = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")


def _hash16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _net(channels: int = 1, seed: int = 1) -> SliceNetV1:
    net = SliceNetV1(SliceNetV1Params(in_channels=channels, stem_width=8, widths=(8, 16),
                                      depths=(1, 1), separable=(False, True), dim=DIM))
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net.eval()


def _unit_torch(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _pixels(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SliceNetV1]:
    """A small SliceNetV1 exported to ONNX with its contract (1 channel, 32 px, dim 24)."""
    net = _net()
    path = tmp_path_factory.mktemp("grey") / "small.onnx"
    export_onnx(net, path, OnnxContract(SIZE, 1, DIM, name="small", licence="Apache-2.0"))
    return path, net


class PooledProjection(torch.nn.Module):
    """4 x 4 average pooling, centred, then a seeded random projection to DIM: unlike a
    random CNN it tells slices apart by their pixels (the worker test needs that)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.proj = torch.nn.Parameter(torch.randn((SIZE // 4) ** 2, DIM, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
        return (pooled - pooled.mean(dim=1, keepdim=True)) @ self.proj


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SliceNetV1]:
    net = _net(channels=3, seed=2)
    path = tmp_path_factory.mktemp("rgb") / "rgb.onnx"
    export_onnx(net, path, OnnxContract(SIZE, 3, DIM))
    return path, net


# ------------------------------------------------------- loading and vectors
def test_onnx_vectors_equal_the_torch_models(grey_model: tuple[Path, SliceNetV1]) -> None:
    path, net = grey_model
    embedder = load_embedder(EmbeddingConfig(model_path=path, input_size=SIZE, batch_size=4))
    assert isinstance(embedder, OnnxEmbedder) and isinstance(embedder, Embedder)
    assert (embedder.channels, embedder.input_size, embedder.dim) == (1, SIZE, DIM)
    # the graph fixes the input shape, no normalisation: the id is the file's hash
    assert embedder.model_id == _hash16(path)
    batch = _pixels(11, SIZE, SIZE)  # 11: chunks of 4, the last one short
    out = embedder.embed(batch)
    assert out.shape == (11, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(out, _unit_torch(net, batch[:, None]), atol=1e-5)
    torch_embedder = TorchEmbedder(net, model_id="t", input_size=SIZE)
    np.testing.assert_allclose(out, torch_embedder.embed(batch), atol=1e-5)
    assert embedder.embed(np.zeros((0, SIZE, SIZE), np.float32)).shape == (0, DIM)
    with pytest.raises(ValueError, match=r"\(N, 32, 32\)"):
        embedder.embed(_pixels(2, 3, SIZE, SIZE))  # a grey model takes no colour batch
    contract = json.loads(contract_path(path).read_text())
    assert contract["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (contract["name"], contract["licence"]) == ("small", "Apache-2.0")


def test_three_channel_model_takes_rgb_and_replicated_grey(
    rgb_model: tuple[Path, SliceNetV1],
) -> None:
    path, net = rgb_model
    embedder = load_embedder(EmbeddingConfig(model_path=path, input_size=SIZE))
    assert embedder.channels == 3
    rgb = _pixels(5, 3, SIZE, SIZE, seed=3)
    np.testing.assert_allclose(embedder.embed(rgb), _unit_torch(net, rgb), atol=1e-5)
    grey = _pixels(4, SIZE, SIZE, seed=4)
    replicated = np.repeat(grey[:, None], 3, axis=1)
    np.testing.assert_allclose(embedder.embed(grey), _unit_torch(net, replicated), atol=1e-5)
    # the torch embedder of the same 3-channel weights takes the same batches
    torch_embedder = TorchEmbedder(net, model_id="t", input_size=SIZE, channels=3)
    assert torch_embedder.channels == 3
    np.testing.assert_allclose(torch_embedder.embed(rgb), embedder.embed(rgb), atol=1e-5)
    with pytest.raises(ValueError, match=r"or \(N, 3, 32, 32\)"):
        embedder.embed(_pixels(2, 4, SIZE, SIZE))


def test_slicenet_weights_give_their_channels(tmp_path: Path) -> None:
    assert TorchEmbedder.from_config(EmbeddingConfig()).channels == 3  # the shipped model v2
    # SliceNetV1 weights with in_channels 3 (as adapted weights are loaded) take RGB
    net = _net(channels=3)
    pt = tmp_path / "rgb.pt"
    data = serialise_state_dict(net)
    pt.write_bytes(data)
    desc = dict(load_weights()[1].description)
    desc.update(hparams=net.hparams.to_json(), input_size=SIZE,
                weights_sha256=hashlib.sha256(data).hexdigest())
    pt.with_suffix(".json").write_text(json.dumps(desc))
    embedder = weights_embedder(pt, EmbeddingConfig(input_size=SIZE))
    assert embedder.channels == 3
    rgb = _pixels(3, 3, SIZE, SIZE)
    np.testing.assert_allclose(embedder.embed(rgb), _unit_torch(net, rgb), atol=1e-5)


def test_thread_count_and_input_size_warning(
    grey_model: tuple[Path, SliceNetV1], caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = grey_model
    with caplog.at_level(logging.INFO, logger="sidecar.embeddings.onnx_model"):
        embedder = load_embedder(EmbeddingConfig(model_path=path, threads=2, input_size=128))
    assert isinstance(embedder, OnnxEmbedder)
    options = load_onnx(path, threads=2).session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert embedder.input_size == SIZE  # the contract, not embedding.input_size
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["embedding.input_size 128 is not used: small.onnx.json fixes the "
                      "model's input at 32 x 32 (slices are prepared at that size)"]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"embedding model {embedder.model_id} from {path}" in m and "2 threads" in m
               and "licence Apache-2.0" in m for m in info)


# ------------------------------------------------------------- ONNX by hand
def _graph_file(
    folder: Path, name: str, *, in_shape: list[Any], out_shape: list[Any],
    nodes: list[onnx.NodeProto] | None = None, inits: list[onnx.TensorProto] | None = None,
    extra_inputs: list[onnx.ValueInfoProto] | None = None, in_type: int = TensorProto.FLOAT,
    contract: dict[str, Any] | None = None,
) -> Path:
    """An ONNX file from nodes (default: mean over H and W of a 4 x 4 convolution with
    seeded weights: ``(N, C, H, W) -> (N, DIM)``) and its contract."""
    c = in_shape[1] if isinstance(in_shape[1], int) else 1
    if nodes is None:
        rng = np.random.default_rng(5)
        w = helper.make_tensor("w", TensorProto.FLOAT, [DIM, c, 4, 4],
                               rng.standard_normal(DIM * c * 16).astype(np.float32))
        inits = [w, *(inits or [])]
        axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
        inits.append(axes)
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[4, 4]),
                 helper.make_node("Relu", ["c"], ["r"]),
                 helper.make_node("ReduceMean", ["r", "axes"], ["y"], keepdims=0)]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", in_type, in_shape), *(extra_inputs or [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=inits or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = folder / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    spec = {"input_size": SIZE, "channels": c, "dim": DIM} if contract is None else contract
    contract_path(path).write_text(json.dumps(spec))
    return path


def test_model_id_adds_what_the_contract_fixes(tmp_path: Path) -> None:
    fixed = _graph_file(tmp_path, "fixed", in_shape=["n", 1, SIZE, SIZE], out_shape=["n", DIM])
    free = _graph_file(tmp_path, "free", in_shape=["n", 1, "h", "w"], out_shape=["n", DIM])
    one = _graph_file(tmp_path, "one", in_shape=[1, 1, SIZE, SIZE], out_shape=[1, DIM])
    a = load_embedder(EmbeddingConfig(model_path=fixed, input_size=SIZE))
    b = load_embedder(EmbeddingConfig(model_path=free, input_size=SIZE))
    c = load_embedder(EmbeddingConfig(model_path=one, input_size=SIZE))
    assert a.model_id == _hash16(fixed)
    assert b.model_id == f"{_hash16(free)}-s{SIZE}"  # H and W come from the JSON
    batch = _pixels(5, SIZE, SIZE, seed=6)
    # the same convolution: the same vectors; a graph fixed at batch 1 runs slice by slice
    np.testing.assert_allclose(a.embed(batch), b.embed(batch), atol=1e-6)
    np.testing.assert_allclose(a.embed(batch), c.embed(batch), atol=1e-6)
    # fixed at batch 4: 5 slices run as 4 + 1 padded with zeros, the padding cut off
    four = _graph_file(tmp_path, "four", in_shape=[4, 1, SIZE, SIZE], out_shape=[4, DIM])
    np.testing.assert_allclose(load_embedder(EmbeddingConfig(model_path=four)).embed(batch),
                               a.embed(batch), atol=1e-6)
    # a symbolic channel axis: the JSON's channels is part of the id
    chan = _graph_file(tmp_path, "chan", in_shape=["n", "c", SIZE, SIZE], out_shape=["n", DIM])
    assert load_embedder(EmbeddingConfig(model_path=chan)).model_id == f"{_hash16(chan)}-c1"
    # a free input size follows the JSON: 64 px is another vector space
    contract_path(free).write_text(json.dumps({"input_size": 64, "channels": 1, "dim": DIM}))
    assert load_embedder(EmbeddingConfig(model_path=free)).model_id == f"{_hash16(free)}-s64"
    # mean/std are applied by the runtime and are part of the id
    contract_path(fixed).write_text(json.dumps(
        {"input_size": SIZE, "channels": 1, "dim": DIM, "mean": 0.5, "std": [0.25]}))
    normed = load_embedder(EmbeddingConfig(model_path=fixed, input_size=SIZE))
    assert normed.model_id.startswith(f"{_hash16(fixed)}-n") and len(normed.model_id) == 16 + 10
    np.testing.assert_allclose(normed.embed(batch), a.embed((batch - 0.5) / 0.25), atol=1e-5)


def _bad_cases() -> list[Any]:
    """(id, how to make the files in a folder from a good pair, message, file named)."""
    def contract(**change: Any) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            spec: dict[str, Any] = {"input_size": SIZE, "channels": 1, "dim": DIM}
            spec.update(change)
            for key in [k for k, v in spec.items() if v is None]:
                del spec[key]
            return _graph_file(folder, "m", in_shape=["n", 1, SIZE, SIZE],
                               out_shape=["n", DIM], contract=spec)
        return make

    def text(content: str | None) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            path = contract()(folder)
            if content is None:
                contract_path(path).unlink()
            else:
                contract_path(path).write_text(content)
            return path
        return make

    def graph(**kw: Any) -> Callable[[Path], Path]:
        def make(folder: Path) -> Path:
            kw.setdefault("in_shape", ["n", 1, SIZE, SIZE])
            kw.setdefault("out_shape", ["n", DIM])
            return _graph_file(folder, "m", **kw)
        return make

    def garbage(folder: Path) -> Path:
        path = contract()(folder)
        path.write_bytes(b"\x08\x07 this is not an ONNX model")
        return path

    def absent(folder: Path) -> Path:
        path = contract()(folder)
        path.unlink()
        return path

    nan_nodes = [helper.make_node("Flatten", ["x"], ["f"]),
                 helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["g"]),
                 helper.make_node("Neg", ["g"], ["h"]),
                 helper.make_node("Sqrt", ["h"], ["y"])]  # sqrt of negative pixels: NaN
    nan_inits = [helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("s1", TensorProto.INT64, [1], [DIM]),
                 helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    # the first 24 pixels, with an end computed at run time: the graph cannot say D
    runtime_dim = [helper.make_node("Flatten", ["x"], ["f"]),
                   helper.make_node("ReduceMax", ["f"], ["m"], keepdims=0),
                   helper.make_node("Mul", ["m", "zero"], ["z"]),
                   helper.make_node("Add", ["z", "d"], ["e"]),
                   helper.make_node("Cast", ["e"], ["ei"], to=TensorProto.INT64),
                   helper.make_node("Reshape", ["ei", "one"], ["e1"]),
                   helper.make_node("Slice", ["f", "s0", "e1", "ax"], ["y"])]
    runtime_inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("d", TensorProto.FLOAT, [], [float(DIM)]),
                     helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
                     helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    flat4d = [helper.make_node("Identity", ["x"], ["y"])]
    two = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 1])]
    json_only = "json"
    return [
        pytest.param(text(None), "file not found: an ONNX model needs its input contract",
                     json_only, id="json-missing"),
        pytest.param(text("{not json"), "not valid JSON", json_only, id="json-invalid"),
        pytest.param(text("[1, 2]"), "not a JSON object", json_only, id="json-not-object"),
        pytest.param(contract(dim=None), r"missing \['dim'\]", json_only, id="dim-missing"),
        pytest.param(contract(**{"input-size": 32}), "unknown key", json_only,
                     id="unknown-key"),
        pytest.param(contract(channels=2), "channels must be 1 .grey. or 3", json_only,
                     id="channels-2"),
        pytest.param(contract(input_size="32"), "input_size must be an integer", json_only,
                     id="size-not-int"),
        pytest.param(contract(mean=0.5), "both mean and std", json_only, id="mean-no-std"),
        pytest.param(contract(mean=[0.5, 0.5], std=1), "mean must be one number or 1",
                     json_only, id="mean-per-channel"),
        pytest.param(contract(mean=0.5, std=0), "std must be > 0", json_only, id="std-zero"),
        pytest.param(contract(format=2), "format 2 is not 1", json_only, id="format"),
        pytest.param(contract(sha256="0" * 64), "SHA-256 does not match", "onnx",
                     id="sha256-mismatch"),
        pytest.param(contract(input_size=64), r"shape \[n, 1, 32, 32\], but m.onnx.json says "
                     r"\[N, 1, 64, 64\]", "onnx", id="size-mismatch"),
        pytest.param(contract(channels=3), r"but m.onnx.json says \[N, 3, 32, 32\]", "onnx",
                     id="channels-mismatch"),
        pytest.param(contract(dim=25), r"shape \[n, 24\], but m.onnx.json says dim 25", "onnx",
                     id="dim-mismatch"),
        pytest.param(graph(nodes=runtime_dim, inits=runtime_inits, out_shape=["n", "d"],
                           contract={"input_size": SIZE, "channels": 1, "dim": 25}),
                     r"dry run .* output is \(2, 24\), expected \(2, 25\)", "onnx",
                     id="dim-mismatch-at-run"),
        pytest.param(graph(nodes=flat4d, out_shape=["n", 1, SIZE, SIZE]),
                     r"has shape \[n, 1, 32, 32\], expected 2-D \[N, D\]", "onnx",
                     id="output-4d"),
        pytest.param(graph(nodes=nan_nodes, inits=nan_inits),
                     "dry run .* NaN, infinite or all-zero", "onnx", id="nan-output"),
        pytest.param(graph(in_shape=["n", SIZE, SIZE], nodes=flat4d, out_shape=["n", DIM],
                           contract={"input_size": SIZE, "channels": 1, "dim": DIM}),
                     r"input 'x' has shape \[n, 32, 32\], expected \[N, 1, 32, 32\]", "onnx",
                     id="input-3d"),
        pytest.param(graph(extra_inputs=two), r"2 inputs \['x', 'z'\]", "onnx",
                     id="two-inputs"),
        pytest.param(graph(in_type=TensorProto.UINT8, nodes=[
            helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
            out_shape=["n", 1, SIZE, SIZE]),
                     r"input 'x' is tensor\(uint8\), expected tensor\(float\)", "onnx",
                     id="uint8-input"),
        pytest.param(garbage, "not a readable ONNX model", "onnx", id="not-onnx"),
        pytest.param(absent, "file not found", "onnx", id="onnx-missing"),
    ]


@pytest.mark.parametrize(("make", "message", "named"), _bad_cases())
def test_bad_model_or_contract_is_refused_naming_the_file(
    tmp_path: Path, make: Callable[[Path], Path], message: str, named: str,
) -> None:
    path = make(tmp_path)
    with pytest.raises(ModelError, match=message) as err:
        load_embedder(EmbeddingConfig(model_path=path, input_size=SIZE))
    concerned = contract_path(path) if named == "json" else path
    assert err.value.path == str(concerned)
    assert str(err.value).startswith(f"model file {concerned}: ")


def test_service_and_commands_refuse_a_bad_onnx_model(
    config_factory: Callable[..., Config], tmp_path: Path, cli_isolation: None
) -> None:
    model = _graph_file(tmp_path, "bad", in_shape=["n", 1, SIZE, SIZE], out_shape=["n", DIM],
                        contract={"input_size": SIZE, "channels": 1, "dim": 25})
    config_factory({"embedding": {"model_path": str(model)}, "worker": {"enabled": True},
                    "logging": {"level": "WARNING"}})
    path = tmp_path / "sidecar.yaml"
    expected = f"model file {model}: output 'y' has shape [n, 24], but bad.onnx.json says dim 25"
    for args in (["serve"], ["embed", "-q"], ["check-config"]):
        res = CliRunner().invoke(main, ["--config", str(path), *args])
        assert res.exit_code == 1, res.output
        assert expected in res.stderr, res.stderr
        assert "Traceback" not in res.output
    # a good model: check-config loads it and names it
    shutil.copy(_graph_file(tmp_path, "good", in_shape=["n", 1, SIZE, SIZE],
                            out_shape=["n", DIM]), model)
    shutil.copy(contract_path(tmp_path / "good.onnx"), contract_path(model))
    res = CliRunner().invoke(main, ["--config", str(path), "check-config"])
    assert res.exit_code == 0, res.output
    assert (f"# embedding model {_hash16(model)} from {model}: input 1 x 32 x 32, dim 24"
            in res.stderr)


# ------------------------------------------------------ through the worker
def test_worker_embeds_with_the_onnx_model_and_search_finds_the_instance(
    config_factory: Callable[..., Config], tmp_path: Path, cli_isolation: None,
) -> None:
    model = tmp_path / "site" / "projection.onnx"
    export_onnx(PooledProjection(), model, OnnxContract(SIZE, 1, DIM, name="projection"))
    config_factory({"embedding": {"model_path": str(model)},
                    "stability": {"stable_age": 0.01}, "logging": {"level": "WARNING"},
                    "preprocess": {"slice_spacing_mm": 0, "max_slices_per_series": 64}})
    path = tmp_path / "sidecar.yaml"
    datasets = ct_series(5) + ct_series(3, seed0=100)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, ds in enumerate(datasets):
        (folder / f"{i:02d}.dcm").write_bytes(part10(ds))

    def cli(*args: str) -> Any:
        res = CliRunner().invoke(main, ["--config", str(path), *args])
        assert res.exit_code == 0, res.output
        return res

    cli("ingest", "-q", str(folder))
    assert "embed: 8 slices from 8 instances in 2 series, 0 failed" in cli("embed", "-q").stdout
    status = json.loads(cli("status", "--json").stdout)
    model_id = _hash16(model)
    assert status["vectors_by_model"] == {model_id: 8}
    assert status["active_model_id"] == model_id
    # a query by a new file (another patient's study; embedded now, with the ONNX model)
    # holding the pixels of an archived instance finds that instance first
    target = datasets[6]
    probe = copy.deepcopy(target)
    probe.PatientID, probe.PatientName = "OTHER-PATIENT", "Other^Patient"
    probe.StudyInstanceUID, probe.SeriesInstanceUID = generate_uid(), generate_uid()
    probe.SOPInstanceUID = probe.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    query = tmp_path / "query.dcm"
    query.write_bytes(part10(probe))
    result = json.loads(cli("search", str(query), "--level", "image", "-k", "3",
                            "--json").stdout)
    assert result["model_id"] == model_id
    hits = result["hits"]
    assert len(hits) == 3
    assert hits[0]["sop_instance_uid"] == target.SOPInstanceUID
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert hits[1]["score"] < hits[0]["score"]


# ----------------------------------------------------- TorchScript, export
@jit_deprecated
def test_torchscript_model_path_warns_and_names_the_onnx_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "small.ts"
    export_torchscript(_net(), path, input_size=SIZE)
    with caplog.at_level(logging.WARNING, logger="sidecar.embeddings.model"):
        embedder = load_embedder(EmbeddingConfig(model_path=path, input_size=SIZE))
    assert isinstance(embedder, TorchEmbedder) and embedder.dim == DIM
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"embedding.model_path {path} is a TorchScript file: torch deprecates" in message
    assert "sidecar model export-onnx --out FILE.onnx" in message


@jit_deprecated
def test_cli_export_onnx_writes_the_loaded_model(
    config_factory: Callable[..., Config], tmp_path: Path, cli_isolation: None
) -> None:
    config_factory({"logging": {"level": "WARNING"}})
    cfg_path = tmp_path / "sidecar.yaml"
    out = tmp_path / "export" / "shipped.onnx"

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["--config", str(cfg_path), "model", "export-onnx",
                                         *args])

    res = run("--out", str(out))
    assert res.exit_code == 0, res.output
    builtin = TorchEmbedder.from_config(EmbeddingConfig())
    onnx_embedder = load_embedder(EmbeddingConfig(model_path=out))
    assert f"model id {onnx_embedder.model_id}, input 3 x 128 x 128, dim 128" in res.stdout
    assert f"(model id {builtin.model_id})" in res.stdout
    assert onnx_embedder.model_id == _hash16(out) != builtin.model_id
    batch = _pixels(6, 128, 128, seed=8)
    np.testing.assert_allclose(onnx_embedder.embed(batch), builtin.embed(batch), atol=1e-5)
    contract = json.loads(contract_path(out).read_text())
    assert contract["provenance"]["source_model_id"] == builtin.model_id
    assert contract["name"] == load_weights()[1].description["name"]
    # existing files are kept unless --force; the suffix decides how the file is loaded
    again = run("--out", str(out))
    assert again.exit_code == 1 and "exists (--force replaces it)" in again.stderr
    wrong = run("--out", str(tmp_path / "x.pt"))
    assert wrong.exit_code == 2 and "must end in .onnx" in wrong.stderr
    # a TorchScript model_path is exported from the TorchScript file
    ts = tmp_path / "small.ts"
    export_torchscript(_net(), ts, input_size=SIZE)
    data = yaml.safe_load(cfg_path.read_text())
    data["embedding"] = {"model_path": str(ts)}
    cfg_path.write_text(yaml.safe_dump(data))
    res = run("--out", str(tmp_path / "ts.onnx"))
    assert res.exit_code == 0, res.output
    from_ts = load_embedder(EmbeddingConfig(model_path=tmp_path / "ts.onnx"))
    ts_embedder = load_embedder(EmbeddingConfig(model_path=ts, input_size=SIZE))
    small = _pixels(3, SIZE, SIZE)
    np.testing.assert_allclose(from_ts.embed(small), ts_embedder.embed(small), atol=1e-5)
