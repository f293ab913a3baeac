"""walk_files: the one folder walker of ingest, train and verify."""

from __future__ import annotations

from pathlib import Path

from sidecar.files import walk_files


def test_walk_files_sorted_depth_first_with_files_and_skips(tmp_path: Path) -> None:
    for rel in ("b/2", "b/1", "a/z/9", "a/y", "c/.tmp/x", "c/k", "top"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    single = tmp_path / "top"
    got = [p.relative_to(tmp_path).as_posix()
           for p in walk_files([single, tmp_path / "b", tmp_path / "a"])]
    assert got == ["top", "b/1", "b/2", "a/y", "a/z/9"]
    got = [p.relative_to(tmp_path).as_posix()
           for p in walk_files([tmp_path], skip={tmp_path / "c" / ".tmp"})]
    assert got == ["top", "a/y", "a/z/9", "b/1", "b/2", "c/k"]
    assert "c/.tmp/x" in [p.relative_to(tmp_path).as_posix() for p in walk_files([tmp_path])]
