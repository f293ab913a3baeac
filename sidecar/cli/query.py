"""`sidecar search`: similarity queries from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import click
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from sidecar.cli.options import config_option, load
from sidecar.db.connect import catalogue
from sidecar.db.vectors import VectorRepository
from sidecar.errors import SidecarError
from sidecar.files import walk_files
from sidecar.search.front import QueryService, Requester, SimilarityRequest
from sidecar.search.readonly import ReadOnlyEmbedding
from sidecar.search.service import SearchService
from sidecar.search.types import Level, Reference, SearchFilters, SearchResult


def _read_query_images(path: Path) -> list[Any]:
    """The DICOM Part-10 files under ``path`` (a file or a folder), parsed."""
    datasets: list[Any] = []
    for file in walk_files((path,)):
        try:
            with file.open("rb") as fh:
                head = fh.read(132)
                if len(head) < 132 or head[128:132] != b"DICM":
                    continue
                fh.seek(0)
                datasets.append(dcmread(fh))
        except (OSError, InvalidDicomError) as exc:
            raise click.BadParameter(f"{file}: {exc}", param_hint="FILE_OR_FOLDER") from exc
    if not datasets:
        raise click.BadParameter(f"no DICOM file in {path}", param_hint="FILE_OR_FOLDER")
    return datasets


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _print_result(result: Any) -> None:
    res: SearchResult = result
    ref = res.reference
    click.echo(f"model {res.model_id}   level {res.level}   reference {ref.kind} "
               f"{ref.uid or '(images)'} ({ref.slices} slice{'s' if ref.slices != 1 else ''})")
    if ref.note:
        click.echo(f"note: {ref.note}")
    if not res.hits:
        click.echo(f"no similar {'studies' if res.level == 'study' else res.level + 's'} found")
        return
    what = {"study": "best series / instance", "series": "best instance",
            "image": "instance"}[res.level]
    width = max(len("study UID"), *(len(h.study_instance_uid) for h in res.hits))
    header = (f"{'rank':>4}  {'score':>6}  {'date':<8}  {'modality':<8}  {'description':<24}  "
              f"{'study UID':<{width}}  {what}")
    click.echo(header)
    for hit in res.hits:
        modality = "\\".join(hit.modalities_in_study) if res.level == "study" else hit.modality
        if res.level == "image":
            best = hit.sop_instance_uid
        else:
            best = f"{hit.series_instance_uid} / {hit.sop_instance_uid}"
        click.echo(
            f"{hit.rank:>4}  {hit.score:>6.4f}  {hit.study_date or '-':<8}  "
            f"{_cut(modality or '-', 8):<8}  {_cut(hit.study_description or '-', 24):<24}  "
            f"{hit.study_instance_uid:<{width}}  {best}"
        )


@click.command()
@click.argument("file_or_folder", required=False,
                type=click.Path(exists=True, path_type=Path))
@click.option("--study", "study_uid", metavar="UID", help="Query by an archived study.")
@click.option("--series", "series_uid", metavar="UID", help="Query by an archived series.")
@click.option("--instance", "instance_uid", metavar="UID",
              help="Query by an archived instance (SOP Instance UID).")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=None,
              help="Most hits (default query.default_k; at most query.max_k).")
@click.option("--level", type=click.Choice(["study", "series", "image"]), default="study",
              show_default=True, help="Rank studies, series or images.")
@click.option("--same-patient", is_flag=True,
              help="Include the other studies of the reference's patient.")
@click.option("--modality", "modalities", multiple=True, metavar="CODE",
              help="Only hits with this modality (repeat for any of several).")
@click.option("--date", "study_date", default="", metavar="RANGE",
              help="Only studies in this StudyDate range: YYYYMMDD, A-B, A- or -B.")
@click.option("--body-part", default="", metavar="VALUE",
              help="Only hits with this BodyPartExamined (* and ? wildcards).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option()
@click.pass_context
def search(
    ctx: click.Context,
    file_or_folder: Path | None,
    study_uid: str | None,
    series_uid: str | None,
    instance_uid: str | None,
    k: int | None,
    level: str,
    same_patient: bool,
    modalities: tuple[str, ...],
    study_date: str,
    body_part: str,
    as_json: bool,
) -> None:
    """Find the studies (series, images) most similar to a reference.

    The reference is exactly one of FILE_OR_FOLDER (DICOM files not in the
    archive, embedded now with the configured model), --study, --series or
    --instance (archived: their stored vectors are used, no CNN run).

    Works beside a running `sidecar serve`: the index is read from its saved
    files without taking the index lock, brought up to date with the database
    in memory, and never written. The query is recorded in the audit log
    (query.audit_log) with the user's name. Exit codes: 0 done (even with no
    hit), 1 the query failed (unknown or not yet embedded reference, no
    index), 2 usage.
    """
    given = [x for x in (file_or_folder, study_uid, series_uid, instance_uid) if x]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one reference: FILE_OR_FOLDER, --study, --series or --instance"
        )
    cfg = load(ctx)
    datasets = _read_query_images(file_or_folder) if file_or_folder is not None else []

    with catalogue(cfg) as (engine, _):

        def _embedder() -> Any:
            # embeddings.registry imports torch: only for a query by images
            from sidecar.embeddings.registry import load_service_embedder  # noqa: PLC0415

            return load_service_embedder(cfg, VectorRepository(engine))

        try:
            reference = Reference(
                sop_instance_uid=instance_uid, series_instance_uid=series_uid,
                study_instance_uid=study_uid, datasets=tuple(datasets),
            )
            parts = ReadOnlyEmbedding(cfg, engine, _embedder)
            service = QueryService(cfg, SearchService(cfg, engine, parts))
            try:
                result = service.search(
                    SimilarityRequest(
                        reference, k=k, level=cast("Level", level),  # click.Choice checked it
                        include_same_patient=same_patient,
                        filters=SearchFilters(modalities=modalities, study_date=study_date,
                                              body_part=body_part),
                    ),
                    Requester.cli(),
                )
            finally:
                service.close()
        except SidecarError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # the audit log cannot be opened
            raise click.ClickException(f"cannot open the audit log: {exc}") from exc
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_result(result)
