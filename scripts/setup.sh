#!/usr/bin/env bash
# Set up everything pacs-sidecar needs on a fresh Debian/Ubuntu machine, idempotently.
#   scripts/setup.sh            runtime (`make run`): virtualenv + pinned Python dependencies,
#                               and, when root, the Debian packages they and the quick start
#                               need: g++ and python3-dev (hnswlib compiles from source),
#                               python3-venv, dcmtk (echoscu/storescu)
#   scripts/setup.sh --test     (`make test`, `make demo`, benchmarks) also orthanc, openssl,
#                               postgresql (the throwaway server on which the catalogue
#                               tests run a second time, tests/conftest.py) and
#                               chromium + chromium-driver (tests/test_ui.py's browser),
#                               orthanc-python (the Orthanc Explorer integration's tests)
# Not root: nothing is installed with apt; what is missing is named (the virtualenv
# cannot be built without the first three; tests that need the others skip).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

VENV=${VENV:-.venv}
STAMP="$VENV/.installed"
stale() {  # the pinned Python dependencies need (re)installing
    [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ] \
        || [ build-constraints.txt -nt "$STAMP" ]
}

# ---- which Python ----
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    for cand in python3.11 python3.12 python3; do
        if command -v "$cand" >/dev/null; then PYTHON=$cand; break; fi
    done
fi

# ---- system packages (Debian names) ----
missing=()
if [ -z "$PYTHON" ]; then
    missing+=(python3 python3-venv python3-dev g++)
    PYTHON=python3
elif stale; then
    # Building the virtualenv: venv + ensurepip, and a C++ compiler with Python's
    # headers for hnswlib (a source distribution only).
    "$PYTHON" -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
    "$PYTHON" -c "import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
        || missing+=(python3-dev)
    command -v g++ >/dev/null || missing+=(g++)
fi
{ [ -x /usr/bin/echoscu ] && [ -x /usr/bin/storescu ]; } || missing+=(dcmtk)  # the quick start's client
if [ "$want_test" = 1 ]; then
    [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)                # tests/test_orthanc.py, make demo
    [ -e /usr/share/orthanc/plugins/libOrthancPython.so ] || missing+=(orthanc-python)  # tests/test_orthanc_explorer.py
    command -v openssl >/dev/null || missing+=(openssl)           # tests/test_tls.py's certificates
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)  # tests/conftest.py pg_server
    [ -x /usr/bin/chromium ] || missing+=(chromium)               # tests/test_ui.py (browser)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)    # tests/test_ui.py (Selenium)
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing ${missing[*]} (apt)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        # Only the programs are used: the tests and the demo run their own Orthanc
        # and PostgreSQL on free ports. Stop the system services the packages
        # just started (Orthanc's would hold 4242 and 8042, PostgreSQL's 5432).
        for svc in orthanc postgresql; do
            if [[ " ${missing[*]} " == *" $svc "* ]] && command -v systemctl >/dev/null \
                    && systemctl is-active --quiet "$svc" 2>/dev/null; then
                echo "setup: stopping and disabling the $svc system service" >&2
                systemctl disable --now "$svc" >/dev/null 2>&1 || true
            fi
        done
    else
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: not root, so not installed; as root: apt-get install ${missing[*]}" >&2
        echo "setup: (without g++, python3-dev or python3-venv the virtualenv cannot be built;" >&2
        echo "setup:  without dcmtk, orthanc, openssl or postgresql the tests that need them skip)" >&2
    fi
fi

# ---- Python virtualenv with pinned dependencies ----
command -v "$PYTHON" >/dev/null || { echo "setup: no python3 (3.11 or 3.12) found" >&2; exit 1; }
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    # also after a first try without python3-venv, which leaves a virtualenv without pip
    echo "setup: creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv --clear "$VENV"
fi
if stale; then
    echo "setup: installing Python dependencies (first time: a few minutes, hnswlib compiles)" >&2
    # pip itself and the build environments (hnswlib compiles from source) are
    # pinned too, in build-constraints.txt.
    "$VENV/bin/python" -m pip install -q -c build-constraints.txt pip
    "$VENV/bin/python" -m pip install -q -c constraints.txt --build-constraint build-constraints.txt \
        -e '.[dev,postgres]'
    touch "$STAMP"
fi
