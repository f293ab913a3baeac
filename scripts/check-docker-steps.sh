#!/usr/bin/env bash
# Replay the Dockerfile's install and run steps without Docker, in a fresh
# virtualenv under /tmp, and check that the result serves DICOM.
#
#   scripts/check-docker-steps.sh          (KEEP=1 keeps the work directory)
#
# What is replayed (the Dockerfile's numbered steps, in order):
#   build context   only the files the Dockerfile COPYs (constraints.txt,
#                   build-constraints.txt, pyproject.toml, README.md, sidecar/),
#                   copied to a scratch dir
#   virtualenv      python3.11 -m venv (the image: python:3.11-slim-bookworm;
#                   here Debian bookworm's /usr/bin/python3.11 when present)
#   step 0          pip pinned by build-constraints.txt
#   step 1          torch==2.13.0 --no-deps (the image: from PyTorch's CPU index;
#                   here plain pip, which this machine resolves to its local
#                   2.13.0+cpu wheel)
#   step 2          the runtime + postgres requirements read from pyproject.toml,
#                   pip install -c constraints.txt --build-constraint ...
#   step 3          pip install -c constraints.txt --build-constraint ... '.[postgres]' (non-editable),
#                   pip check, sidecar --version
#   runtime         SIDECAR_CONFIG / SIDECAR__STORAGE__DATA_DIR / HOME as the
#                   image's ENV, working directory = data directory, a non-root
#                   user when run as root (nobody, via setpriv), a configuration
#                   like the container's (bind 127.0.0.1 here instead of 0.0.0.0)
#   checks          sidecar check-config; sidecar serve (the image's CMD); DCMTK
#                   echoscu; the Dockerfile's HEALTHCHECK command itself; one
#                   C-STORE with storescu, embedded by the CNN; sidecar status;
#                   SIGTERM (docker stop) and a clean exit.
# The Dockerfile's step lines are checked first, so the replay cannot drift
# from the Dockerfile silently.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
# Debian's own python3.11 when there is one: an interpreter under /root (pyenv)
# cannot be run by the unprivileged user the sidecar is started as below.
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3.11
    [ -x /usr/bin/python3.11 ] && PYTHON=/usr/bin/python3.11
fi
ECHOSCU=${ECHOSCU:-/usr/bin/echoscu}
STORESCU=${STORESCU:-/usr/bin/storescu}

