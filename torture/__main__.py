"""``python -m torture {kill9,fuzz,concurrency,resources,all} [options]``: run campaigns,
print figures, exit 1 on any loss, crash or hang."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torture import concurrency, fuzz, kill9, resources
from torture.node import kill_all


def _interrupted(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the campaigns' clean-ups (nodes, mounts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torture", description=__doc__)
    parser.add_argument("campaign", choices=["kill9", "fuzz", "concurrency", "resources", "all"])
    parser.add_argument("--cycles", type=int, default=50, help="kill9 cycles (default 50)")
    parser.add_argument("--per-cycle", type=int, default=60, help="instances sent per cycle")
    parser.add_argument("--inputs", type=int, default=1000, help="fuzz: malformed datasets")
    parser.add_argument("--associations", type=int, default=8, help="concurrency: senders")
    parser.add_argument("--per-association", type=int, default=500,
                        help="concurrency: instances each association sends")
    parser.add_argument("--fs", choices=["tmpfs", "ext4"], default="tmpfs",
                        help="resources: the small filesystem to fill (mounted; needs root)")
    parser.add_argument("--fs-mib", type=int, default=64, help="resources: its size in MiB")
    parser.add_argument("--room", type=int, default=40,
                        help="resources: instances that fit before the disk is full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="working directory (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # ``timeout`` in ``make torture``
    with tempfile.TemporaryDirectory(prefix="torture-", ignore_cleanup_errors=True) as tmp:
        try:
            return _campaigns(args, args.work or Path(tmp))
        finally:
            left = kill_all()
            if left:
                print(f"torture: killed {left} sidecar serve process group(s) left running",
                      flush=True)


def _say(line: str) -> None:
    print(line, flush=True)  # progress shows in a log file as it happens


def _campaigns(args: argparse.Namespace, work: Path) -> int:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
    runs: dict[str, Callable[[], Any]] = {
        "kill9": lambda: kill9.run(work / "kill9", cycles=args.cycles,
                                   per_cycle=args.per_cycle, seed=args.seed, log=_say),
        "fuzz": lambda: fuzz.run(
            work / "fuzz", inputs=args.inputs, seed=args.seed,
            extra_seeds=sorted(shared.rglob("*.dcm"))[:200] if shared.is_dir() else [],
            log=_say),
        "concurrency": lambda: concurrency.run(
            work / "concurrency", associations=args.associations,
            per_association=args.per_association, seed=args.seed, log=_say),
        "resources": lambda: resources.run(work / "resources", mib=args.fs_mib,
                                           room=args.room, kind=args.fs, seed=args.seed,
                                           log=_say),
    }
    failed = False
    for name, campaign in runs.items():
        if args.campaign in (name, "all"):
            report = campaign()
            for line in report.lines():
                _say(line)
            failed |= not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
