"""bench/volumes.py (``make bench-3d``): its own plumbing, on synthetic shapes.

The quick bench runs end to end (storescu -> ``sidecar serve`` -> worker ->
STUDY-level similarity C-FIND) on spheres and cubes written as CT series; the
metrics it computes itself are checked on cases small enough to do by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, dcmtk_tool

sys.path.insert(0, str(REPO / "bench"))
import volumes  # noqa: E402  (bench/ is not a package)


def shapes(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` spheres (label 0) and ``n`` cubes (label 1) of random size and centre, uint8 0/255."""
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:size].astype(np.float32)
    vols, labels = [], []
    for label in (0, 1):
        for _ in range(n):
            c = rng.uniform(size * 0.4, size * 0.6, 3)
            r = rng.uniform(size * 0.2, size * 0.4)
            if label == 0:
                inside = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
            else:
                inside = ((abs(zz - c[0]) <= r * 0.8) & (abs(yy - c[1]) <= r * 0.8)
                          & (abs(xx - c[2]) <= r * 0.8))
            vols.append(np.where(inside, 255, 0).astype(np.uint8))
            labels.append(label)
    return np.stack(vols), np.array(labels, dtype=np.uint8)[:, None]


def test_raw_voxel_relevance_by_hand() -> None:
    # Flattened and centred: a -> [1.5, -.5, -.5, -.5], 2 - a -> minus that (cosine -1),
    # b -> [0, 1, 0, -1] (cosine 0). Query a: ranking a (label 0), b (1), 2 - a (1).
    a = np.array([[[2.0, 0.0], [0.0, 0.0]]])
    b = np.array([[[0.0, 1.0], [0.0, -1.0]]])
    gal = np.stack([2.0 - a, a, b])
    labels = np.array([1, 0, 1])
    rel = volumes.raw_voxel_relevance(gal, labels, a[None], np.array([1]), k=3)
    assert rel.tolist() == [[False, True, True]]
    m = volumes.metrics(rel)
    assert m["p@1"] == 0.0
    assert m["p@10"] == pytest.approx(200 / 3)  # k = 3 ranks here
    assert m["map@10"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)  # Mahbod: over the 2 hits


def test_random_expectation_by_hand() -> None:
    # One query of class 0, gallery 0 0 0 1: P@1 = 3/4; Mahbod AP@4 averaged over the
    # four equally likely places of the one miss: (0.639 + 0.806 + 0.917 + 1) / 4 = 0.840.
    r = volumes.random_metrics(np.array([0, 0, 0, 1]), np.array([0]))
    assert r["p@1"] == r["p@10"] == 75.0
    exact = ((1 / 2 + 2 / 3 + 3 / 4) / 3 + (1 + 2 / 3 + 3 / 4) / 3 + (1 + 1 + 3 / 4) / 3 + 1) / 4
    assert r["map@10"] == pytest.approx(100 * exact, abs=1.5)


def test_product_relevance_drops_query_studies() -> None:
    queries = [volumes.Volume("q1", 1, "Q1", "S1", True), volumes.Volume("q2", 0, "Q2", "S2", True)]
    gallery = {f"G{i}": i % 2 for i in range(12)}

    def answer(uids: list[str]) -> volumes.Answer:
        return volumes.Answer(0, "", [volumes.Hit(u, 0.9, None, i + 1)
                                      for i, u in enumerate(uids)], 1.0)

    answers = [answer(["Q2", "G1", "G0", *[f"G{i}" for i in range(2, 12)]]),
               answer(["G0", "Q1"])]
    rel = volumes.product_relevance(answers, queries, gallery, {"Q1", "Q2"})
    assert rel.shape == (2, 10)
    # q1 (label 1): Q2 dropped, then G1 (1) G0 (0) G2 (0) G3 (1) ... cut at 10.
    assert rel[0].tolist() == [True, False, False, True, False, True, False, True, False, True]
    assert rel[1].tolist() == [True] + [False] * 9  # a short answer pads with misses
    with pytest.raises(volumes.BenchError, match="neither a gallery"):
        volumes.product_relevance([answer(["X"]), answer([])], queries, gallery, {"Q1", "Q2"})


@pytest.mark.dcmtk
def test_quick_bench_on_spheres_and_cubes(tmp_path: Path) -> None:
    dcmtk_tool("storescu")
    rng = np.random.default_rng(7)
    train, train_labels = shapes(12, 16, rng)
    val, val_labels = shapes(4, 16, rng)
    data = tmp_path / "shapes.npz"
    np.savez(data, train_images=train, train_labels=train_labels, val_images=val,
             val_labels=val_labels, test_images=val, test_labels=val_labels)
    out = tmp_path / "out.json"
    cmd = ["nice", "-n", "10", sys.executable, str(REPO / "bench" / "volumes.py"), "--data",
           str(data), "--gallery", "14", "--queries", "4", "--skip-b", "--associations", "1",
           "--json", str(out), "--workdir", str(tmp_path / "work")]
    # Its own session: on a timeout the bench and the sidecar serve it started go together.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the bench stops its serve and cleans up
        log, _ = proc.communicate(timeout=60)
        pytest.fail(f"bench timed out:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    a = json.loads(out.read_text())["part_a"]
    assert (a["gallery"], a["queries"], a["series"], a["instances"]) == (14, 4, 18, 18 * 16)
    # Every series embedded: every instance processed, none failed, each has vectors.
    assert a["status"]["instances"]["embedded"] == a["instances"]
    assert a["status"]["failed_retrying"] == a["status"]["failed_given_up"] == 0
    assert a["series_with_vectors"] == a["series"]
    assert a["answers_short"] == 0  # every query had 10 gallery hits after the drop
    for row in a["metrics"].values():
        assert set(row) == {"p@1", "p@10", "map@10"}
        assert all(0.0 <= v <= 100.0 for v in row.values())
    # The same volumes as the bench chose, ranked here by a plain loop.
    pick = np.random.default_rng(0)
    gi = volumes.choose(len(train), 14, pick)
    qi = volumes.choose(len(val), 4, pick)
    g = train[gi].reshape(14, -1).astype(np.float64)
    g -= g.mean(axis=1, keepdims=True)
    top1 = []
    for q in val[qi].reshape(4, -1).astype(np.float64):
        q = q - q.mean()
        cos = [float(q @ v / (np.linalg.norm(q) * np.linalg.norm(v))) for v in g]
        top1.append(train_labels[gi][int(np.argmax(cos)), 0] == val_labels[qi][len(top1), 0])
    raw = a["metrics"]["raw voxels (centred cosine)"]
    assert raw["p@1"] == pytest.approx(100 * np.mean(top1))
    rate = 100 * np.mean([np.mean(train_labels[gi, 0] == lab) for lab in val_labels[qi, 0]])
    assert a["metrics"]["random ranking (expectation)"]["p@1"] == pytest.approx(rate)
