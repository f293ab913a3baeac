#!/usr/bin/env bash
# Set up everything pacs-sidecar needs on a fresh Debian machine, idempotently.
#   scripts/setup.sh            runtime: virtualenv + pinned Python dependencies
#   scripts/setup.sh --test     also the test/benchmark/demo tools (DCMTK, Orthanc) via apt when root
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

VENV=${VENV:-.venv}
STAMP="$VENV/.installed"

# ---- system packages (tests, benchmarks and the demo drive real DICOM programs) ----
if [ "$want_test" = 1 ]; then
    missing=()
    [ -x /usr/bin/storescu ] || missing+=(dcmtk)
    [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
    command -v openssl >/dev/null || missing+=(openssl)  # tests/test_tls.py's certificates
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing ${missing[*]} (apt)" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
            # Only the binary is used (tests and demo run their own Orthanc on free
            # ports); the package's service would hold 8042, the sidecar's HTTP port.
            if [[ " ${missing[*]} " == *" orthanc "* ]] && command -v systemctl >/dev/null \
                    && systemctl is-active --quiet orthanc 2>/dev/null; then
                echo "setup: stopping and disabling the orthanc system service" >&2
                systemctl disable --now orthanc >/dev/null 2>&1 || true
            fi
        else
            echo "setup: ${missing[*]} not found and not root: tests that need them will be skipped" >&2
        fi
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
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ] \
        || [ build-constraints.txt -nt "$STAMP" ]; then
    echo "setup: installing Python dependencies (first time: a few minutes, hnswlib compiles)" >&2
    # pip itself and the build environments (hnswlib compiles from source) are
    # pinned too, in build-constraints.txt.
    "$VENV/bin/python" -m pip install -q -c build-constraints.txt pip
    "$VENV/bin/python" -m pip install -q -c constraints.txt --build-constraint build-constraints.txt \
        -e '.[dev,postgres]'
    touch "$STAMP"
fi
