"""The evaluation harness (``sidecar evaluate``): metrics, data validation, both paths, CLI.

Metrics are checked against hand-computed rankings; the paths run on small
synthetic sets written by the tests (two classes with visibly different
patterns, so the tiny embedder ranks them almost perfectly, and a control
with shuffled gallery labels that must fall to chance); path (b) runs a real
sidecar in-process and must reproduce path (a)'s hits in the same order. One
test runs path (a) with the shipped model on BreastMNIST when the shared
data is present.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from pydicom.uid import JPEGLSNearLossless

from sidecar.cli.main import main
from sidecar.config import Config
from sidecar.embeddings.model import TinyEmbedder
from sidecar.embeddings.network import builtin_weights_path
from sidecar.lab import evaluate as ev
from sidecar.lab import metrics, neardup
from sidecar.training import npz
from tests.conftest import SHARED_DATA

MEDMNIST = SHARED_DATA / "medmnist"
SIDE = 28


# ------------------------------------------------------------------ helpers
def pattern_images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Class 0: a bright horizontal band; class 1: a bright vertical band (random place,
    width and brightness, noise on top)."""
    out = np.empty((len(labels), SIDE, SIDE), dtype=np.uint8)
    for i, label in enumerate(labels):
        img = np.full((SIDE, SIDE), rng.uniform(30, 80))
        start = int(rng.integers(2, 14))
        width = int(rng.integers(5, 12))
        level = rng.uniform(170, 240)
        if label == 0:
            img[start:start + width, :] = level
        else:
            img[:, start:start + width] = level
        img += rng.normal(0.0, 8.0, size=img.shape)
        out[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out


def write_set(path: Path, n_train: int, n_test: int, n_val: int = 6, seed: int = 0,
              **override: Any) -> Path:
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = np.arange(n) % 2
        rng.shuffle(labels)
        arrays[f"{split}_images"] = pattern_images(rng, labels)
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.fixture
def cfg(config_factory: Callable[..., Config]) -> Config:
    return config_factory()


def tiny() -> TinyEmbedder:
    return TinyEmbedder(input_size=32, dim=32, grid=8, seed=0)


# ------------------------------------------------------------------ metrics
def test_cosine_ranking_exact_with_ties_by_gallery_index() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    order, scores = metrics.cosine_ranking(np.array([[3.0, 0.0]]), gallery)
    # 0 and 2 tie at 1.0 (lower index first), then 45 degrees, then the zero row and
    # the orthogonal one (both 0: gallery order)
    assert order.tolist() == [[0, 2, 3, 1, 4]]
    np.testing.assert_allclose(scores[0], [1.0, 1.0, np.sqrt(0.5), 0.0, 0.0])
    top, _ = metrics.cosine_ranking(np.array([[0.0, 1.0], [1.0, 0.0]]), gallery, k=2)
    assert top.tolist() == [[1, 3], [0, 2]]
    with pytest.raises(ValueError, match="dimensions"):
        metrics.cosine_ranking(np.ones((1, 3)), gallery)


REL = np.array([[1, 0, 1, 0, 0],
                [0, 1, 0, 0, 1]], dtype=bool)


def test_precision_at_k() -> None:
    assert metrics.precision_at_k(REL, 1).tolist() == [1.0, 0.0]
    assert metrics.precision_at_k(REL, 1).mean() == 0.5
    np.testing.assert_allclose(metrics.precision_at_k(REL, 3), [2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="P@6"):
        metrics.precision_at_k(REL, 6)


def test_average_precision_divides_by_all_relevant_images() -> None:
    # query 0: hits at 1 and 3 of R = 2 -> (1/1 + 2/3) / 2 = 5/6
    # query 1: hits at 2 and 5 of R = 4 -> (1/2 + 2/5) / 4 = 0.225 (two never retrieved)
    ap = metrics.average_precision(REL, np.array([2, 4]))
    np.testing.assert_allclose(ap, [5 / 6, 0.225])
    assert ap.mean() == pytest.approx((5 / 6 + 0.225) / 2)
    assert metrics.average_precision(REL, np.array([0, 0])).tolist() == [0.0, 0.0]


def test_mahbod_map_at_5_divides_by_hits_in_the_top_5() -> None:
    # query 0: (1/1 + 2/3) / 2 = 5/6; query 1: (1/2 + 2/5) / 2 = 0.45 (standard AP: 0.225)
    np.testing.assert_allclose(metrics.mahbod_map_at_k(REL, 5), [5 / 6, 0.45])
    lenient = metrics.mahbod_map_at_k(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=bool))
    assert lenient.tolist() == [1.0, 0.0]  # one hit at rank 1 is perfect; none is 0
    with pytest.raises(ValueError, match="mAP@5"):
        metrics.mahbod_map_at_k(REL[:, :4], 5)


def test_accuracy_at_1_and_majority_rate() -> None:
    assert metrics.accuracy_at_1(REL).tolist() == [1.0, 0.0]
    assert metrics.majority_rate(np.array([0, 1, 1]), np.array([1, 0, 1, 1])) == 0.75
    assert metrics.majority_rate(np.array([2, 2, 0]), np.array([1, 0])) == 0.0


def test_knn_accuracy_majority_vote_and_ties() -> None:
    ranked = np.array([
        [1, 1, 0, 0, 0],  # majority 0
        [0, 1, 1, 0, 2],  # 0 and 1 tie (2 each): 0 is ranked first
        [2, 1, 1, 2, 3],  # 2 and 1 tie: 2 is ranked first
        [3, 3, 3, 1, 1],  # majority 3
    ])
    assert metrics.knn_accuracy(ranked, np.array([1, 0, 2, 3]), k=5).tolist() == [0, 1, 1, 1]
    assert metrics.knn_accuracy(ranked, np.array([0, 1, 1, 1]), k=5).tolist() == [1, 0, 0, 0]
    assert metrics.knn_accuracy(ranked, np.array([1, 0, 2, 3]), k=1).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="kNN-11"):
        metrics.knn_accuracy(ranked, np.array([1, 0, 2, 3]), k=11)


