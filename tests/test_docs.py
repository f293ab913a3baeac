"""The administrator's documentation (docs/admin-guide.md, README.md) against the code.

* Every setting of the configuration schema (``sidecar.config.Config``) is
  named in docs/admin-guide.md as a dotted name in backticks
  (``dicom.max_find_results``), and its configuration reference gives each one
  the schema's default.
* Every ``make`` target that README.md or a page under docs/ names exists in
  the Makefile.

Each check has a companion test showing that it reports what it should.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sidecar.config import Config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ADMIN_GUIDE = REPO / "docs" / "admin-guide.md"
MAKEFILE = REPO / "Makefile"


def all_docs_text() -> str:
    """README.md and every page under docs/ (what a reader may be told to run)."""
    pages = [README, *sorted((REPO / "docs").rglob("*.md"))]
    return "\n\n".join(p.read_text(encoding="utf-8") for p in pages)


# ------------------------------------------------------------ schema walk
def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _item_model(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """For ``list[Model]`` ("[]", Model); for ``dict[str, Model]`` (".<name>", Model)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and len(args) == 1 and (model := _model_of(args[0])) is not None:
        return "[]", model
    if origin is dict and len(args) == 2 and (model := _model_of(args[1])) is not None:
        return ".<name>", model
    return None


