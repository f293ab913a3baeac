"""Command line: check-config, status and ingest through click's CliRunner."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from sidecar.cli.main import main
from tests.conftest import make_ct, make_sr, part10

STATES = ("pending", "embedded", "failed", "skipped")
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


pytestmark = pytest.mark.usefixtures("cli_isolation")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def cfg_path(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "conf" / "sidecar.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({
        "dicom": {"port": 11999},
        "storage": {"data_dir": str(data_dir), "min_free_mb": 1},
        "logging": {"level": "WARNING"},
    }))
    return path


def cli(cfg: Path | None, *args: str, env: dict[str, str] | None = None) -> Result:
    argv = (["--config", str(cfg)] if cfg is not None else []) + list(args)
    return CliRunner().invoke(main, argv, env=env, catch_exceptions=False)


def status_json(cfg: Path) -> dict[str, Any]:
    result = cli(cfg, "status", "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def save(ds: Dataset, path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(part10(ds))
    return path.read_bytes()




@pytest.fixture
def series_folder(tmp_path: Path) -> tuple[Path, dict[Path, Dataset]]:
    """A folder with three CT files of one series, a README and a nested folder."""
    folder = tmp_path / "incoming"
    study, series = generate_uid(), generate_uid()
    files = {}
    for i in range(3):
        ds = make_ct(study_uid=study, series_uid=series, instance_number=i + 1, seed=i)
        path = folder / ("sub" if i == 2 else "") / f"img{i}.dcm"
        save(ds, path)
        files[path] = ds
    (folder / "README.txt").write_text("not a DICOM file\n")
    return folder, files


# ----------------------------------------------------------- check-config
def test_check_config_prints_effective_settings(cfg_path: Path, data_dir: Path) -> None:
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg_path)])
    assert result.exit_code == 0, result.output
    eff = yaml.safe_load(result.stdout)
    assert eff["dicom"]["port"] == 11999
    assert eff["dicom"]["ae_title"] == "SIDECAR"
    assert eff["storage"]["data_dir"] == str(data_dir)
    assert eff["database"]["effective_url"] == f"sqlite:///{data_dir / 'sidecar.db'}"
    assert eff["logging"]["level"] == "WARNING"
    assert "configuration OK" in result.stderr
    assert not data_dir.exists()  # checking does not create anything


def test_check_config_with_group_option_and_env_override(cfg_path: Path) -> None:
    result = cli(cfg_path, "check-config", env={"SIDECAR__DICOM__PORT": "11113"})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["dicom"]["port"] == 11113


def test_check_config_from_sidecar_config_env(cfg_path: Path) -> None:
    result = cli(None, "check-config", env={"SIDECAR_CONFIG": str(cfg_path)})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["dicom"]["port"] == 11999


def test_check_config_masks_the_database_password(tmp_path: Path) -> None:
    path = tmp_path / "pg.yaml"
    path.write_text("database:\n  url: postgresql+psycopg://app:hunter2@db/sidecar\n")
    result = cli(path, "check-config")
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert "app:***@db" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dicom:\n  port: 70000\n",
         "dicom.port: Input should be less than or equal to 65535 (got 70000)"),
        ("dicom:\n  foo: 1\n", "dicom.foo: unknown setting"),
        ("dicom:\n  allowed_peers:\n    - {ae_title: PACS, host: pacs.local}\n",
         "dicom.allowed_peers.0.host:"),
    ],
)
def test_check_config_rejects_invalid_config(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = cli(path, "check-config")
    assert result.exit_code != 0
    assert expected in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.output


def test_check_config_env_error_names_the_variable(cfg_path: Path) -> None:
    result = cli(cfg_path, "check-config", env={"SIDECAR__DICOM__PORT": "many"})
    assert result.exit_code != 0
    assert "dicom.port" in result.stderr
    assert "SIDECAR__DICOM__PORT" in result.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = cli(tmp_path / "absent.yaml", "check-config")
    assert result.exit_code != 0
    assert "cannot read configuration file" in result.stderr


def test_every_command_fails_cleanly_on_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("storage: {min_free_mb: -5}\n")
    for args in (["status"], ["status", "--json"], ["ingest", str(tmp_path)]):
        result = cli(path, *args)
        assert result.exit_code == 1, args
        assert "storage.min_free_mb" in result.stderr


# ------------------------------------------------------------------ status
def test_status_on_a_fresh_data_dir(cfg_path: Path, data_dir: Path) -> None:
    result = cli(cfg_path, "status")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for state in STATES:
        assert re.search(rf"^\s+{state}\s+0$", out, re.MULTILINE), out
    assert re.search(r"^instances: 0$", out, re.MULTILINE)
    assert "studies: 0 (0 stable, 0 receiving)" in out
    assert f"data directory: {data_dir}" in out
    assert re.search(r"disk free: .+ of .+, stores refused below 1\.0 MiB "
                     r"\(storage\.min_free_mb\)$", out, re.MULTILINE), out
    assert (data_dir / "sidecar.db").is_file()


def test_status_says_when_the_disk_is_below_the_watermark(cfg_path: Path) -> None:
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["storage"]["min_free_mb"] = 10**9  # 954 TiB: more than any disk here
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = cli(cfg_path, "status")
    assert result.exit_code == 0, result.output
    assert re.search(r"disk free: .+ of .+   STORES ARE REFUSED: below 953\.7 TiB "
                     r"\(storage\.min_free_mb\)$", result.stdout, re.MULTILINE), result.stdout


def test_status_json(cfg_path: Path, data_dir: Path) -> None:
    data = status_json(cfg_path)
    assert data["instances"] == dict.fromkeys(STATES, 0)
    assert data["instances_total"] == 0
    assert (data["studies"], data["studies_stable"], data["series"], data["patients"]) == (
        0, 0, 0, 0)
    assert data["stored_bytes"] == 0
    assert data["data_dir"] == str(data_dir)
    assert 0 < data["disk_free_bytes"] <= data["disk_total_bytes"]
    assert data["disk_min_free_bytes"] == 2**20
    assert (data["quarantine_datasets"], data["quarantine_bytes"]) == (0, 0)
    assert data["quarantine_max_bytes"] == 1024 * 2**20


# ------------------------------------------------------------------ ingest
def test_ingest_a_folder(
    cfg_path: Path, data_dir: Path, series_folder: tuple[Path, dict[Path, Dataset]]
) -> None:
    folder, files = series_folder
    result = cli(cfg_path, "ingest", "--quiet", str(folder))
    assert result.exit_code == 0, result.output
    assert "ingest: 4 files: not_dicom 1, stored 3" in result.stdout

    data = status_json(cfg_path)
    assert data["instances"] == {"pending": 3, "embedded": 0, "failed": 0, "skipped": 0}
    assert data["instances_total"] == 3
    assert (data["studies"], data["series"], data["patients"]) == (1, 1, 1)
    assert data["stored_bytes"] == sum(p.stat().st_size for p in files)

    for src, ds in files.items():
        stored = (data_dir / "storage" / ds.StudyInstanceUID / ds.SeriesInstanceUID
                  / f"{ds.SOPInstanceUID}.dcm")
        assert stored.read_bytes() == src.read_bytes()
    stored_files = [p for p in (data_dir / "storage").rglob("*") if p.is_file()]
    assert len(stored_files) == 3


def test_reingest_is_a_noop(
    cfg_path: Path, data_dir: Path, series_folder: tuple[Path, dict[Path, Dataset]]
) -> None:
    folder, _files = series_folder
    assert cli(cfg_path, "ingest", "-q", str(folder)).exit_code == 0
    before = status_json(cfg_path)
    snapshot = sorted(p for p in (data_dir / "storage").rglob("*") if p.is_file())

    result = cli(cfg_path, "ingest", "-q", str(folder))
    assert result.exit_code == 0, result.output
    assert "duplicate 3, not_dicom 1" in result.stdout
    after = status_json(cfg_path)
    for key in ("instances", "studies", "series", "patients", "stored_bytes"):
        assert after[key] == before[key], key
    assert sorted(p for p in (data_dir / "storage").rglob("*") if p.is_file()) == snapshot


def test_ingest_single_files_with_progress_bar(cfg_path: Path, tmp_path: Path) -> None:
    a = tmp_path / "a.dcm"
    b = tmp_path / "b.dcm"
    save(make_ct(), a)
    save(make_ct(), b)
    result = cli(cfg_path, "ingest", str(a), str(b))
    assert result.exit_code == 0, result.output
    assert "ingest: 2 files: stored 2" in result.stdout
    assert status_json(cfg_path)["studies"] == 2


def test_ingest_refused_file_is_quarantined(
    cfg_path: Path, data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    good = make_ct()
    save(good, folder / "good.dcm")
    bad = make_ct()
    del bad.StudyInstanceUID
    bad_bytes = save(bad, folder / "bad.dcm")

    result = cli(cfg_path, "ingest", "-q", str(folder))
    assert result.exit_code == 1
    assert "refused 1, stored 1" in result.stdout
    assert f"{folder / 'bad.dcm'}: refused: StudyInstanceUID is missing or empty" in result.stderr

    quarantine = data_dir / "quarantine"
    notes = list(quarantine.glob("*.txt"))
    kept = list(quarantine.glob("*.dcm"))
    assert len(notes) == 1 and len(kept) == 1
    assert kept[0].read_bytes() == bad_bytes
    note = notes[0].read_text()
    assert "StudyInstanceUID is missing or empty" in note
    assert "calling_host: ingest" in note
    assert status_json(cfg_path)["instances_total"] == 1


def test_ingest_non_image_object_is_skipped(cfg_path: Path, tmp_path: Path) -> None:
    sr_path = tmp_path / "report.dcm"
    sr_bytes = save(make_sr(), sr_path)
    assert b"\x7f\xe0\x10\x00" not in sr_bytes  # no Pixel Data
    ct_path = tmp_path / "ct.dcm"
    save(make_ct(), ct_path)
    result = cli(cfg_path, "ingest", "-q", str(sr_path), str(ct_path))
    assert result.exit_code == 0, result.output
    data = status_json(cfg_path)
    assert data["instances"] == {"pending": 1, "embedded": 0, "failed": 0, "skipped": 1}
    text_out = cli(cfg_path, "status").stdout
    assert re.search(r"^\s+skipped\s+1$", text_out, re.MULTILINE)


def test_ingest_below_watermark_fails_and_stops(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(data_dir), "min_free_mb": 10**12},
    }))
    folder = tmp_path / "in"
    for i in range(3):
        save(make_ct(seed=i), folder / f"{i}.dcm")
    result = cli(path, "ingest", "-q", str(folder))
    assert result.exit_code == 1
    assert "ingest: 3 files: failed 1" in result.stdout  # stops at the first refusal
    assert "below watermark" in result.stderr
    assert not [p for p in (data_dir / "storage").rglob("*") if p.is_file()]


def test_ingest_only_non_dicom(cfg_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "empty.bin").write_bytes(b"")
    (folder / "fake.dcm").write_bytes(b"\x00" * 128 + b"DICX" + b"\x00" * 100)
    result = cli(cfg_path, "ingest", "-q", str(folder))
    assert result.exit_code == 0, result.output
    assert "ingest: 3 files: not_dicom 3" in result.stdout
    assert status_json(cfg_path)["instances_total"] == 0


def test_ingest_missing_path_is_a_usage_error(cfg_path: Path, tmp_path: Path) -> None:
    result = cli(cfg_path, "ingest", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_ingest_needs_a_path(cfg_path: Path) -> None:
    assert cli(cfg_path, "ingest").exit_code == 2


def test_log_level_option_configures_logging(cfg_path: Path) -> None:
    from pynetdicom import _config as pnd_config

    assert cli(cfg_path, "--log-level", "debug", "check-config").exit_code == 0
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("pynetdicom").level == logging.DEBUG
    assert pnd_config.LOG_REQUEST_IDENTIFIERS is True
    assert cli(cfg_path, "check-config").exit_code == 0  # the file says WARNING
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("pynetdicom").level == logging.WARNING
    assert pnd_config.LOG_REQUEST_IDENTIFIERS is False


def test_info_logs_carry_no_patient_identifiers(cfg_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "phi"
    save(make_ct(patient_id="PID-SECRET-123", patient_name="Doe^Secret"), folder / "a.dcm")
    bad = make_ct(patient_id="PID-SECRET-123", patient_name="Doe^Secret")
    del bad.SeriesInstanceUID
    save(bad, folder / "b.dcm")
    result = cli(cfg_path, "--log-level", "INFO", "ingest", "-q", str(folder))
    assert result.exit_code == 1
    assert "quarantined" in result.stderr  # the refusal was logged ...
    assert "PID-SECRET-123" not in result.output  # ... without the patient's identity
    assert "Secret" not in result.output


def test_config_is_accepted_after_the_subcommand_too(cfg_path: Path, tmp_path: Path) -> None:
    for args in (["serve", "--help"], ["status", "--help"], ["model", "list", "--help"]):
        result = cli(None, *args)
        assert result.exit_code == 0 and "--config" in result.output, result.output
    before = cli(cfg_path, "status", "--json")
    after = cli(None, "status", "--config", str(cfg_path), "--json")
    assert before.exit_code == after.exit_code == 0, after.output
    def steady(out: str) -> dict[str, object]:  # free disk moves with whatever else runs
        report = json.loads(out)
        report.pop("disk_free_bytes")
        return dict(report)

    assert steady(after.stdout) == steady(before.stdout)
    # the subcommand's --config wins over the group's
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "elsewhere")}}))
    both = cli(other, "status", "--config", str(cfg_path), "--json")
    assert json.loads(both.stdout)["data_dir"] == json.loads(before.stdout)["data_dir"]
