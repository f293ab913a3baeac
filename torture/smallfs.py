"""A small filesystem the harness mounts and removes: a size-limited tmpfs, or a loop-mounted
ext4 image, so that a campaign can fill a disk for real without touching the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

FsKind = Literal["tmpfs", "ext4"]


class MountUnavailable(RuntimeError):
    """The small filesystem could not be mounted (not root, no CAP_SYS_ADMIN, no loop device)."""


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)


def _mount_cmd(kind: FsKind, mib: int, where: Path, image: Path) -> list[str]:
    if kind == "tmpfs":
        return ["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs", str(where)]
    with image.open("wb") as fh:
        fh.truncate(mib * 2**20)
    made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    if made.returncode != 0:
        raise MountUnavailable(f"mkfs.ext4 failed: {made.stderr.strip() or made.returncode}")
    return ["mount", "-o", "loop", str(image), str(where)]


@contextmanager
def small_filesystem(where: Path, mib: int, kind: FsKind = "tmpfs") -> Iterator[Path]:
    """Mount a ``mib`` MiB filesystem at ``where`` (made if need be) for the ``with`` block;
    unmount it and remove what was made afterwards.

    Raises
    ------
    MountUnavailable
        Mounting is not permitted here or failed; nothing is left behind.
    """
    if shutil.which("mount") is None:
        raise MountUnavailable("no mount command")
    where.mkdir(parents=True, exist_ok=True)
    image = where.with_name(where.name + ".img")
    try:
        if os.geteuid() != 0:
            raise MountUnavailable(f"not root (mounting a {kind} needs root or CAP_SYS_ADMIN)")
        cmd = _mount_cmd(kind, mib, where, image)
        done = _run(*cmd)
        if done.returncode != 0:
            raise MountUnavailable(f"{' '.join(cmd[:3])} ... failed: "
                                   f"{done.stderr.strip() or done.returncode}")
    except BaseException:
        image.unlink(missing_ok=True)
        where.rmdir()
        raise
    try:
        yield where
    finally:
        if _run("umount", str(where)).returncode != 0:
            _run("umount", "-l", str(where))  # something still holds it: detach lazily
        image.unlink(missing_ok=True)
        try:
            where.rmdir()
        except OSError:
            pass