say() { printf 'check-docker-steps: %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

for tool in "$ECHOSCU" "$STORESCU"; do
    [ -x "$tool" ] || fail "$tool not found (apt-get install dcmtk)"
done
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found"

# ---- 0. the Dockerfile still has the steps replayed below ----
expect() {
    grep -qF -- "$1" Dockerfile || fail "Dockerfile no longer contains: $1 (update this script)"
}
expect 'FROM ${PYTHON_IMAGE} AS build'
expect 'ARG PYTHON_IMAGE=python:3.11-slim-bookworm'
expect 'RUN python -m venv /opt/sidecar'
expect 'COPY constraints.txt build-constraints.txt pyproject.toml ./'
expect 'RUN pip install -c build-constraints.txt pip'
expect 'RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0'
REQS_CMD="import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))"
expect "RUN python -c \"$REQS_CMD\" > /tmp/requirements.txt"
expect '&& pip install -c constraints.txt --build-constraint build-constraints.txt -r /tmp/requirements.txt'
expect 'COPY README.md ./'
expect 'COPY sidecar ./sidecar'
expect "RUN pip install -c constraints.txt --build-constraint build-constraints.txt '.[postgres]'"
expect '&& pip check'
expect 'SIDECAR_CONFIG=/config/sidecar.yaml'
expect 'SIDECAR__STORAGE__DATA_DIR=/data'
expect 'HOME=/data'
expect 'WORKDIR /data'
expect 'ENTRYPOINT ["sidecar"]'
expect 'CMD ["serve"]'

WORK=$(mktemp -d /tmp/sidecar-docker-steps.XXXXXX)
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
        kill -TERM "$SERVE_PID" 2>/dev/null || true
        wait "$SERVE_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
chmod 755 "$WORK"
say "work directory $WORK"

# ---- build context: only what the Dockerfile copies ----
SRC=$WORK/src
mkdir -p "$SRC"
cp constraints.txt build-constraints.txt pyproject.toml README.md "$SRC/"
cp -r sidecar "$SRC/sidecar"
find "$SRC/sidecar" -name __pycache__ -type d -prune -exec rm -rf {} +

# ---- virtualenv and the three install steps ----
VENV=$WORK/opt-sidecar
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
cd "$SRC"
say "step 0: pip pinned by build-constraints.txt"
"${PIP[@]}" install -q -c build-constraints.txt pip
say "step 1: torch==2.13.0 (CPU build), no dependencies"
"${PIP[@]}" install -q --no-deps torch==2.13.0
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
v = version("torch")
assert v.startswith("2.13.0") and "+cu" not in v, v
print(f"check-docker-steps: torch {v}")
EOF
say "step 2: pinned requirements from pyproject.toml"
"$VENV/bin/python" -c "$REQS_CMD" > "$WORK/requirements.txt"
"${PIP[@]}" install -q -c constraints.txt --build-constraint build-constraints.txt -r "$WORK/requirements.txt"
say "step 3: the package, non-editable"
"${PIP[@]}" install -q -c constraints.txt --build-constraint build-constraints.txt '.[postgres]'
"${PIP[@]}" check
"$VENV/bin/sidecar" --version
cd "$WORK"
"$VENV/bin/python" - "$SRC" <<'EOF'
import sys
from importlib.metadata import version
from pathlib import Path
import sidecar
where = Path(sidecar.__file__).resolve()
assert "site-packages" in where.parts, f"not installed into the virtualenv: {where}"
assert not where.is_relative_to(Path(sys.argv[1]).resolve()), f"editable install: {where}"
weights = list((where.parent / "embeddings" / "weights").glob("*.pt"))
assert weights, "shipped weights missing from the installed package"
assert version("torch").startswith("2.13.0"), version("torch")
print(f"check-docker-steps: installed {where.parent} (weights {weights[0].name})")
EOF

# ---- runtime: configuration and data like the container's ----
PORT=$("$VENV/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
mkdir -p "$WORK/config" "$WORK/data"
cat > "$WORK/config/sidecar.yaml" <<EOF
# Like the container's /config/sidecar.yaml; bind 127.0.0.1 here (0.0.0.0 in a container).
dicom:
  ae_title: SIDECAR
  bind_address: 127.0.0.1
  port: $PORT
  allowed_peers:
    - {ae_title: ORTHANC, host: 10.0.0.5}
  retrieve_ae_title: ORTHANC
  receiver_processes: 2
stability:
  stable_age: 1
  check_interval: 1
worker:
  interval: 1
EOF
RUN_AS=()
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
    # The image runs as an unprivileged user that owns only /data.
    chown -R 65534:65534 "$WORK/data"
    RUN_AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
    say "running the sidecar as uid 65534 (nobody), like the image's non-root user"
fi
export SIDECAR_CONFIG=$WORK/config/sidecar.yaml SIDECAR__STORAGE__DATA_DIR=$WORK/data \
    HOME=$WORK/data PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=$VENV/bin:$PATH
cd "$WORK/data"

say "sidecar check-config"
"${RUN_AS[@]}" sidecar check-config > "$WORK/effective.yaml"
grep -q "data_dir: $WORK/data" "$WORK/effective.yaml" \
    || fail "SIDECAR__STORAGE__DATA_DIR did not set the data directory"

say "sidecar serve (port $PORT)"
"${RUN_AS[@]}" sidecar serve > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
for _ in $(seq 1 240); do
    grep -q "sidecar ready" "$WORK/serve.log" && break
    kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; fail "sidecar serve exited"; }
    sleep 0.5
done
grep -q "sidecar ready" "$WORK/serve.log" || { cat "$WORK/serve.log" >&2; fail "not ready in 120 s"; }

say "echoscu"
TCP_NODELAY=1 "$ECHOSCU" -aet ORTHANC -aec SIDECAR 127.0.0.1 "$PORT" || fail "C-ECHO failed"

say "the Dockerfile's HEALTHCHECK command"
"$VENV/bin/python" - "$REPO/Dockerfile" > "$WORK/healthcheck.py" <<'EOF'
import json, re, sys
text = open(sys.argv[1], encoding="utf-8").read()
joined = re.sub(r"\\[ \t]*\n", "", text)  # Docker's line continuations
line = next(ln for ln in joined.splitlines() if ln.startswith("HEALTHCHECK "))
argv = json.loads(line[line.index("CMD ") + 4:])  # exec form: must be valid JSON
assert argv[:2] == ["python", "-c"], argv
print(argv[2])
EOF
"${RUN_AS[@]}" python "$WORK/healthcheck.py" || fail "HEALTHCHECK (C-ECHO) failed"
# ... and it fails when nothing listens.
if SIDECAR__DICOM__PORT=1 "${RUN_AS[@]}" python "$WORK/healthcheck.py" 2>/dev/null; then
    fail "HEALTHCHECK passed with nothing listening"
fi

say "storescu one CT image; wait until it is embedded"
python - "$WORK/ct.dcm" <<'EOF'
import sys
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.SOPClassUID = CTImageStorage
ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
ds.PatientID, ds.PatientName, ds.Modality, ds.StudyDate = "CHECK", "Check^Docker", "CT", "20240101"
ds.Rows = ds.Columns = 64
ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
ds.RescaleIntercept, ds.RescaleSlope = 0, 1
ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
ds.PixelData = np.random.default_rng(0).integers(-1000, 1000, (64, 64), dtype=np.int16).tobytes()
ds.save_as(sys.argv[1], enforce_file_format=True)
EOF
TCP_NODELAY=1 "$STORESCU" -aet ORTHANC -aec SIDECAR 127.0.0.1 "$PORT" "$WORK/ct.dcm" \
    || fail "C-STORE failed"
embedded=0
for _ in $(seq 1 120); do
    embedded=$("${RUN_AS[@]}" sidecar status --json 2>/dev/null \
        | python -c "import json, sys; print(json.load(sys.stdin)['instances'].get('embedded', 0))")
    [ "$embedded" = 1 ] && break
    sleep 1
done
[ "$embedded" = 1 ] || { cat "$WORK/serve.log" >&2; fail "the stored image was not embedded"; }
"${RUN_AS[@]}" sidecar status

say "SIGTERM (docker stop)"
kill -TERM "$SERVE_PID"
rc=0
wait "$SERVE_PID" || rc=$?
SERVE_PID=
[ "$rc" = 0 ] || { cat "$WORK/serve.log" >&2; fail "sidecar serve exited with $rc"; }
ls "$WORK/data" "$WORK/data/index"/* >&2
say "OK: installed from constraints.txt non-editable, check-config, serve, C-ECHO," \
    "HEALTHCHECK, C-STORE + embedding, status and a clean stop all work"