def setting_names(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Dotted names of every setting of ``model``, in schema order.

    A section recurses (``dicom.port``); a list or mapping of records is a
    setting itself and names its record keys too (``dicom.allowed_peers`` and
    ``dicom.allowed_peers[].host``; ``preprocess.windows.<name>.center``).
    """
    names: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is not None:
            names += setting_names(sub, dotted + ".")
            continue
        names.append(dotted)
        item = _item_model(field.annotation)
        if item is not None:
            suffix, record = item
            names += setting_names(record, f"{dotted}{suffix}.")
    return names


def missing_settings(text: str, names: list[str] | None = None) -> list[str]:
    """Settings not named in ``text`` as `dotted.name` (in backticks)."""
    return [n for n in (setting_names() if names is None else names) if f"`{n}`" not in text]


# ------------------------------------------------- defaults in the reference
def render_default(value: Any) -> str:
    """A default as the reference table writes it (YAML-like, in backticks)."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list | dict):
        return f"`{json.dumps(value, separators=(', ', ': '))}`".replace('"', "")
    return f"`{value}`"


def schema_defaults(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """Rendered default of every setting that has one (records' keys have none)."""
    out: dict[str, str] = {}
    required = any(f.is_required() for f in model.model_fields.values())
    plain = {} if required else model().model_dump(mode="json")
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is not None:
            out.update(schema_defaults(sub, dotted + "."))
        elif not required:
            out[dotted] = render_default(plain[name])
    return out


_ROW_RE = re.compile(r"^\|\s*`(?P<name>[a-z0-9_.<>\[\]]+)`\s*\|\s*(?P<default>[^|]*?)\s*\|", re.M)


def reference_rows(text: str) -> dict[str, str]:
    """``{setting: default cell}`` of the configuration reference's table rows."""
    start = text.index("## Configuration reference")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return {m["name"]: m["default"] for m in _ROW_RE.finditer(section)}


def wrong_defaults(text: str) -> list[str]:
    """Settings whose reference row is missing or shows another default than the schema."""
    rows = reference_rows(text)
    problems: list[str] = []
    for name in setting_names():
        if name not in rows:
            problems.append(f"{name}: no row")
    for name, default in schema_defaults().items():
        if name in rows and rows[name] != default:
            problems.append(f"{name}: README says {rows[name]}, schema {default}")
    return problems


# ---------------------------------------------------------- make targets
_FENCE_RE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE_MAKE_RE = re.compile(r"`make ([A-Za-z0-9_][\w.-]*)")
_BLOCK_MAKE_RE = re.compile(r"^\s*(?:\$\s+)?make ([A-Za-z0-9_][\w.-]*)", re.M)
_TARGET_RE = re.compile(r"^([A-Za-z0-9_][\w.-]*(?:\s+[A-Za-z0-9_][\w.-]*)*)\s*:(?!=)", re.M)


def make_targets_named(text: str) -> set[str]:
    """``make X`` in inline code and at the start of lines in fenced code blocks."""
    named = set(_INLINE_MAKE_RE.findall(text))
    for block in _FENCE_RE.findall(text):
        named.update(_BLOCK_MAKE_RE.findall(block))
    return named


def makefile_targets(makefile: str) -> set[str]:
    targets: set[str] = set()
    for match in _TARGET_RE.finditer(makefile):
        targets.update(match.group(1).split())
    return targets - {".PHONY"}


def unknown_make_targets(text: str, makefile: str) -> list[str]:
    return sorted(make_targets_named(text) - makefile_targets(makefile))


# ------------------------------------------------------------------- tests
def test_readme_names_every_setting() -> None:
    assert missing_settings(ADMIN_GUIDE.read_text(encoding="utf-8")) == []


def test_schema_walk_finds_nested_and_record_settings() -> None:
    names = setting_names()
    for expected in (
        "dicom.max_find_results",
        "query.example_ttl",
        "http.port",
        "dicom.allowed_peers",
        "dicom.allowed_peers[].ae_title",
        "dicom.allowed_peers[].host",
        "preprocess.windows",
        "preprocess.windows.<name>.width",
        "logging.level",
    ):
        assert expected in names
    assert len(names) == len(set(names))
    # Sections are not settings themselves.
    assert "dicom" not in names and "http" not in names


def test_setting_check_reports_a_missing_setting() -> None:
    # Drop two settings from the text (every mention): exactly they are reported.
    text = ADMIN_GUIDE.read_text(encoding="utf-8")
    text = text.replace("`query.example_ttl`", "`query.example_TTL`")
    text = text.replace("`dicom.allowed_peers[].host`", "dicom.allowed_peers[].host")
    assert missing_settings(text) == ["dicom.allowed_peers[].host", "query.example_ttl"]
    # A name that merely contains another one does not count for it.
    assert missing_settings("`http.port_x`", ["http.port"]) == ["http.port"]


def test_reference_shows_schema_defaults() -> None:
    assert wrong_defaults(ADMIN_GUIDE.read_text(encoding="utf-8")) == []


def test_reference_default_check_reports_a_wrong_default() -> None:
    text = ADMIN_GUIDE.read_text(encoding="utf-8")
    assert "| `dicom.port` | `11112` |" in text
    bad = text.replace("| `dicom.port` | `11112` |", "| `dicom.port` | `104` |")
    assert wrong_defaults(bad) == ["dicom.port: README says `104`, schema `11112`"]
    gone = "\n".join(ln for ln in text.splitlines() if not ln.startswith("| `http.port` |"))
    assert wrong_defaults(gone) == ["http.port: no row"]


def test_render_default() -> None:
    assert render_default(None) == "`null`"
    assert render_default(True) == "`true`"
    assert render_default("") == '`""`'
    assert render_default("SIDECAR") == "`SIDECAR`"
    assert render_default([]) == "`[]`"
    assert render_default({"CT": "soft_tissue"}) == "`{CT: soft_tissue}`"
    assert render_default(60.0) == "`60.0`"


def test_readme_make_targets_exist() -> None:
    text = README.read_text(encoding="utf-8")
    named = make_targets_named(text)
    assert {"run", "test", "demo"} <= named  # the walk sees the Quick start
    assert unknown_make_targets(all_docs_text(), MAKEFILE.read_text(encoding="utf-8")) == []


def test_make_target_check_reports_an_unknown_target() -> None:
    makefile = (
        "run: setup\n\t$(BIN)/sidecar serve\nbench: bench-ingest bench-embed\n"
        "bench-ingest bench-embed: setup\nVAR := x\n.PHONY: run\n"
    )
    assert makefile_targets(makefile) == {"run", "bench", "bench-ingest", "bench-embed"}
    text = (
        "Use `make run` or `make deploy`.\n\n"
        "```sh\nmake bench   # all\n$ make frobnicate\n```\n"
        "Prose may make sure of things; make nothing of it.\n"
    )
    assert make_targets_named(text) == {"run", "deploy", "bench", "frobnicate"}
    assert unknown_make_targets(text, makefile) == ["deploy", "frobnicate"]