def test_retrieval_metrics_full_and_truncated_rankings() -> None:
    gallery_labels = np.array([0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1])
    full = np.argsort(gallery_labels, kind="stable")[None, :]  # every 0 first
    m = metrics.retrieval_metrics(np.vstack([full, full[:, ::-1]]), gallery_labels,
                                  np.array([0, 0]), full_ranking=True)
    assert list(m) == list(metrics.METRICS)
    # query 0: the five 0s lead; query 1: the seven 1s lead
    assert m["p@1"].tolist() == [1.0, 0.0]
    assert m["p@10"].tolist() == [0.5, 0.3]
    assert m["map"][0] == 1.0
    # query 1: the 0s at ranks 8..12 -> AP = mean(1/8, 2/9, 3/10, 4/11, 5/12)
    assert m["map"][1] == pytest.approx(np.mean([1 / 8, 2 / 9, 3 / 10, 4 / 11, 5 / 12]))
    assert m["knn11"].tolist() == [0.0, 0.0]  # 5 zeros against 6 ones in the top 11
    assert m["map@5_mahbod"].tolist() == [1.0, 0.0]
    short = metrics.retrieval_metrics(np.array([[0, 2, 5, 7, 9, 1, 3, 4, 6, 8, 10, -1]]),
                                      gallery_labels, np.array([0]), full_ranking=False)
    assert "map" not in short
    assert short["p@10"].tolist() == [0.5]


def test_bootstrap_intervals_are_seeded_paired_and_contain_the_mean() -> None:
    rng = np.random.default_rng(1)
    values = {"x": rng.random(200), "same": np.full(200, 0.3)}
    one = metrics.bootstrap_cis(values, 500, seed=3)
    assert one == metrics.bootstrap_cis(values, 500, seed=3)
    assert one != metrics.bootstrap_cis(values, 500, seed=4)
    lo, hi = one["x"]
    assert lo < values["x"].mean() * 100 < hi
    assert hi - lo < 10
    assert one["same"] == (30.0, 30.0)
    assert metrics.bootstrap_cis(values, 0) == {}


def test_raw_pixel_vectors_and_jpeg_simulation() -> None:
    img = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    assert metrics.raw_pixel_vectors(img).shape == (1, 16)
    assert metrics.raw_pixel_vectors(img, centre=True).sum() == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    smooth = np.clip(np.add.outer(np.arange(28), np.arange(28)) * 4, 0, 255).astype(np.uint8)
    jpeg = neardup.jpeg_quantise(smooth)
    assert jpeg.shape == smooth.shape and jpeg.dtype == np.uint8
    assert 0 < np.abs(jpeg.astype(int) - smooth).max() < 20
    for kind in neardup.NEAR_DUP_KINDS:
        copy = neardup.perturb(smooth, kind, rng)
        assert copy.shape == smooth.shape and copy.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown"):
        neardup.perturb(smooth, "blur", rng)


