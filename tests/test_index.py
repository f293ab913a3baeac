"""The vector index: recall, deletes and re-adds, the exact fallback, the lock,
atomic saves and the checks made when loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.config import IndexConfig
from sidecar.embeddings.codec import (
    IndexInputError,
    VectorIndexError,
    from_blob,
    from_blobs,
    to_blob,
)
from sidecar.embeddings.index import IndexSaveError, VectorIndex
from sidecar.embeddings.index_files import IndexMismatch, labels_checksum
from sidecar.embeddings.rwlock import ReadWriteLock

REPO = Path(__file__).resolve().parent.parent
MODEL = "cnn-test-v1"


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (seeded)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def cfg(**kw: Any) -> IndexConfig:
    base: dict[str, Any] = {"m": 16, "ef_construction": 100, "ef_search": 64}
    base["initial_capacity"] = 100
    base.update(kw)
    return IndexConfig(**base)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.001)
    return pred()


@pytest.fixture(scope="module")
def big() -> tuple[VectorIndex, np.ndarray]:
    """5,000 clustered 64-d vectors, labels 10, 20, ... (not 0..n-1)."""
    x = clustered(5000, 64, 50, seed=0)
    labels = np.arange(1, 5001, dtype=np.int64) * 10
    return VectorIndex.build(labels, x, cfg(ef_construction=200), num_threads=2), x


# ------------------------------------------------------------------ blobs
def test_blob_round_trip() -> None:
    x = clustered(200, 512, 10, seed=1)
    blobs = [to_blob(v) for v in x]
    assert all(len(b) == 2 * 512 for b in blobs)
    back = np.stack([from_blob(b, 512) for b in blobs])
    assert back.dtype == np.float32
    back /= np.linalg.norm(back, axis=1, keepdims=True)
    assert np.abs(back - x).max() < 1e-3
    assert np.array_equal(from_blobs(blobs, 512), np.stack([from_blob(b, 512) for b in blobs]))
    assert from_blobs([], 8).shape == (0, 8)
    assert to_blob(np.array([1.0, -2.0], dtype=np.float64)) == b"\x00\x3c\x00\xc0"  # <f2


def test_blob_errors() -> None:
    with pytest.raises(IndexInputError, match="bytes, expected 16"):
        from_blob(b"\x00" * 10, 8)
    with pytest.raises(IndexInputError):
        from_blobs([b"\x00" * 16, b"\x00" * 14], 8)
    with pytest.raises(IndexInputError, match="not finite"):
        to_blob(np.array([1e6, 0.0]))  # overflows float16
    with pytest.raises(IndexInputError):
        to_blob(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(IndexInputError):
        to_blob(np.array([1, 2]))


# ------------------------------------------------------------ add / search
def test_recall_and_scores(big: tuple[VectorIndex, np.ndarray]) -> None:
    index, x = big
    rng = np.random.default_rng(2)
    queries = x[rng.choice(len(x), 300, replace=False)] + 0.2 * rng.standard_normal((300, 64))
    labels, scores = index.search(queries, 10)
    exact_labels, exact_scores = index.exact_search(queries, 10)
    assert labels.shape == scores.shape == (300, 10)
    assert labels.dtype == np.int64 and scores.dtype == np.float32
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, exact_labels, strict=True)])
    assert recall >= 0.98
    # scores are cosine similarities of the returned vectors, best first
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = np.einsum("qd,qkd->qk", q, x[labels // 10 - 1])
    assert np.allclose(scores, expected, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert np.allclose(exact_scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


def test_self_query_returns_itself_first(big: tuple[VectorIndex, np.ndarray]) -> None:
    index, x = big
    labels, scores = index.search(x[:200] * 3.0, 5)  # any positive scale
    assert np.array_equal(labels[:, 0], np.arange(1, 201) * 10)
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    one_l, one_s = index.search(x[7], 1)  # a single vector gives a (1, k) answer
    assert one_l.tolist() == [[80]] and one_s.shape == (1, 1)


def test_facts_and_labels(big: tuple[VectorIndex, np.ndarray]) -> None:
    index, _ = big
    facts = index.facts()
    assert (facts.dim, facts.space, facts.count, facts.deleted) == (64, "cosine", 5000, 0)
    assert (facts.m, facts.ef_construction, facts.ef_search) == (16, 200, 64)
    assert facts.capacity >= 5000 and facts.dirty
    assert len(index) == 5000 and index.dim == 64
    assert np.array_equal(index.labels(), np.arange(1, 5001) * 10)
    assert 10 in index and 11 not in index and "10" not in index


def test_empty_index_and_k_capped() -> None:
    index = VectorIndex(8, cfg())
    q = np.ones((3, 8), dtype=np.float32)
    for result in (index.search(q, 5), index.exact_search(q, 5)):
        assert result[0].shape == result[1].shape == (3, 0)
    index.add([4, 9], np.eye(8, dtype=np.float32)[:2])
    labels, scores = index.search(q, 10)
    assert labels.shape == (3, 2) and set(labels[0]) == {4, 9}
    assert index.exact_search(q, 10, allowed={9, 12345})[0].tolist() == [[9]] * 3
    assert index.exact_search(q, 10, allowed=set())[0].shape == (3, 0)


@pytest.mark.parametrize(
    ("labels", "vectors", "message"),
    [
        ([1, 2], np.ones((2, 7), np.float32), r"shape \(n, 8\)"),
        ([1, 2], np.ones((2, 8), np.int32), "floating point"),
        ([1, 2], np.full((2, 8), np.nan, np.float32), "not finite"),
        ([1, 2], np.zeros((2, 8), np.float32), "zero vector"),
        ([1, -2], np.ones((2, 8), np.float32), ">= 0"),
        ([3, 3], np.ones((2, 8), np.float32), "unique"),
        ([1.0, 2.0], np.ones((2, 8), np.float32), "integers"),
        ([1, 2, 3], np.ones((2, 8), np.float32), "3 labels but 2 vectors"),
    ],
)
def test_add_rejects_bad_input(labels: Any, vectors: np.ndarray, message: str) -> None:
    index = VectorIndex(8, cfg())
    with pytest.raises(IndexInputError, match=message):
        index.add(labels, vectors)
    assert len(index) == 0


def test_search_rejects_bad_input() -> None:
    index = VectorIndex(8, cfg())
    index.add([1], np.ones((1, 8)))
    with pytest.raises(IndexInputError, match="k must be"):
        index.search(np.ones(8), 0)
    with pytest.raises(IndexInputError, match="ef must be"):
        index.search(np.ones(8), 1, ef=0)
    with pytest.raises(IndexInputError):
        index.search(np.ones(9), 1)
    with pytest.raises(IndexInputError):
        index.mark_deleted([1.5])  # type: ignore[list-item]
    assert isinstance(IndexInputError("x"), ValueError)


def test_growth_by_resize() -> None:
    x = clustered(1000, 32, 20, seed=3)
    index = VectorIndex(32, cfg(initial_capacity=100))
    capacities = []
    for start in range(0, 1000, 37):
        index.add(np.arange(start, min(start + 37, 1000)), x[start : start + 37])
        capacities.append(index.capacity)
    assert capacities[0] == 100 and index.capacity >= 1000 and len(set(capacities)) >= 4
    assert len(index) == 1000 and index.facts().count == 1000
    labels, _ = index.search(x, 1)
    assert (labels[:, 0] == np.arange(1000)).mean() >= 0.99


def test_deleted_labels_never_returned() -> None:
    x = clustered(2000, 32, 20, seed=4)
    index = VectorIndex.build(np.arange(2000), x, cfg())
    gone = np.arange(0, 2000, 2)
    assert index.mark_deleted(gone) == 1000
    assert index.mark_deleted(list(gone[:10]) + [99999]) == 0  # already deleted / unknown
    assert len(index) == 1000 and index.facts().deleted == 1000
    labels, _ = index.search(x, 50)
    assert not np.isin(labels, gone).any()
    assert not np.isin(index.exact_search(x[:50], 50)[0], gone).any()
    assert labels.shape == (2000, 50)


def test_re_add_after_delete_is_visible() -> None:
    x = clustered(500, 16, 10, seed=5)
    index = VectorIndex.build(np.arange(500), x, cfg())
    assert index.mark_deleted({7, 8}) == 2
    assert 7 not in index.search(x[7], 10)[0]
    index.add([7, 8, 600], x[[7, 8, 9]])  # revive two, add one new
    labels, scores = index.search(x[7], 1)
    assert labels[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    facts = index.facts()
    assert (facts.count, facts.deleted, len(index)) == (501, 0, 501)
    assert index.mark_deleted([7]) == 1 and 7 not in index.exact_search(x[7], 10)[0]


def test_replacing_a_live_vector_moves_it() -> None:
    x = clustered(1000, 32, 2, seed=6, spread=0.2)  # two well separated clusters
    index = VectorIndex.build(np.arange(1000), x, cfg())
    old_neighbours = set(index.search(x[0], 10)[0][0])
    far = int(np.argmin(x @ x[0]))  # a member of the other cluster
    index.add([0], x[far] + 0.01)
    assert len(index) == 1000
    labels, scores = index.search(x[far], 11)
    assert 0 in labels[0][:2] and scores[0, 0] > 0.999
    new_neighbours = set(index.search(x[far] + 0.01, 10)[0][0])
    assert len(old_neighbours & new_neighbours) <= 1  # only label 0 itself may stay
    assert 0 not in index.search(x[1:2], 10)[0][0] or x[1] @ x[far] > 0.5


def test_search_with_other_ef_restores_default() -> None:
    x = clustered(1000, 16, 10, seed=7)
    index = VectorIndex.build(np.arange(1000), x, cfg())
    labels, _ = index.search(x[:20], 5, ef=300)
    assert np.array_equal(labels[:, 0], np.arange(20))
    assert index._raw.ef == 64


# ----------------------------------------------------------- exact fallback
def test_contiguous_fallback_after_mass_deletion() -> None:
    """With M=2 and 95 % deleted, hnswlib cannot reach every live element."""
    fallbacks = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((500, 8)).astype(np.float32)
        index = VectorIndex.build(np.arange(500), x, cfg(m=2, ef_construction=8, ef_search=8))
        keep = rng.choice(500, 25, replace=False)
        index.mark_deleted(np.setdiff1d(np.arange(500), keep))
        labels, scores = index.search(x[:40], 30)  # k > live count: capped at 25
        exact_labels, exact_scores = index.exact_search(x[:40], 30)
        assert labels.shape == (40, 25)
        assert np.array_equal(np.sort(labels, axis=1), np.sort(exact_labels, axis=1))
        assert np.allclose(scores, exact_scores, atol=1e-5)
        fallbacks += index.facts().fallbacks
    assert fallbacks >= 1  # the situation really arose


class _Refusing:
    """Wraps an hnswlib index; ``knn_query`` raises like hnswlib does."""

    def __init__(self, raw: Any, message: str) -> None:
        self.raw = raw
        self.message = message
        self.efs: list[int] = []

    def knn_query(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(self.message)

    def set_ef(self, ef: int) -> None:
        self.efs.append(ef)
        self.raw.set_ef(ef)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def test_fallback_to_exact_when_hnswlib_cannot_fill_k() -> None:
    x = clustered(300, 16, 5, seed=8)
    index = VectorIndex.build(np.arange(300), x, cfg())
    refusing = _Refusing(index._raw, "Cannot return the results in a contiguous 2D array.")
    index._raw = refusing
    labels, scores = index.search(x[:10], 20)
    exact_labels, exact_scores = index.exact_search(x[:10], 20)
    assert np.array_equal(labels, exact_labels) and np.array_equal(scores, exact_scores)
    assert refusing.efs == [] and index.facts().fallbacks == 1
    labels, _ = index.search(x[:1], 5, ef=20)
    assert refusing.efs == [20, 64]  # a custom ef is set, then the default restored
    assert np.array_equal(labels, exact_labels[:1, :5]) and index.facts().fallbacks == 2
    refusing.message = "something else"
    with pytest.raises(VectorIndexError, match="something else"):
        index.search(x[:1], 5)
    assert index._lock.state() == (0, False, 0)


# -------------------------------------------------------------------- lock
def test_rwlock_readers_share_writer_excludes() -> None:
    lock = ReadWriteLock()
    assert lock.acquire_read(timeout=0) and lock.acquire_read(timeout=0)
    assert not lock.acquire_write(timeout=0)
    lock.release_read()
    lock.release_read()
    assert lock.acquire_write(timeout=0)
    assert not lock.acquire_read(timeout=0) and not lock.acquire_write(timeout=0)
    lock.release_write()
    assert lock.state() == (0, False, 0)
    with pytest.raises(RuntimeError):
        lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_write()


def test_rwlock_prefers_waiting_writer() -> None:
    lock = ReadWriteLock()
    order: list[str] = []
    lock.acquire_read()

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("reader")

    w = threading.Thread(target=writer)
    w.start()
    assert wait_until(lambda: lock.state()[2] == 1)  # the writer waits for our read hold
    assert not lock.acquire_read(timeout=0)  # a new reader must queue behind it
    r = threading.Thread(target=late_reader)
    r.start()
    lock.release_read()
    w.join(5)
    r.join(5)
    assert order == ["writer", "reader"]
    assert lock.state() == (0, False, 0)


def test_rwlock_timed_out_writer_lets_readers_in() -> None:
    lock = ReadWriteLock()
    lock.acquire_read()
    assert not lock.acquire_write(timeout=0.01)
    assert lock.acquire_read(timeout=0)
    lock.release_read()
    lock.release_read()


_READS = {"knn_query", "get_items", "save_index", "get_ids_list", "get_max_elements"}
_WRITES = {"add_items", "resize_index", "mark_deleted", "unmark_deleted", "set_ef"}


class _OverlapProbe:
    """Wraps an hnswlib index and records any call that overlaps a write."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._mu = threading.Lock()
        self.readers = 0
        self.writers = 0
        self.violations: list[str] = []
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._raw, name)
        if name not in _READS | _WRITES:
            return attr
        write = name in _WRITES

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self._mu:
                self.calls[name] += 1
                if self.writers or (write and self.readers):
                    self.violations.append(name)
                if write:
                    self.writers += 1
                else:
                    self.readers += 1
            try:
                return attr(*args, **kwargs)
            finally:
                with self._mu:
                    if write:
                        self.writers -= 1
                    else:
                        self.readers -= 1

        return wrapped


