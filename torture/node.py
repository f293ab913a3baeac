"""One ``sidecar serve`` under test: its configuration, start, SIGKILL, stop, and its checks."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SIDECAR = str(Path(sys.executable).with_name("sidecar"))
READY = "sidecar ready"


class HarnessError(RuntimeError):
    """The harness itself could not go on (a node that never became ready, a bad reply)."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1, outside the ephemeral range.

    A port the kernel hands out for ``bind(0)`` is one it also gives to outgoing
    connections: while a campaign opens thousands of them, another could take it
    before ``sidecar serve`` binds it ("Address already in use", seen once).
    """
    low, high = _ephemeral_range()
    ranges = [r for r in (range(20000, min(low, 32768)), range(high + 1, 65536)) if r]
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(rng.choice(ranges)) if ranges else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise HarnessError("no free TCP port outside the ephemeral range")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SIDECAR__") and k != "SIDECAR_CONFIG"}


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


_RUNNING: set[subprocess.Popen[bytes]] = set()


def kill_all() -> int:
    """SIGKILL every ``sidecar serve`` a node of this process started and that still runs
    (their own process groups: an interrupted campaign must not leave them behind)."""
    killed = 0
    for proc in list(_RUNNING):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
            proc.wait()
        _RUNNING.discard(proc)
    return killed


@dataclass
class Node:
    """A data directory and the ``sidecar serve`` processes run on it, one at a time."""

    root: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    ae_title: str = "SIDECAR"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    data_at: Path | None = None  # the data directory; default ``root / "data"``

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir: Path = self.data_at or self.root / "data"
        self.config_path = self.root / "sidecar.yaml"
        self.configure()

    def configure(self, **overrides: Any) -> None:
        """(Re)write the configuration: the defaults, ``self.overrides``, then ``overrides``
        (kept for later calls). Takes effect at the next start."""
        _deep_update(self.overrides, overrides)
        cfg: dict[str, Any] = {
            "dicom": {"ae_title": self.ae_title, "bind_address": "127.0.0.1", "port": self.port},
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 16, "fsync": True},
            "stability": {"stable_age": 1.0, "check_interval": 1.0},
            "worker": {"interval": 1.0},
            "logging": {"level": "INFO"},
        }
        _deep_update(cfg, copy.deepcopy(self.overrides))
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    @property
    def log_path(self) -> Path:
        return self.root / f"serve-{self.starts}.log"

    def start(self, timeout: float = 120.0) -> None:
        """Start ``sidecar serve`` in its own process group and wait until it is ready."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("the node is already running")
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [SIDECAR, "--config", str(self.config_path), "serve"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                start_new_session=True,
            )
        _RUNNING.add(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise HarnessError(f"sidecar serve exited with {self.proc.returncode} at start:\n"
                                   f"{self.tail()}")
            time.sleep(0.1)
        raise HarnessError(f"sidecar serve not ready after {timeout:.0f} s:\n{self.tail()}")

    def kill9(self) -> None:
        """SIGKILL the service and every receiver process (its whole process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        _RUNNING.discard(self.proc)
        self.proc = None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL after ``timeout``. Returns the exit status."""
        if self.proc is None:
            return 0
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise HarnessError(f"sidecar serve did not stop within {timeout:.0f} s") from None
        _RUNNING.discard(self.proc)
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def cli_json(self, *args: str, timeout: float = 300.0) -> dict[str, Any]:
        """``sidecar ARGS --json`` on this node's configuration, parsed."""
        res = subprocess.run(
            [SIDECAR, "--config", str(self.config_path), *args, "--json"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_env(), timeout=timeout,
        )
        try:
            out: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise HarnessError(f"sidecar {' '.join(args)} --json failed ({res.returncode}): "
                               f"{res.stderr[-2000:]}") from None
        out["_returncode"] = res.returncode
        return out

    def stored_files(self) -> dict[str, Path]:
        """SOP Instance UID → stored file (temporaries left out)."""
        storage = self.data_dir / "storage"
        found: dict[str, Path] = {}
        if storage.is_dir():
            for p in storage.rglob("*.dcm"):
                if ".tmp" not in p.relative_to(storage).parts:
                    found[p.name.removesuffix(".dcm")] = p
        return found

    def temporaries(self) -> list[Path]:
        """Files in the storage's temporary directory (live owners' locks left out)."""
        tmp = self.data_dir / "storage" / ".tmp"
        if not tmp.is_dir():
            return []
        return [p for p in tmp.rglob("*") if p.is_file() and p.suffix != ".lock"]
