"""Deleting a study removes its files, rows and vectors; the index drops its labels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sidecar.archive.store import InstanceStore, Origin
from sidecar.cli.main import main
from sidecar.config import Config
from sidecar.db.connect import open_catalogue
from sidecar.db.models import Instance, Patient, SliceVector, Study
from sidecar.embeddings.model import TinyEmbedder
from sidecar.service.lifecycle import Embedding
from tests.conftest import make_ct, part10

pytestmark = [pytest.mark.usefixtures("cli_isolation"),
              pytest.mark.catalogue]  # on SQLite and PostgreSQL (tests/conftest.py)


def _store(cfg: Config, n: int, patient: str) -> str:
    engine, repo = open_catalogue(cfg)
    try:
        store = InstanceStore(cfg, repo)
        study, series = generate_uid(), generate_uid()
        for i in range(n):
            ds = make_ct(study_uid=study, series_uid=series, instance_number=i + 1, seed=i,
                         patient_id=patient)
            store.store(part10(ds), None, Origin("TEST", "127.0.0.1"))
        repo.mark_stable_studies(0.0)
    finally:
        engine.dispose()
    return study


def _count(cfg: Config, model: type) -> int:
    engine, _ = open_catalogue(cfg)
    try:
        with Session(engine) as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        engine.dispose()


def test_delete_study_everywhere(config_factory: Callable[..., Config], tmp_path: Path) -> None:
    cfg = config_factory({"preprocess": {"slice_spacing_mm": 0}})
    gone = _store(cfg, 5, "P1")
    kept = _store(cfg, 3, "P2")
    engine, _ = open_catalogue(cfg)
    emb = Embedding(cfg, engine, TinyEmbedder())
    emb.open()  # this process owns the index, like a running `sidecar serve`
    try:
        emb.run_job()
        assert len(emb.serving.index) == 8
        cfg_file = tmp_path / "sidecar.yaml"
        result = CliRunner().invoke(
            main, ["--config", str(cfg_file), "delete-study", "--yes", gone],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        assert "5 instances, 5 files" in result.output
        # Rows and vectors are gone at once; the other study is untouched.
        assert _count(cfg, Study) == 1 and _count(cfg, Instance) == 3
        assert _count(cfg, SliceVector) == 3 and _count(cfg, Patient) == 1
        assert not (cfg.storage_dir / gone).exists()
        assert len(list((cfg.storage_dir / kept).rglob("*.dcm"))) == 3
        # The running service's index drops the labels at its next maintenance.
        assert len(emb.serving.index) == 8
        emb.maintain()
        assert len(emb.serving.index) == 3
        labels, _ = emb.serving.index.search(
            TinyEmbedder().embed(np.zeros((1, 64, 64), np.float32)), 10
        )
        with Session(engine) as s:
            studies = set(s.scalars(
                select(Study.study_instance_uid).join(
                    SliceVector, SliceVector.study_pk == Study.id
                ).where(SliceVector.id.in_([int(x) for x in labels[0]]))
            ))
        assert studies == {kept}
    finally:
        emb.close()
        engine.dispose()


def test_delete_unknown_study_is_an_error(
    config_factory: Callable[..., Config], tmp_path: Path
) -> None:
    config_factory()
    result = CliRunner().invoke(
        main, ["--config", str(tmp_path / "sidecar.yaml"), "delete-study", "--yes", "1.2.3"]
    )
    assert result.exit_code != 0
    assert "no study 1.2.3" in result.output
