"""Thumbnails of stored slices as the model saw them: PNG, cached on disk under a size cap.

A thumbnail is the serving embedder's input for one frame (``preprocess.prepare_named``
with its input size and channels: same windowing, same fit), as an 8-bit grey or RGB
PNG whose ``window`` text chunk names the window rule. Files live in
``thumbnails/`` under the data directory, named by a hash of what they depend on
(file path, frame, size, channels, pre-processing settings), written atomically;
beyond ``ui.thumbnail_cache_mb`` the least recently used are removed. A released
file (``storage.keep_files``) has no pixels to render from: its frames are the
previews kept when it was released (``sidecar.embeddings.previews``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from PIL import Image

from sidecar.archive.layout import preview_path
from sidecar.archive.reader import read_stored
from sidecar.config import Config
from sidecar.db.ui_queries import InstanceFile, UiQueries
from sidecar.embeddings.previews import render_png
from sidecar.files import unlink_quietly, write_durably

logger = logging.getLogger(__name__)

#: After eviction the cache holds at most this share of the cap (room to grow again).
_LOW_WATER: Final = 0.8
_MEMO: Final = 4096  # window names remembered in memory


@dataclass(frozen=True)
class Thumb:
    """A cached thumbnail: its file, ETag (the content's key) and window rule."""

    path: Path
    etag: str
    window: str


class Thumbnails:
    """Renders and caches thumbnails (see the module notes); safe across threads.

    Parameters
    ----------
    config
        Storage directory, pre-processing settings, ``ui.thumbnail_cache_mb``.
    queries
        Locates stored files by SOP Instance UID.
    shape
        The serving embedder's ``(input size, channels)``, asked at each render.
    """

    def __init__(self, config: Config, queries: UiQueries,
                 shape: Callable[[], tuple[int, int]]) -> None:
        self._cfg = config
        self._queries = queries
        self._shape = shape
        self.directory = config.data_dir / "thumbnails"
        self.cap_bytes = config.ui.thumbnail_cache_mb * 1024 * 1024
        self._settings = hashlib.sha256(
            config.preprocess.model_dump_json().encode()
        ).hexdigest()[:16]
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes in the cache, counted on first use
        self._memo: OrderedDict[str, str] = OrderedDict()

    def key(self, file_path: str, frame: int) -> str:
        """The cache key of one frame of a stored file at the current model shape."""
        size, channels = self._shape()
        text = f"{file_path}|{frame}|{size}|{channels}|{self._settings}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, sop_instance_uid: str, frame: int, *,
            files: dict[str, InstanceFile] | None = None) -> Thumb | None:
        """The thumbnail of a stored frame, rendered now if not cached.

        ``files`` is :meth:`UiQueries.instance_files` already read for a page.
        ``None`` when the instance is not stored, the frame does not exist, or
        the image cannot be rendered (logged at DEBUG: the embedding worker
        reports unusable images already).
        """
        where = (files if files is not None else
                 self._queries.instance_files([sop_instance_uid])).get(sop_instance_uid)
        if where is None or not 0 <= frame < where.frames:
            return None
        if where.released:
            return self._kept(where, sop_instance_uid, frame)
        key = self.key(where.file_path, frame)
        path = self.directory / f"{key}.png"
        window = self._cached_window(key, path)
        if window is not None:
            return Thumb(path, key, window)
        try:
            data, window = self._render(where.file_path, frame)
        except Exception as exc:  # noqa: BLE001 - any unreadable image is "no thumbnail"
            logger.debug("no thumbnail for frame %d of %s: %s", frame, where.file_path, exc)
            return None
        self._store(path, data)
        self._remember(key, window)
        return Thumb(path, key, window)

    def _kept(self, where: InstanceFile, sop: str, frame: int) -> Thumb | None:
        """The preview kept when the file was released (``None``: none kept for the frame)."""
        path = preview_path(self._cfg.previews_dir, where.study_instance_uid,
                            where.series_instance_uid, sop, frame)
        key = "kept-" + hashlib.sha256(f"{sop}|{frame}".encode()).hexdigest()[:27]
        window = self._cached_window(key, path)
        return None if window is None else Thumb(path, key, window)

    # ----------------------------------------------------------------- cache
    def _remember(self, key: str, window: str) -> None:
        with self._lock:
            self._memo[key] = window
            self._memo.move_to_end(key)
            while len(self._memo) > _MEMO:
                self._memo.popitem(last=False)

    def _cached_window(self, key: str, path: Path) -> str | None:
        try:
            os.utime(path)  # least recently *used* goes first
        except FileNotFoundError:
            return None
        except OSError:
            pass
        with self._lock:
            window = self._memo.get(key)
        if window is not None:
            return window
        try:
            with Image.open(path) as img:
                text = getattr(img, "text", {})
                window = str(text.get("window", ""))
        except (OSError, ValueError):
            return None
        self._remember(key, window)
        return window

    def _render(self, file_path: str, frame: int) -> tuple[bytes, str]:
        size, channels = self._shape()
        ds = read_stored(self._cfg.storage_dir, file_path)
        return render_png(ds, self._cfg.preprocess, size, channels, [frame])[0]

    def _store(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        total = self._count()
        try:
            old = path.stat().st_size
        except FileNotFoundError:
            old = 0
        write_durably(path, data, fsync=False)  # a cache: atomic is enough
        with self._lock:
            self._total = total + len(data) - old
            over = self._total > self.cap_bytes
        if over:
            self._evict(keep=path)

    def _count(self) -> int:
        with self._lock:
            if self._total is not None:
                return self._total
        total = 0
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".tmp"):  # left by a crash mid-write
                unlink_quietly(Path(entry.path))
            elif entry.name.endswith(".png"):
                total += entry.stat().st_size
        with self._lock:
            self._total = total
        return total

    def _evict(self, *, keep: Path) -> None:
        """Remove the least recently used thumbnails until the cache is under the low water."""
        files: list[tuple[float, int, str]] = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".png"):
                st = entry.stat()
                files.append((st.st_mtime, st.st_size, entry.path))
        files.sort()
        total = sum(size for _, size, _ in files)
        target = int(self.cap_bytes * _LOW_WATER)
        removed = 0
        for _, size, name in files:
            if total <= target:
                break
            if Path(name) == keep:
                continue
            unlink_quietly(Path(name))
            total -= size
            removed += 1
        with self._lock:
            self._total = total
        logger.debug("thumbnail cache: %d removed, %d bytes kept", removed, total)

    @property
    def size_bytes(self) -> int:
        """Bytes of thumbnails in the cache now."""
        if not self.directory.is_dir():
            return 0
        return self._count()


__all__ = ["Thumb", "Thumbnails"]
