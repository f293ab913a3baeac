"""The service's health checks, part by part (for ``/healthz``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from sidecar.archive.store import InstanceStore
from sidecar.dicom.node import DicomNode
from sidecar.embeddings.service import IndexService
from sidecar.service.receivers import ReceiverPool

Check = dict[str, Any]
"""One check: ``{"ok": bool, "detail": str}``."""


def database(ping: Callable[[], object]) -> Check:
    """The database answers ``ping``."""
    try:
        ping()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"ok": False, "detail": exc.__class__.__name__}
    return {"ok": True, "detail": "reachable"}


def dicom(pool: ReceiverPool | None, node: DicomNode | None) -> Check:
    """Every receiver process is alive, or the in-process node listens."""
    if pool is not None:
        alive = len(pool.pids)
        return {"ok": alive == pool.count,
                "detail": f"{alive} of {pool.count} receiver processes"}
    listening = node is not None and node.listening
    return {"ok": listening, "detail": "listening" if listening else "not listening"}


def storage(store: InstanceStore) -> Check:
    """Free disk at or above the watermark (below it every store is refused)."""
    floor = store.min_free_bytes
    try:
        free = store.free_bytes()
    except OSError as exc:
        return {"ok": False, "detail": f"cannot examine: {exc.strerror}"}
    return {"ok": free >= floor,
            "detail": f"{free // 2**20} MiB free, stores refused below "
                      f"{floor // 2**20} MiB (storage.min_free_mb)"}


def scheduler(sched: BackgroundScheduler) -> Check:
    """The scheduler runs."""
    return {"ok": bool(sched.running), "detail": "running" if sched.running else "stopped"}


def index(serving: IndexService | None) -> Check:
    """The serving index (always ok: it is loaded before the service starts)."""
    if serving is None:
        return {"ok": True, "detail": "embedding off (worker.enabled: false)"}
    return {"ok": True, "detail": f"model {serving.model_id}, {len(serving.index)} vectors"}


def report(checks: Mapping[str, Check]) -> dict[str, Any]:
    """``{"ok": bool, "checks": {name: {"ok": bool, "detail": str}}}``: ok when all are."""
    return {"ok": all(c["ok"] for c in checks.values()), "checks": dict(checks)}
