# syntax=docker/dockerfile:1
# pacs-sidecar image: `sidecar serve` with a mounted configuration and data volume.
#
#   docker build -t pacs-sidecar .
#   docker run -d --name pacs-sidecar --restart unless-stopped --stop-timeout 60 \
#       -p 11112:11112 \
#       -v /etc/pacs-sidecar/sidecar.yaml:/config/sidecar.yaml:ro \
#       -v /srv/pacs-sidecar:/data \
#       pacs-sidecar
#
# The mounted configuration must set dicom.bind_address: 0.0.0.0 (127.0.0.1 inside
# a container is unreachable through a published port) and list the PACS under
# dicom.allowed_peers; see "Running in a container" in docs/admin-guide.md.
# scripts/check-docker-steps.sh replays these install and run steps without Docker.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

# hnswlib 0.8.0 is published as a source distribution only: it needs a C++ compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH
WORKDIR /src

COPY constraints.txt build-constraints.txt pyproject.toml ./

# 0. pip itself at the pinned version (--build-constraint needs pip >= 25.3; the
#    base image's pip is older): build-constraints.txt also pins what goes into the
#    isolated build environments (hnswlib compiles from source in step 2).
RUN pip install -c build-constraints.txt pip

# 1. torch first, the CPU build from PyTorch's own index (PyPI's Linux wheel pulls
#    several GB of CUDA libraries that a CPU-only service never uses). Its version,
#    2.13.0+cpu, satisfies the torch==2.13.0 pin of pyproject.toml and constraints.txt:
#    PEP 440 ignores the local label "+cpu" when the pin has none, so the next steps
#    keep this build. --no-deps: torch's own dependencies (filelock, sympy, ...) come
#    from PyPI in step 2, at the versions pinned in constraints.txt.
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# 2. Every other dependency, pinned by constraints.txt (the same file scripts/setup.sh
#    uses), read from pyproject.toml (runtime + the postgres extra, no dev tools) so
#    this layer is cached until the dependencies change.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt --build-constraint build-constraints.txt -r /tmp/requirements.txt

# 3. The package itself, non-editable (the code, migrations and shipped weights are
#    copied into the virtualenv; /src is not part of the image).
COPY README.md ./
COPY sidecar ./sidecar
RUN pip install -c constraints.txt --build-constraint build-constraints.txt '.[postgres]' \
    && pip check \
    && sidecar --version

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}

COPY --from=build /opt/sidecar /opt/sidecar

# SIDECAR_CONFIG: the CLI's default configuration file (sidecar/config.py CONFIG_ENV).
# SIDECAR__STORAGE__DATA_DIR: the data directory is always the /data volume (an
# environment override wins over the file; relative paths in the file would
# otherwise resolve against the read-only /config).
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_CONFIG=/config/sidecar.yaml \
    SIDECAR__STORAGE__DATA_DIR=/data \
    HOME=/data

# A fixed non-root user: a host directory mounted at /data must be writable by
# uid 10001 (chown 10001:10001 /srv/pacs-sidecar).
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin sidecar \
    && mkdir -p /data /config \
    && chown sidecar:sidecar /data

USER sidecar
WORKDIR /data
VOLUME /data

# DICOM (dicom.port) and the optional HTTP API (http.port).
EXPOSE 11112 8142

# `sidecar serve` stops cleanly on SIGTERM: receivers first, then it waits for a
# running embedding job and saves the index. Give it time (docker run --stop-timeout 60).
STOPSIGNAL SIGTERM

# Health: GET /healthz when the HTTP API is on (database, receivers, scheduler,
# index: 503 fails the check; not with http.tls, whose client certificates the
# check does not hold); otherwise a DICOM C-ECHO to our own AE title over
# loopback (dicom.allow_loopback, on by default), which proves the receivers
# accept associations; with dicom.tls on, a TCP connection to the DICOM port (it
# refuses plain DICOM; enable the HTTP API for the deeper check). Not `sidecar
# status`: it would open the catalogue and run migrations from a second process
# and says nothing about the DICOM port.
# Standard library and pynetdicom only (the image has no curl).
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python", "-c", "\
import ipaddress, sys, urllib.request\n\
from sidecar.config import load_config\n\
cfg = load_config()\n\
local = lambda a: ('::1' if ':' in a else '127.0.0.1') if ipaddress.ip_address(a).is_unspecified else a\n\
web = local(cfg.http.bind_address)\n\
web = f'[{web}]' if ':' in web else web\n\
if cfg.http.enabled and not cfg.http.tls.enabled: urllib.request.urlopen(f'http://{web}:{cfg.http.port}/healthz', timeout=10); sys.exit(0)\n\
if cfg.dicom.tls.enabled: import socket; socket.create_connection((local(cfg.dicom.bind_address), cfg.dicom.port), timeout=10).close(); sys.exit(0)\n\
from pynetdicom import AE\n\
ae = AE(ae_title='HEALTHCHECK')\n\
ae.add_requested_context('1.2.840.10008.1.1')\n\
assoc = ae.associate(local(cfg.dicom.bind_address), cfg.dicom.port, ae_title=cfg.dicom.ae_title)\n\
status = assoc.send_c_echo() if assoc.is_established else None\n\
ok = status is not None and getattr(status, 'Status', None) == 0\n\
if assoc.is_established: assoc.release()\n\
sys.exit(0 if ok else 1)\n\
"]

ENTRYPOINT ["sidecar"]
CMD ["serve"]
