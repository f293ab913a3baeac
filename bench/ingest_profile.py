"""Where one C-STORE's time goes in the sidecar: ``bench/ingest.py --profile``.

An in-process ``DicomNode`` (pynetdicom) with the real ``InstanceStore`` (fsync
on, SQLite) receives ``--count`` generated 0.5 MB CT instances from DCMTK
``storescu`` over loopback (``TCP_NODELAY=1``, 128 KiB PDUs, one association).
Each stage of each instance is timed by wrapping the function that does it
(this script only; nothing in the product is changed):

* receive: from the first P-DATA PDU of the request to the C-STORE handler
  (pynetdicom's reading, PDU decoding and fragment assembly, plus its reactor
  hand-off);
* parse: ``read_header`` and ``extract_meta``; lookup: the duplicate and
  rejection query; hash: SHA-256;
* write: writing the temporary file; fsync file; link + fsync directory;
* commit: the catalogue transaction (its statements and SQLite's commit, whose
  WAL fsync is most of it);
* handler, other: the rest of the handler (status dataset, counters);
* respond: from the handler's return to the next request's first PDU (sending
  the response and storescu's turn-around).

Prints the median and mean of each stage in milliseconds and its share.
"""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import evt

import sidecar.archive.store as store_mod
from sidecar.archive.store import InstanceStore
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.db.repository import Repository
from sidecar.dicom.node import DicomNode

_STAGES = ("receive", "parse", "lookup", "hash", "write", "fsync file", "link + fsync dir",
           "commit", "handler, other", "respond")


class _Clock:
    """Per-instance stage times, filled by the wrappers (one association: one thread)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.done: list[dict[str, float]] = []
        self.first_pdu: float | None = None
        self.handler_start = 0.0
        self.handler_end: float | None = None
        self.lock = threading.Lock()

        self.stack: list[list[Any]] = []  # [stage, time spent in nested wrapped calls]

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as ``stage``, exclusive of the wrapped calls it makes; an fsync
        inside another stage than ``write`` belongs to that stage (the directory's)."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = stage
            if stage == "fsync file" and self.stack and self.stack[-1][0] != "write":
                name = self.stack[-1][0]
            self.stack.append([name, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                _, nested = self.stack.pop()
                self.current[name] += elapsed - nested
                if self.stack:
                    self.stack[-1][1] += elapsed
        return timed


def _patch(clock: _Clock) -> Callable[[], None]:
    """Wrap the stages' functions; returns the undo."""
    saved: list[tuple[Any, str, Any]] = []

    def put(owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, clock.wrap(stage, original))

    put(store_mod, "read_header", "parse")
    put(store_mod, "extract_meta", "parse")
    put(Repository, "lookup", "lookup")
    put(Repository, "record_instance", "commit")
    real_sha = hashlib.sha256
    saved.append((store_mod.hashlib, "sha256", real_sha))
    store_mod.hashlib.sha256 = clock.wrap("hash", real_sha)  # type: ignore[assignment]
    put(store_mod, "write_new", "write")
    put(store_mod, "fsync_dir", "link + fsync dir")
    real_fsync = store_mod.os.fsync
    saved.append((store_mod.os, "fsync", real_fsync))
    store_mod.os.fsync = clock.wrap("fsync file", real_fsync)  # type: ignore[assignment]
    real_link = store_mod.os.link
    saved.append((store_mod.os, "link", real_link))
    store_mod.os.link = clock.wrap("link + fsync dir", real_link)  # type: ignore[assignment]

    def undo() -> None:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
    return undo


def run_profile(count: int, storescu: Path, files: list[Path], env: dict[str, str],
                log: Callable[[str], None]) -> int:
    """Profile ``count`` stores of ``files``; prints the table; returns 0."""
    clock = _Clock()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-profile-") as tmp:
        cfg = Config.model_validate({
            "dicom": {"ae_title": "PROFILE", "bind_address": "127.0.0.1", "port": 104},
            "storage": {"data_dir": tmp, "min_free_mb": 16, "fsync": True},
        })
        engine, repo = open_catalogue(cfg)
        store = InstanceStore(cfg, repo)
        node = DicomNode(cfg, store)
        real_handle = node.handle_store

        def handle(event: Any) -> Any:
            t0 = time.perf_counter()
            with clock.lock:
                if clock.first_pdu is not None:
                    clock.current["receive"] = t0 - clock.first_pdu
                    clock.first_pdu = None
            result = real_handle(event)
            t1 = time.perf_counter()
            inner = sum(v for k, v in clock.current.items() if k not in ("receive", "respond"))
            clock.current["handler, other"] = max(0.0, (t1 - t0) - inner)
            clock.handler_end = t1
            return result

        def on_pdu(event: Any) -> None:
            if type(event.pdu).__name__ != "P_DATA_TF":
                return
            now = time.perf_counter()
            with clock.lock:
                if clock.first_pdu is None:
                    if clock.handler_end is not None:  # the previous instance ends here
                        clock.current["respond"] = now - clock.handler_end
                        clock.done.append(dict(clock.current))
                        clock.current = defaultdict(float)
                        clock.handler_end = None
                    clock.first_pdu = now

        undo = _patch(clock)
        try:
            node.handle_store = handle  # type: ignore[method-assign]
            handlers = [*node.handlers(), (evt.EVT_PDU_RECV, on_pdu)]
            server = node.ae.start_server(("127.0.0.1", 0), block=False,
                                          evt_handlers=handlers)
            port = server.server_address[1]
            chosen = files[:count]
            t0 = time.perf_counter()
            subprocess.run([str(storescu), "--max-send-pdu", "131072", "-aet", "PROFSCU",
                            "-aec", "PROFILE", "127.0.0.1", str(port), *map(str, chosen)],
                           check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=600)
            wall = time.perf_counter() - t0
            server.shutdown()
        finally:
            undo()
            engine.dispose()
    rows = clock.done[5:]  # the first few warm up caches and the connection pool
    if not rows:
        log("profile: too few instances to report")
        return 1
    per = sum(sum(r.values()) for r in rows) / len(rows)
    log(f"profile: {len(chosen)} instances on one association in {wall:.2f} s "
        f"({len(chosen) / wall:.1f} inst/s); {len(rows)} profiled, "
        f"{per * 1000:.2f} ms per instance in total")
    log(f"  {'stage':<18} {'median ms':>9} {'mean ms':>8} {'share':>6}")
    for stage in _STAGES:
        values = [r.get(stage, 0.0) for r in rows]
        mean = statistics.fmean(values)
        log(f"  {stage:<18} {statistics.median(values) * 1000:9.3f} {mean * 1000:8.3f} "
            f"{100 * mean / per:5.1f}%")
    return 0


__all__ = ["run_profile"]
