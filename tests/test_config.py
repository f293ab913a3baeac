"""Configuration schema: YAML loading, validation messages, env overrides, paths."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from pydantic import BaseModel

from sidecar.config import Config, PeerConfig, load_config
from sidecar.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
REPO_CONFIG = REPO / "config" / "sidecar.yaml"


def write(tmp_path: Path, text: str, name: str = "sidecar.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return info.value


# ------------------------------------------------------------------ loading
def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.dicom.ae_title == "SIDECAR"
    assert cfg.dicom.bind_address == "127.0.0.1"
    assert cfg.dicom.port == 11112
    assert cfg.dicom.require_called_ae_title is True
    assert cfg.dicom.allow_loopback is True
    assert cfg.dicom.allowed_peers == []
    assert cfg.dicom.max_associations == 16
    assert cfg.dicom.max_pdu_size == 0
    assert cfg.dicom.tcp_nodelay is True
    assert cfg.dicom.duplicate_policy == "keep_first"
    assert cfg.storage.min_free_mb == 1024
    assert cfg.storage.fsync is True
    assert cfg.database.url == ""
    assert cfg.database.busy_timeout_ms == 10000
    assert cfg.database.echo is False
    assert cfg.stability.stable_age == 60.0
    assert cfg.stability.check_interval == 5.0
    assert cfg.logging.level == "INFO"
    # Without a file, relative paths resolve against the working directory.
    assert cfg.data_dir == (tmp_path / "data").resolve()
    assert cfg.data_dir.is_absolute()
    assert cfg.storage_dir == cfg.data_dir / "storage"
    assert cfg.quarantine_dir == cfg.data_dir / "quarantine"
    assert cfg.database_url == f"sqlite:///{cfg.data_dir / 'sidecar.db'}"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "# nothing but a comment\n"), environ={})
    assert cfg.dicom.port == 11112
    assert cfg.data_dir == (tmp_path / "data").resolve()


def test_yaml_values_are_loaded_and_normalised(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
dicom:
  ae_title: "MYNODE  "
  bind_address: 0.0.0.0
  port: 4242
  allow_loopback: false
  allowed_peers:
    - {ae_title: ORTHANC, host: 10.0.0.5}
    - {ae_title: '*', host: 10.1.2.3/24}
    - {ae_title: PACS, host: '*'}
    - {ae_title: V6, host: '2001:db8::1'}
  duplicate_policy: replace
storage:
  data_dir: /srv/sidecar
  min_free_mb: 5
  fsync: false
database:
  url: postgresql+psycopg://sidecar@db/sidecar
stability:
  stable_age: 12.5
logging:
  level: DEBUG
""",
    )
    cfg = load_config(path, environ={})
    assert cfg.dicom.ae_title == "MYNODE"  # padding stripped
    assert cfg.dicom.bind_address == "0.0.0.0"
    assert cfg.dicom.port == 4242
    assert cfg.dicom.allow_loopback is False
    assert cfg.dicom.allowed_peers == [
        PeerConfig(ae_title="ORTHANC", host="10.0.0.5/32"),
        PeerConfig(ae_title="*", host="10.1.2.0/24"),  # host bits dropped
        PeerConfig(ae_title="PACS", host="*"),
        PeerConfig(ae_title="V6", host="2001:db8::1/128"),
    ]
    assert cfg.dicom.duplicate_policy == "replace"
    assert cfg.data_dir == Path("/srv/sidecar")
    assert cfg.storage.min_free_mb == 5
    assert cfg.storage.fsync is False
    assert cfg.database_url == "postgresql+psycopg://sidecar@db/sidecar"
    assert cfg.stability.stable_age == 12.5
    assert cfg.logging.level == "DEBUG"


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), environ={})
    with pytest.raises(pydantic.ValidationError):
        cfg.dicom.port = 1  # type: ignore[misc]