def _concurrent_workload(index: VectorIndex, x: np.ndarray, readers: int = 4) -> list[str]:
    """A writer adds (growing the index 100 -> 1600 slots) and deletes while
    readers search; returns the problems the readers saw."""
    problems: list[str] = []
    added = frozenset(index.labels().tolist())
    deleted: frozenset[int] = frozenset()
    done = threading.Event()
    n = len(x)

    def writer() -> None:
        nonlocal added, deleted
        try:
            for start in range(0, n, 40):
                batch = np.arange(start, min(start + 40, n))
                added = added | set(batch.tolist())  # published before the add
                index.add(batch, x[batch])
                if start and start % 200 == 0:
                    gone = np.arange(start - 200, start - 190)
                    index.mark_deleted(gone)
                    deleted = deleted | set(gone.tolist())  # published after the delete
        except Exception as exc:  # pragma: no cover - reported below
            problems.append(f"writer: {exc!r}")
        finally:
            done.set()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        i = 0
        while i < 5000 and (i < 20 or not done.is_set()):
            i += 1
            gone_before = deleted
            q = x[rng.integers(0, n)]
            try:
                if i % 10 == 0:
                    labels, scores = index.exact_search(q, 10)
                else:
                    labels, scores = index.search(q, 10)
            except Exception as exc:
                problems.append(f"reader: {exc!r}")
                return
            got = set(labels[0].tolist())
            if not got <= added:
                problems.append(f"labels never added: {sorted(got - added)[:5]}")
            if got & gone_before:
                problems.append(f"deleted labels returned: {sorted(got & gone_before)}")
            s = scores[0]
            if not (np.isfinite(s).all() and (np.abs(s) <= 1.0001).all()):
                problems.append(f"bad scores {s}")
            if (np.diff(s) > 1e-6).any():
                problems.append(f"scores not sorted {s}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    problems.extend(f"thread {t.name} still running" for t in threads if t.is_alive())
    return problems


def test_concurrent_search_during_add_and_resize() -> None:
    x = clustered(1500, 32, 15, seed=9)
    index = VectorIndex(32, cfg(initial_capacity=100))
    index.add([0], x[:1])
    probe = _OverlapProbe(index._raw)
    index._raw = probe
    problems = _concurrent_workload(index, x)
    assert problems == []
    assert probe.violations == []
    assert probe.calls["resize_index"] == 4 and probe.calls["knn_query"] >= 80
    assert len(index) == 1500 - 70 and index.capacity == 1600


class _NoLock(ReadWriteLock):
    """A lock that does not lock (to show the checks above can fail)."""

    def acquire_read(self, timeout: float | None = None) -> bool:
        return True

    def release_read(self) -> None:
        pass

    def acquire_write(self, timeout: float | None = None) -> bool:
        return True

    def release_write(self) -> None:
        pass


def unlocked_main() -> None:
    """Run the concurrent workload without the lock; print what was seen."""
    x = clustered(1500, 32, 15, seed=9)
    index = VectorIndex(32, cfg(initial_capacity=100))
    index.add([0], x[:1])
    probe = _OverlapProbe(index._raw)
    index._raw = probe
    index._lock = _NoLock()
    problems = _concurrent_workload(index, x, readers=4)
    print(f"violations={len(probe.violations)} problems={len(problems)}", flush=True)


def test_workload_without_lock_is_caught() -> None:
    """The same workload without the lock overlaps hnswlib calls (or crashes)."""
    code = "import tests.test_index as t; t.unlocked_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONFAULTHANDLER": "0"},
    )
    crashed = proc.returncode != 0
    assert crashed or "violations=0 " not in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------- save / load
