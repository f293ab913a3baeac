#!/usr/bin/env bash
# Set up everything pacs-sidecar needs on a fresh Debian machine, idempotently.
#   scripts/setup.sh            runtime: virtualenv + pinned Python dependencies
#   scripts/setup.sh --test     also the test/benchmark tools (DCMTK) via apt when root
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

VENV=${VENV:-.venv}
STAMP="$VENV/.installed"

# ---- system packages (tests and benchmarks drive real DICOM clients) ----
if [ "$want_test" = 1 ] && [ ! -x /usr/bin/storescu ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing DCMTK (apt)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
    else
        echo "setup: DCMTK not found and not root: tests that need it will be skipped" >&2
    fi
fi

# ---- Python virtualenv with pinned dependencies ----
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    for cand in python3.11 python3.12 python3; do
        if command -v "$cand" >/dev/null; then PYTHON=$cand; break; fi
    done
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ]; then
    echo "setup: installing Python dependencies (first time: a few minutes, hnswlib compiles)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev,postgres]'
    touch "$STAMP"
fi