# ------------------------------------------------------------ unknown keys
@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("foo: 1\n", "foo: unknown setting"),
        ("dicom:\n  foo: 1\n", "dicom.foo: unknown setting"),
        ("storage:\n  datadir: /x\n", "storage.datadir: unknown setting"),
        (
            "dicom:\n  allowed_peers:\n    - {ae_title: A, host: 10.0.0.1, port: 104}\n",
            "dicom.allowed_peers.0.port: unknown setting",
        ),
    ],
)
def test_unknown_keys_are_rejected_with_dotted_path(
    tmp_path: Path, text: str, line: str
) -> None:
    err = config_error(write(tmp_path, text))
    assert any(p.startswith(line) for p in err.problems), err.problems
    assert line in str(err)
    assert str(tmp_path / "sidecar.yaml") in str(err)


# -------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("text", "dotted", "shown"),
    [
        ("dicom: {port: 70000}", "dicom.port", "70000"),
        ("dicom: {port: 0}", "dicom.port", "0"),
        ("dicom: {ae_title: ABCDEFGHIJKLMNOPQ}", "dicom.ae_title", "'ABCDEFGHIJKLMNOPQ'"),
        ("dicom: {ae_title: '   '}", "dicom.ae_title", "'   '"),
        ("dicom: {ae_title: 'A\\B'}", "dicom.ae_title", "'A\\\\B'"),
        ("dicom: {bind_address: localhost}", "dicom.bind_address", "'localhost'"),
        ("dicom: {bind_address: 300.1.1.1}", "dicom.bind_address", "'300.1.1.1'"),
        (
            "dicom: {allowed_peers: [{ae_title: PACS, host: pacs.example.org}]}",
            "dicom.allowed_peers.0.host",
            "'pacs.example.org'",
        ),
        (
            "dicom: {allowed_peers: [{ae_title: PACS, host: 10.0.0.1}, "
            "{ae_title: TOO_LONG_AE_TITLE_X, host: 10.0.0.2}]}",
            "dicom.allowed_peers.1.ae_title",
            "'TOO_LONG_AE_TITLE_X'",
        ),
        ("dicom: {allowed_peers: [{ae_title: PACS}]}", "dicom.allowed_peers.0.host", ""),
        ("dicom: {duplicate_policy: overwrite}", "dicom.duplicate_policy", "'overwrite'"),
        ("dicom: {max_associations: 0}", "dicom.max_associations", "0"),
        ("storage: {min_free_mb: -1}", "storage.min_free_mb", "-1"),
        ("stability: {stable_age: 0}", "stability.stable_age", "0"),
        ("logging: {level: debug}", "logging.level", "'debug'"),
        ("dicom: [1, 2]", "dicom", "[1, 2]"),
    ],
)
def test_bad_values_name_dotted_path_and_value(
    tmp_path: Path, text: str, dotted: str, shown: str
) -> None:
    err = config_error(write(tmp_path, text))
    matching = [p for p in err.problems if p.startswith(f"{dotted}: ")]
    assert matching, err.problems
    assert f"(got {shown}" in matching[0] or not shown, matching[0]
    assert dotted in str(err)


def test_port_message_matches_readme(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "dicom:\n  port: 70000\n"))
    assert err.problems == [
        "dicom.port: Input should be less than or equal to 65535 (got 70000)"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    err = config_error(
        write(tmp_path, "dicom: {port: 70000, bind_address: nowhere, foo: 1}\nbar: 2\n")
    )
    heads = sorted(p.split(":")[0] for p in err.problems)
    assert heads == ["bar", "dicom.bind_address", "dicom.foo", "dicom.port"]


# ------------------------------------------------------- environment overrides
def test_env_override_parses_int(tmp_path: Path) -> None:
    path = write(tmp_path, "dicom: {port: 4000}\n")
    cfg = load_config(path, environ={"SIDECAR__DICOM__PORT": "11113"})
    assert cfg.dicom.port == 11113
    assert isinstance(cfg.dicom.port, int)


@pytest.mark.parametrize(("raw", "expected"), [("false", False), ("true", True), ("no", False)])
def test_env_override_parses_bool(tmp_path: Path, raw: str, expected: bool) -> None:
    cfg = load_config(write(tmp_path, ""), environ={"SIDECAR__STORAGE__FSYNC": raw})
    assert cfg.storage.fsync is expected


def test_env_override_parses_list(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "dicom: {allowed_peers: [{ae_title: OLD, host: 10.9.9.9}]}\n"),
        environ={
            "SIDECAR__DICOM__ALLOWED_PEERS": "[{ae_title: PACS, host: 10.0.0.0/8}, "
            "{ae_title: '*', host: 192.168.1.7}]"
        },
    )
    assert cfg.dicom.allowed_peers == [
        PeerConfig(ae_title="PACS", host="10.0.0.0/8"),
        PeerConfig(ae_title="*", host="192.168.1.7/32"),
    ]


