#!/usr/bin/env python3
"""House rules that neither ruff nor import-linter checks (run by `make lint`).

* No module in ``sidecar/`` over :data:`MAX_LINES` lines (``config.py`` excepted:
  one schema, defaults and help text in one place).
* A module docstring of at most :data:`MAX_DOCSTRING_LINES` lines: design prose
  and measured figures belong in ``docs/``.

Imports inside functions are ruff's PLC0415 (waived per line with ``# noqa``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 700
MAX_DOCSTRING_LINES = 25
EXCEPTED = {Path("sidecar/config.py")}


def problems(root: Path) -> list[str]:
    found: list[str] = []
    for path in sorted((root / "sidecar").rglob("*.py")):
        rel = path.relative_to(root)
        if "migrations" in rel.parts:
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_LINES and rel not in EXCEPTED:
            found.append(f"{rel}: {lines} lines (at most {MAX_LINES})")
        doc = ast.get_docstring(ast.parse(text), clean=True)
        if doc is not None and doc.count("\n") + 1 > MAX_DOCSTRING_LINES:
            found.append(
                f"{rel}: module docstring of {doc.count(chr(10)) + 1} lines "
                f"(at most {MAX_DOCSTRING_LINES}; prose goes to docs/)"
            )
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    found = problems(root)
    for line in found:
        print(line, file=sys.stderr)
    print(f"check_house: {len(found)} problem(s)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