def _saved(tmp_path: Path, n: int = 600, dim: int = 24) -> tuple[VectorIndex, np.ndarray, Path]:
    x = clustered(n, dim, 12, seed=10)
    index = VectorIndex.build(np.arange(n) + 1000, x, cfg())
    index.mark_deleted(np.arange(1000, 1000 + n, 7))
    directory = tmp_path / "index"
    index.save(directory, MODEL)
    return index, x, directory


def _load(directory: Path, **kw: Any) -> VectorIndex:
    args: dict[str, Any] = {"expected_model_id": MODEL, "expected_dim": 24, "cfg": cfg()}
    args.update(kw)
    return VectorIndex.load(directory, **args)


def _bin(directory: Path) -> Path:
    name: str = json.loads((directory / "index.json").read_text())["index_file"]
    return directory / name


def test_save_load_round_trip(tmp_path: Path) -> None:
    index, x, directory = _saved(tmp_path)
    assert not index.dirty
    loaded = _load(directory)
    assert not loaded.dirty
    assert np.array_equal(loaded.labels(), index.labels())
    a, b = index.search(x, 10), loaded.search(x, 10)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert loaded.facts() == index.facts()
    facts = json.loads((directory / "index.json").read_text())
    assert facts["model_id"] == MODEL and facts["dim"] == 24 and facts["space"] == "cosine"
    assert (facts["count"], facts["deleted"]) == (len(index), 600 - len(index))
    assert facts["labels_sha256"] == labels_checksum(index.labels().tolist())
    assert facts["saved_at"].endswith("+00:00") and facts["format_version"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["index-000001.bin", "index.json"]
    # a deleted label can be revived after a load; the index keeps working
    loaded.add([1000], x[0])
    assert loaded.dirty and loaded.search(x[0], 1)[0][0, 0] == 1000


def test_later_saves_replace_earlier_files(tmp_path: Path) -> None:
    index, x, directory = _saved(tmp_path)
    index.add([5], x[0])
    index.save(directory, MODEL)
    index.save(directory, MODEL)
    assert sorted(p.name for p in directory.iterdir()) == ["index-000003.bin", "index.json"]
    assert 5 in _load(directory)


def _flip_byte(directory: Path) -> None:
    path = _bin(directory)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_facts(**changes: Any) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "index.json"
        facts = json.loads(path.read_text())
        facts.update(changes)
        path.write_text(json.dumps(facts))

    return edit


@pytest.mark.parametrize(
    ("damage", "load_args", "reason"),
    [
        (lambda d: (d / "index.json").unlink(), {}, "index.json is missing"),
        (lambda d: _bin(d).unlink(), {}, r"index-000001.bin is missing"),
        (_flip_byte, {}, "SHA-256 of index-000001.bin does not match"),
        (lambda d: None, {"expected_model_id": "other"}, "model id 'cnn-test-v1'"),
        (lambda d: None, {"expected_dim": 32}, "dim 24, expected 32"),
        (lambda d: None, {"cfg": cfg(m=32)}, "built with m=16"),
        (lambda d: (d / "index.json").write_text("{"), {}, "not valid JSON"),
        (_edit_facts(count="x"), {}, "field 'count' missing or not int"),
        (_edit_facts(index_file="../x.bin"), {}, "invalid index file name"),
        (_edit_facts(format_version=2), {}, "format version 2"),
        (_edit_facts(labels_sha256="0" * 64), {}, "live labels"),
        (_edit_facts(count=1, deleted=0), {}, "holds 600 elements"),
    ],
)
def test_load_detects_mismatch(
    tmp_path: Path, damage: Callable[[Path], None], load_args: dict[str, Any], reason: str
) -> None:
    _, _, directory = _saved(tmp_path)
    damage(directory)
    with pytest.raises(IndexMismatch, match=reason) as info:
        _load(directory, **load_args)
    assert info.value.directory == directory


def test_load_of_empty_directory_and_first_save_crash(tmp_path: Path) -> None:
    with pytest.raises(IndexMismatch, match="missing"):
        _load(tmp_path / "nowhere")
    directory = tmp_path / "index"
    directory.mkdir()
    (directory / "index.bin.tmp").write_bytes(b"partial")  # crash during the first save
    (directory / "index-000001.bin.tmp").write_bytes(b"partial")
    with pytest.raises(IndexMismatch, match="index.json is missing"):
        _load(directory)


class _Crash(BaseException):
    """Stands for the process dying at that point."""


def _save_with_crash(
    monkeypatch: pytest.MonkeyPatch, index: VectorIndex, directory: Path, step: int | None
) -> list[str]:
    """Save, dying just before the ``step``-th rename or fsync (``None``: never)."""
    log: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync

    def check(what: str) -> None:
        if step == len(log):
            raise _Crash(what)
        log.append(what)

    def replace(src: Any, dst: Any) -> None:
        check(f"replace {Path(dst).name}")
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        check("fsync")
        real_fsync(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        m.setattr(os, "fsync", fsync)
        if step is None:
            index.save(directory, MODEL)
        else:
            with pytest.raises(_Crash):
                index.save(directory, MODEL)
    return log


def test_crash_at_any_step_of_a_save_leaves_a_loadable_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, x, directory = _saved(tmp_path)
    old_labels = index.labels()
    index.add(np.arange(5000, 5050), x[:50])
    index.mark_deleted([1001, 1002])
    new_labels = index.labels()
    steps = _save_with_crash(monkeypatch, index, tmp_path / "scratch", None)
    assert steps == [
        "fsync",
        "replace index-000001.bin",
        "fsync",
        "fsync",
        "replace index.json",
        "fsync",
    ]
    for step in range(len(steps)):
        crashed = tmp_path / f"crash{step}"
        crashed.mkdir()
        for f in directory.iterdir():
            (crashed / f.name).write_bytes(f.read_bytes())
        index._saved_generation = -1  # dirty again
        _save_with_crash(monkeypatch, index, crashed, step)
        assert index.dirty
        committed = "replace index.json" in steps[:step]
        loaded = _load(crashed)
        assert np.array_equal(loaded.labels(), new_labels if committed else old_labels)
        index.save(crashed, MODEL)  # the next save removes what the crash left
        assert sorted(p.name for p in crashed.iterdir()) == ["index-000003.bin", "index.json"]
        assert np.array_equal(_load(crashed).labels(), new_labels)


def test_save_failure_is_a_domain_error(tmp_path: Path) -> None:
    index = VectorIndex(4, cfg())
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(IndexSaveError):
        index.save(tmp_path / "file", MODEL)


def test_empty_index_round_trip(tmp_path: Path) -> None:
    index = VectorIndex(24, cfg())
    index.save(tmp_path, MODEL)
    loaded = _load(tmp_path)
    assert len(loaded) == 0 and loaded.search(np.ones(24), 3)[0].shape == (1, 0)


# ------------------------------------------------------------------ repair
def test_verify_against_database() -> None:
    x = clustered(100, 8, 4, seed=11)
    index = VectorIndex.build(np.arange(100), x, cfg())
    index.mark_deleted([5, 6])
    missing, extra = index.verify_against(list(range(3, 103)) + [5])
    assert missing == {5, 6, 100, 101, 102}
    assert extra == {0, 1, 2}
    index.add(sorted(missing), x[:5])
    index.mark_deleted(sorted(extra))
    assert index.verify_against(set(range(3, 103))) == (set(), set())
    assert index.verify_against(np.arange(4, 103)) == (set(), {3})