def test_env_override_keeps_other_file_values_and_ignores_foreign_names(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "dicom: {port: 4000, ae_title: FILEAE}\n")
    cfg = load_config(
        path,
        environ={
            "SIDECAR__dicom__bind_address": "0.0.0.0",  # keys are case-insensitive
            "SIDECAR_DICOM_PORT": "1",  # single underscores: not an override
            "OTHER__DICOM__PORT": "2",
            "SIDECAR__": "3",  # no key at all
        },
    )
    assert cfg.dicom.port == 4000
    assert cfg.dicom.ae_title == "FILEAE"
    assert cfg.dicom.bind_address == "0.0.0.0"


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, ""), {"SIDECAR__DICOM__PORT": "eleven"})
    assert len(err.problems) == 1
    line = err.problems[0]
    assert line.startswith("dicom.port: ")
    assert "(got 'eleven')" in line
    assert "[from SIDECAR__DICOM__PORT]" in line


def test_env_override_error_inside_a_list_names_the_variable(tmp_path: Path) -> None:
    err = config_error(
        write(tmp_path, ""),
        {"SIDECAR__DICOM__ALLOWED_PEERS": "[{ae_title: PACS, host: pacs.local}]"},
    )
    assert err.problems[0].startswith("dicom.allowed_peers.0.host: ")
    assert "[from SIDECAR__DICOM__ALLOWED_PEERS]" in err.problems[0]


def test_env_override_unknown_key_names_the_variable(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, ""), {"SIDECAR__DICOM__PROT": "11113"})
    assert err.problems == ["dicom.prot: unknown setting (got 11113) [from SIDECAR__DICOM__PROT]"]


def test_env_override_below_a_scalar_is_an_error(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "dicom: {port: 1}\n"), {"SIDECAR__DICOM__PORT__X": "1"})
    assert "SIDECAR__DICOM__PORT__X" in str(err)
    assert err.problems[0].startswith("dicom.port: ")


def test_file_errors_do_not_blame_an_env_variable(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "dicom: {port: 70000}\n"), {"SIDECAR__DICOM__AE_TITLE": "X"})
    assert err.problems == [
        "dicom.port: Input should be less than or equal to 65535 (got 70000)"
    ]


def test_sidecar_config_env_selects_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "dicom: {port: 5555}\n", name="other.yaml")
    cfg = load_config(None, environ={"SIDECAR_CONFIG": str(path)})
    assert cfg.dicom.port == 5555
    assert cfg.data_dir == (tmp_path / "data").resolve()


# -------------------------------------------------------------------- paths
def test_relative_data_dir_resolves_against_the_file_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "sidecar"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf_dir, "storage: {data_dir: ../var/data}\n")
    cfg = load_config(path, environ={})
    assert cfg.data_dir == tmp_path / "etc" / "var" / "data"
    assert cfg.storage_dir == tmp_path / "etc" / "var" / "data" / "storage"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'etc' / 'var' / 'data' / 'sidecar.db'}"


def test_relative_file_path_and_relative_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", "storage: {data_dir: data}\n")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    cfg = load_config(Path("../conf/sidecar.yaml"), environ={})
    assert cfg.data_dir == tmp_path / "conf" / "data"


def test_env_relative_data_dir_resolves_against_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    cfg = load_config(write(tmp_path, ""), environ={"SIDECAR__STORAGE__DATA_DIR": "d1/d2"})
    assert cfg.data_dir == tmp_path / "d1" / "d2"


def test_absolute_data_dir_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "data"
    cfg = load_config(write(tmp_path, f"storage: {{data_dir: '{target}'}}\n"), environ={})
    assert cfg.data_dir == target


# ----------------------------------------------------- the shipped reference
def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return _model_of(item)
    return None