# ------------------------------------------------------------------ data validation
def test_load_accepts_the_medmnist_layout(tmp_path: Path) -> None:
    data = npz.load_labelled_npz(write_set(tmp_path / "ok.npz", 10, 4))
    images, labels = data.split("train")
    assert images.shape == (10, SIDE, SIDE) and labels.shape == (10,)
    assert labels.dtype == np.int64
    assert data.split("val")[0].shape[0] == 6
    no_val = npz.load_labelled_npz(write_set(tmp_path / "noval.npz", 10, 4, val_images=None,
                                            val_labels=None))
    with pytest.raises(npz.EvaluationError, match="no 'val' split"):
        no_val.split("val")
    channel = write_set(tmp_path / "c.npz", 4, 2, n_val=0,
                        train_images=np.zeros((4, SIDE, SIDE, 1), np.uint8))
    assert npz.load_labelled_npz(channel).split("train")[0].shape == (4, SIDE, SIDE)


@pytest.mark.parametrize(("override", "message"), [
    ({"test_labels": None}, "missing test_labels"),
    ({"val_labels": None}, "missing val_labels"),
    ({"train_images": np.zeros((10, SIDE, SIDE), np.float32)}, "dtype float32, expected uint8"),
    ({"train_images": np.zeros((10, SIDE), np.uint8)}, r"expected \(N, H, W\)"),
    ({"train_images": np.zeros((10, 14, 14), np.uint8)}, "same image size"),
    ({"train_labels": np.zeros(9, np.uint8)}, "9 labels for 10 images"),
    ({"train_labels": np.zeros((10, 3), np.uint8)}, "multi-label"),
    ({"train_labels": np.zeros(10, np.float64)}, "integer class labels"),
    ({"train_labels": -np.ones(10, np.int64)}, "negative label"),
    ({"test_images": np.zeros((0, SIDE, SIDE), np.uint8),
      "test_labels": np.zeros(0, np.uint8)}, "test split is empty"),
])
def test_load_names_what_is_wrong(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    path = write_set(tmp_path / "bad.npz", 10, 4, **override)
    with pytest.raises(npz.EvaluationError, match=message):
        npz.load_labelled_npz(path)


def test_load_refuses_missing_and_non_npz_files(tmp_path: Path) -> None:
    with pytest.raises(npz.EvaluationError, match="no such file"):
        npz.load_labelled_npz(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(npz.EvaluationError, match="not a readable .npz"):
        npz.load_labelled_npz(junk)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(npz.EvaluationError, match="single .npy"):
        npz.load_labelled_npz(single)


def test_near_duplicate_hits_strict_and_counting_gallery_twins() -> None:
    rng = np.random.default_rng(3)
    gallery = rng.integers(40, 200, (4, 8, 8)).astype(np.uint8)
    gallery[1] = gallery[0] + 2  # a twin of image 0: RMSE 2 grey levels
    gallery[3] = gallery[2]  # a pixel-identical copy of image 2
    originals = np.array([0, 0, 2, 2, 0])
    assert neardup.gallery_twins(gallery, originals).all()  # 0 has 1, 2 has 3
    near = neardup.NearDuplicates(originals=originals,
                             kinds=np.array(["noise", "shift", "noise", "shift", "jpeg_q75"]),
                             datasets=[], pixels=np.zeros((5, 8, 8), np.uint8),
                             has_twin=neardup.gallery_twins(gallery, originals))
    # rank 1: the original, its twin, the identical copy, a far image, nothing (-1)
    hits = neardup.near_duplicate_hits(np.array([0, 1, 3, 0, -1]), near, gallery)
    assert hits.strict.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert hits.twins.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert hits.twin_originals == 2  # both originals have a twin (one identical)
    assert neardup.pixel_rmse(gallery[0], gallery[1]) == 2.0
    far = gallery.copy()
    far[1] = np.clip(gallery[0].astype(int) + 30, 0, 255).astype(np.uint8)
    assert neardup.near_duplicate_hits(np.array([1]), near, far).twins.tolist() == [0.0]
    assert neardup.gallery_twins(far, np.array([0, 2])).tolist() == [False, True]


# ------------------------------------------------------------------ path (a)
def test_path_a_separates_two_patterns_and_shuffled_labels_fall_to_chance(
    tmp_path: Path, cfg: Config
) -> None:
    path = write_set(tmp_path / "two.npz", 120, 60)
    report = ev.evaluate(path, cfg, tiny(), which="a", n_boot=200, near_dup=10)
    a = report.path_a
    assert a is not None and report.path_b is None
    for metric in metrics.METRICS:  # mAP ranks every gallery image: the tiny embedder errs late
        assert a.metrics[metric] >= (80.0 if metric == "map" else 95.0), (metric, a.metrics)
        lo, hi = a.ci95[metric]
        assert lo <= a.metrics[metric] <= hi
    assert report.majority == 0.5
    assert a.near_dup["n"] == 40 and set(a.near_dup) == {"n", *neardup.NEAR_DUP_KINDS}
    # noise and re-encoding keep the original first; a 1-2 px shift of a band moves it onto
    # another gallery image's band (20 % found: neither the tiny embedder nor raw pixels are
    # shift-invariant)
    assert {k: a.near_dup[k] for k in ("noise", "jpeg_ls", "jpeg_q75")} == {
        "noise": 100.0, "jpeg_ls": 100.0, "jpeg_q75": 100.0}
    assert a.metrics["near_dup@1"] == pytest.approx(np.mean(
        [a.near_dup[k] for k in neardup.NEAR_DUP_KINDS]))
    assert a.extra["near_dup_twins@1"] >= a.metrics["near_dup@1"]
    by_label = a.extra["p@1_by_label"]
    assert set(by_label) == {"0", "1"}  # 30 queries of each label: P@1 is their mean
    assert a.metrics["p@1"] == pytest.approx((by_label["0"] + by_label["1"]) / 2, abs=0.01)
    assert report.raw_pixel.metrics["p@1"] >= 80.0

    data = np.load(path)
    shuffled = dict(data)
    shuffled["train_labels"] = np.random.default_rng(5).permutation(data["train_labels"])
    control = tmp_path / "shuffled.npz"
    np.savez(control, **shuffled)
    chance = ev.evaluate(control, cfg, tiny(), which="a", n_boot=200, near_dup=0).path_a
    assert chance is not None
    for metric in ("p@1", "p@10", "map", "knn11"):
        assert 25.0 <= chance.metrics[metric] <= 75.0, (metric, chance.metrics)
    assert "near_dup@1" not in chance.metrics


def test_path_a_prepares_exactly_as_the_worker(cfg: Config) -> None:
    from sidecar.embeddings import preprocess

    img = pattern_images(np.random.default_rng(0), np.array([1]))[0]
    ds = npz.image_dataset(img, key="k", patient_id="P")
    assert ds.SOPClassUID == npz.SECONDARY_CAPTURE and "PixelSpacing" not in ds
    assert npz.image_dataset(img, key="k", patient_id="P").SOPInstanceUID == ds.SOPInstanceUID
    ours = npz.prepare_datasets([ds], cfg, 32)
    direct = preprocess.prepare(npz.round_trip(ds), cfg.preprocess, 32, frames=[0])
    np.testing.assert_array_equal(ours, direct)
    lossy = npz.image_dataset(img, key="k", patient_id="P",
                             transfer_syntax=JPEGLSNearLossless)
    decoded = npz.round_trip(lossy).pixel_array.astype(int)
    assert 0 < np.abs(decoded - img).max() <= npz.JPEG_LS_NEAR


# ------------------------------------------------------------------ path (b)
def test_path_b_reproduces_path_a_hit_for_hit(tmp_path: Path, cfg: Config) -> None:
    path = write_set(tmp_path / "small.npz", 20, 6)
    report = ev.evaluate(path, cfg, tiny(), which="both", n_boot=100, near_dup=3,
                         workdir=tmp_path)
    a, b = report.path_a, report.path_b
    assert a is not None and b is not None
    assert b.query_indices.tolist() == list(range(6))
    assert b.extra["top_k"] == 20 and b.extra["full_ranking"]
    assert b.extra["short_answers"] == 0
    # the whole ranking, in the same order, with the same scores (float16 storage aside)
    np.testing.assert_array_equal(b.ranking, a.ranking)
    np.testing.assert_allclose(b.scores, a.scores, atol=2e-3)
    assert b.metrics == {k: v for k, v in a.metrics.items() if k in b.metrics}
    cmp = b.extra["vs_path_a"]
    assert cmp["max_abs_difference_points"] == 0.0
    assert cmp["top1_same_percent"] == 100.0 and cmp["top10_order_same_percent"] == 100.0
    assert b.near_dup["n"] == 12  # no limit: every copy (3 images x 4 kinds)
    assert list(tmp_path.glob("sidecar-evaluate-*")) == []  # the temporary sidecar is gone


def test_path_b_limit_samples_queries(tmp_path: Path, cfg: Config) -> None:
    path = write_set(tmp_path / "small.npz", 12, 8)
    report = ev.evaluate(path, cfg, tiny(), which="b", limit=3, n_boot=0, near_dup=1,
                         workdir=tmp_path)
    b = report.path_b
    assert b is not None and report.path_a is None and report.primary is b
    assert len(b.query_indices) == 3 and b.ci95 == {}
    assert b.near_dup["n"] == 3
    assert set(report.to_dict()) >= {"p@1", "map", "majority", "raw_pixel_p@1", "path_b"}


# ------------------------------------------------------------------ CLI
@pytest.mark.usefixtures("cli_isolation")
def test_cli_json_keys_and_table(tmp_path: Path) -> None:
    path = write_set(tmp_path / "cli.npz", 16, 5)
    conf = tmp_path / "sidecar.yaml"
    conf.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")},
                                    "logging": {"level": "WARNING"}}))
    runner = CliRunner()
    res = runner.invoke(main, ["--config", str(conf), "evaluate", str(path), "--json",
                               "--path", "both", "--limit", "2", "--bootstrap", "50"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("p@1", "p@10", "map", "knn11", "map@5_mahbod", "acc@1_mahbod", "majority",
                "raw_pixel_p@1", "near_dup@1"):
        assert 0.0 <= out[key] <= 100.0, key
    assert out["path"] == "a" and out["queries"] == 5 and out["gallery"] == 16
    assert 0.0 <= out["near_dup_twins@1"] <= 100.0 and set(out["p@1_by_label"]) <= {"0", "1"}
    assert out["path_b"]["queries"] == 2 and "vs_path_a" in out["path_b"]
    assert set(out["ci95"]) >= {"p@1", "map"}
    assert not (tmp_path / "data").exists()  # the configured data directory is not touched

    table = runner.invoke(main, ["--config", str(conf), "evaluate", str(path),
                                 "--bootstrap", "0"], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    assert "mAP@5 (Mahbod)" in table.stdout and "majority-class rate: 60.0 %" in table.stdout
    assert "P@1 by query label, a: label 0" in table.stdout
    assert "counting gallery twins" in table.stdout

    same = runner.invoke(main, ["--config", str(conf), "evaluate", str(path), "--json",
                                "--bootstrap", "0", "--model", str(builtin_weights_path())],
                         catch_exceptions=False)
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["p@1"] == out["p@1"]
    assert json.loads(same.stdout)["model_id"] == out["model_id"]

    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((2, 4, 4), np.uint8))
    err = runner.invoke(main, ["--config", str(conf), "evaluate", str(bad)])
    assert err.exit_code == 1 and "missing train_labels" in err.output


# ------------------------------------------------------------------ real data
@pytest.mark.skipif(not (MEDMNIST / "breastmnist.npz").is_file(),
                    reason=f"shared data absent: {MEDMNIST / 'breastmnist.npz'}")
def test_breastmnist_path_a_with_the_shipped_model(
    cfg: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    embedder = ev.load_model(cfg)
    report = ev.evaluate(MEDMNIST / "breastmnist.npz", cfg, embedder, which="a", n_boot=100,
                         near_dup=25)
    assert capsys.readouterr().out == ""
    a = report.path_a
    assert a is not None
    assert (report.gallery, report.queries) == (546, 156)
    assert round(report.majority * 100, 1) == 73.1
    # measured: raw pixels P@1 79.5, P@10 70.8, mAP@5 (Mahbod) 85.7; shipped model P@1
    # 81.4, P@10 75.3, mAP 67.8 (the untrained random initialisation: 75.0, 64.2, 61.3)
    assert 75.0 <= report.raw_pixel.metrics["p@1"] <= 84.0
    assert 80.0 <= report.raw_pixel.metrics["map@5_mahbod"] <= 90.0
    assert 60.0 <= a.metrics["p@1"] <= 90.0
    assert 50.0 <= a.metrics["map"] <= 80.0
    # what training bought: more of the 10 nearest share the query's label than with raw pixels
    assert a.metrics["p@10"] > report.raw_pixel.metrics["p@10"] + 2.0
    assert a.metrics["acc@1_mahbod"] == a.metrics["p@1"]
    assert a.near_dup["noise"] == 100.0