def _missing_keys(model: type[BaseModel], data: Any, prefix: str, text: str) -> list[str]:
    """Dotted names of every leaf setting of ``model`` that ``data`` does not list."""
    missing: list[str] = []
    if not isinstance(data, dict):
        return [prefix.rstrip(".") or "(top level)"]
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is not None:
            missing += _missing_keys(sub, data.get(name), dotted + ".", text)
            continue
        if name not in data:
            missing.append(dotted)
        item = _list_item_model(field.annotation)
        if item is not None:
            # A list of records ([] by default) documents its record keys in comments.
            for key in item.model_fields:
                if f"{key}:" not in text:
                    missing.append(f"{dotted}[].{key}")
    return missing


def test_repo_config_validates() -> None:
    cfg = load_config(REPO_CONFIG, environ={})
    assert cfg.data_dir == (REPO / "data").resolve()


def test_repo_config_lists_every_setting() -> None:
    text = REPO_CONFIG.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert _missing_keys(Config, data, "", text) == []


def test_schema_walk_detects_a_missing_setting() -> None:
    # The walk above must be able to fail: drop one nested leaf and one section.
    text = REPO_CONFIG.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    del data["dicom"]["tcp_nodelay"]
    del data["logging"]
    assert _missing_keys(Config, data, "", text) == ["dicom.tcp_nodelay", "logging"]


# The shipped file keeps data beside the checkout (config/../data); the schema's
# own default is "data" next to whatever file (or working directory) is used.
SHIPPED_DIFFERENCES = {("storage", "data_dir"): "../data"}


def test_repo_config_values_are_the_schema_defaults() -> None:
    data = yaml.safe_load(REPO_CONFIG.read_text(encoding="utf-8"))
    defaults = Config().model_dump(mode="json")
    for (section, key), shipped in SHIPPED_DIFFERENCES.items():
        assert data[section][key] == shipped
        data[section][key] = defaults[section][key]
    assert data == defaults


# ---------------------------------------------------------------- effective
def test_effective_masks_postgres_password(tmp_path: Path) -> None:
    url = "postgresql+psycopg://sidecar:s3cr3t-pw@db.example:5432/sidecar"
    cfg = load_config(write(tmp_path, f"database: {{url: '{url}'}}\n"), environ={})
    eff = cfg.effective()
    assert "s3cr3t-pw" not in yaml.safe_dump(eff)
    assert eff["database"]["url"] == "postgresql+psycopg://sidecar:***@db.example:5432/sidecar"
    assert eff["database"]["effective_url"] == eff["database"]["url"]
    assert cfg.database_url == url  # the real URL is untouched


def test_effective_sqlite_default(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "storage: {data_dir: data}\n"), environ={})
    eff = cfg.effective()
    assert eff["database"]["url"] == ""
    assert eff["database"]["effective_url"] == f"sqlite:///{tmp_path / 'data' / 'sidecar.db'}"
    assert eff["storage"]["data_dir"] == str(tmp_path / "data")
    assert eff["dicom"]["port"] == 11112
    assert set(eff) == set(Config.model_fields)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://:s3cr3t-pw@db.example/sidecar",
        "postgresql+psycopg://sidecar@/sidecar?host=/run/postgresql&password=s3cr3t-pw",
    ],
)
def test_effective_masks_every_password_form(tmp_path: Path, url: str) -> None:
    cfg = load_config(write(tmp_path, f"database: {{url: '{url}'}}\n"), environ={})
    assert "s3cr3t-pw" not in yaml.safe_dump(cfg.effective())


# ----------------------------------------------------------- broken files
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = config_error(path)
    assert err.problems == ["cannot read configuration file: No such file or directory"]
    assert str(path) in str(err)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    err = config_error(tmp_path)
    assert err.problems[0].startswith("cannot read configuration file: ")


def test_not_yaml(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, "dicom: [port: 1\n  - : :\n"))
    assert err.problems[0].startswith("not valid YAML: ")
    assert str(tmp_path / "sidecar.yaml") in str(err)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    err = config_error(write(tmp_path, text))
    assert err.problems == ["(top level): must be a mapping of sections"]


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)))
    err = config_error(path)
    assert "YAML" in err.problems[0] or "UTF-8" in err.problems[0]
