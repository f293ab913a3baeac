"""`sidecar status`, `ingest`, `verify` and `delete-study`: the catalogue and its files."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import click

from sidecar.archive.layout import remove_previews, remove_stored
from sidecar.archive.store import InstanceStore, Origin, quarantine_usage
from sidecar.archive.verify import repair_storage, verify_storage
from sidecar.audit import setup as audit_setup
from sidecar.audit.messages import sop_class_counts
from sidecar.cli.options import config_option, human, load, logger
from sidecar.config import Config
from sidecar.db.connect import catalogue
from sidecar.db.repository import StudySummary
from sidecar.db.retention import RetentionRepository
from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository
from sidecar.db.volumes import VolumeRepository
from sidecar.embeddings.service import index_in_use
from sidecar.errors import InvalidDataset, OutOfResources, StorageFailure
from sidecar.files import walk_files
from sidecar.search.front import Requester


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option()
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Instance counts by state, studies and disk use."""
    cfg = load(ctx)
    with catalogue(cfg) as (engine, repo):
        rep = repo.status()
        vrepo = VectorRepository(engine)
        vectors = vrepo.count_vectors()
        active_model = vrepo.get_setting(ACTIVE_MODEL_KEY)
        retrying, given_up = vrepo.failed_breakdown(cfg.worker.max_attempts)
        volumes = VolumeRepository(engine).summary(active_model or "")
        kept = RetentionRepository(engine).counts(active_model or "",
                                                  max_attempts=cfg.worker.max_attempts)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(cfg.data_dir)
    quarantine = quarantine_usage(cfg.quarantine_dir)
    data = {
        "instances": rep.instances_by_state,
        "instances_total": sum(rep.instances_by_state.values()),
        "studies": rep.studies,
        "studies_stable": rep.studies_stable,
        "series": rep.series,
        "patients": rep.patients,
        "stored_bytes": rep.stored_bytes,
        "failed_retrying": retrying,
        "failed_given_up": given_up,
        "active_model_id": active_model,
        "vectors_by_model": vectors,
        "volumes": {"built": volumes.built, "slice_wise_only": volumes.refused,
                    "reasons": [{"reason": r, "series": n} for r, n in volumes.reasons]},
        "keep_files": cfg.storage.keep_files,
        "released_files": kept.released,
        "released_bytes": kept.released_bytes,
        "waiting_for_pixels": {"series": kept.waiting_series,
                               "instances": kept.waiting_instances},
        "quarantine_datasets": quarantine.datasets,
        "quarantine_bytes": quarantine.bytes,
        "quarantine_max_bytes": cfg.storage.quarantine_max_mb * 2**20,
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
        "disk_min_free_bytes": cfg.storage.min_free_mb * 2**20,
        "data_dir": str(cfg.data_dir),
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"data directory: {cfg.data_dir}")
    click.echo(f"instances: {data['instances_total']}")
    for state, count in rep.instances_by_state.items():
        extra = ""
        if state == "failed" and count:
            extra = f"   ({retrying} will be retried, {given_up} given up)"
        click.echo(f"  {state:<9} {count}{extra}")
    click.echo(f"studies: {rep.studies} ({rep.studies_stable} stable, "
               f"{rep.studies - rep.studies_stable} receiving)")
    click.echo(f"series: {rep.series}   patients: {rep.patients}")
    floor = cfg.storage.min_free_mb * 2**20
    refusing = "   STORES ARE REFUSED: below" if disk.free < floor else ", stores refused below"
    click.echo(f"stored: {human(rep.stored_bytes)}   disk free: {human(disk.free)} "
               f"of {human(disk.total)}{refusing} {human(floor)} (storage.min_free_mb)")
    if cfg.storage.releases or kept.released:
        fetch = cfg.storage.fetch
        source = (f"fetched back from {fetch.ae_title}@{fetch.host}:{fetch.port} by "
                  f"{fetch.method.upper()}" if fetch.configured else
                  "NO storage.fetch: they wait until the PACS sends them again")
        click.echo(f"released files (storage.keep_files: {cfg.storage.keep_files}): "
                   f"{kept.released}, {human(kept.released_bytes)}; catalogue, vectors and "
                   "thumbnails kept")
        if kept.waiting_instances:
            click.echo(f"  waiting for their pixels: {kept.waiting_instances} instance(s) in "
                       f"{kept.waiting_series} series, {source}")
    click.echo(f"quarantine: {quarantine.datasets} refused dataset(s), "
               f"{human(quarantine.bytes)} of {human(cfg.storage.quarantine_max_mb * 2**20)} "
               f"({cfg.quarantine_dir})")
    click.echo(f"active model: {active_model or '(none yet)'}")
    for model_id, count in sorted(vectors.items()):
        click.echo(f"  vectors of model {model_id}: {count}")
    click.echo(f"series volumes: {volumes.built} built, {volumes.refused} slice-wise only"
               + (":" if volumes.reasons else ""))
    for reason, count in volumes.reasons:
        click.echo(f"  {count:>5} {reason}")


@click.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@config_option()
@click.pass_context
def ingest(ctx: click.Context, paths: tuple[Path, ...], quiet: bool) -> None:
    """Import DICOM files and folders without the network (same path as C-STORE).

    Files that are not DICOM Part-10 files are skipped and counted. The exit
    code is 1 when any DICOM file was refused or failed.
    """
    cfg = load(ctx)
    origin = Origin(ae_title="", host="ingest")
    files = list(walk_files(paths))
    tally: Counter[str] = Counter()
    problems: list[str] = []
    with catalogue(cfg) as (_, repo):
        store = InstanceStore(cfg, repo)
        with click.progressbar(files, label="ingest", hidden=quiet, file=sys.stderr) as bar:
            for path in bar:
                try:
                    with path.open("rb") as fh:
                        head = fh.read(132)
                        if len(head) < 132 or head[128:132] != b"DICM":
                            tally["not_dicom"] += 1
                            continue
                        data = head + fh.read()
                except OSError as exc:
                    tally["unreadable"] += 1
                    problems.append(f"{path}: {exc.strerror}")
                    continue
                try:
                    result = store.store(data, None, origin)
                except InvalidDataset as exc:
                    tally["refused"] += 1
                    problems.append(f"{path}: refused: {exc}")
                except (OutOfResources, StorageFailure) as exc:
                    tally["failed"] += 1
                    problems.append(f"{path}: failed: {exc}")
                    if isinstance(exc, OutOfResources):
                        break
                else:
                    tally[result.outcome.value] += 1
        store.close()
    for line in problems:
        click.echo(line, err=True)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(tally.items())) or "nothing to do"
    click.echo(f"ingest: {len(files)} files: {summary}")
    if tally["refused"] or tally["failed"] or tally["unreadable"]:
        ctx.exit(1)


@click.command()
@click.option("--checksums", is_flag=True,
              help="Also read every stored file and compare its SHA-256 with the one "
                   "recorded at reception (reads the whole archive).")
@click.option("--repair", is_flag=True,
              help="Move orphan files to <data_dir>/quarantine/orphans/ and remove stale "
                   "temporary files (refused while sidecar serve runs).")
@click.option("--min-age", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds: younger files without a row are not orphans (a store in flight "
                   "writes its file before its row).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option()
@click.pass_context
def verify(ctx: click.Context, checksums: bool, repair: bool, min_age: float,
           as_json: bool) -> None:
    """Check the catalogue against the stored files (missing, changed and orphan files).

    Exit code 0 when everything agrees, 1 when a recorded file is missing,
    changed or unreadable (acknowledged data at risk: restore it from backup or
    remove its study with `sidecar delete-study` so the PACS can send it again),
    2 when only orphans or stale temporaries are left (never acknowledged;
    --repair tidies them).
    """

    cfg = load(ctx)
    if repair and index_in_use(cfg):
        raise click.ClickException(
            "sidecar serve (or sidecar embed/reindex) is running: stop it to --repair "
            "(checking without --repair is safe while it runs)")
    with catalogue(cfg) as (engine, _):
        report = verify_storage(cfg, engine, checksums=checksums, min_age=min_age)
    if repair:
        repair_storage(cfg, report)
    logger.info("verify: %d rows, %d files: %d missing, %d wrong size, %d wrong checksum, "
                "%d unreadable, %d orphans (%d moved), %d stale temporaries (%d removed)",
                report.rows, report.files, len(report.missing), len(report.wrong_size),
                len(report.wrong_checksum), len(report.unreadable), len(report.orphans),
                len(report.moved_orphans), len(report.stale_temporaries),
                report.removed_temporaries)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        checked = f", {human(report.bytes_checked)} checksummed" if checksums else ""
        released = (f" ({report.released} released by storage.keep_files)"
                    if report.released else "")
        click.echo(f"verify: {report.rows} catalogue rows{released}, {report.files} files in "
                   f"{cfg.storage_dir}{checked}, {report.seconds:.1f} s")
        for what, items in (("MISSING (acknowledged, file gone)", report.missing),
                            ("WRONG SIZE (changed after reception)", report.wrong_size),
                            ("WRONG CHECKSUM (changed after reception)", report.wrong_checksum),
                            ("UNREADABLE", report.unreadable),
                            ("orphan (file without a row, never acknowledged)", report.orphans),
                            ("stale temporary", report.stale_temporaries),
                            ("released but still present (interrupted release)",
                             report.released_leftovers)):
            for rel in items:
                click.echo(f"  {what}: {rel}")
        if report.young_unrecorded:
            click.echo(f"  {report.young_unrecorded} file(s) younger than {min_age:g} s without "
                       "a row (stores in flight?) not judged")
        if repair:
            click.echo(f"repaired: {len(report.moved_orphans)} orphan(s) moved to "
                       f"{cfg.quarantine_dir / 'orphans'}, {report.removed_temporaries} "
                       "temporary file(s) removed"
                       + (f", {report.removed_leftovers} released file(s) removed"
                          if report.released_leftovers else ""))
        click.echo("verify: " + ("OK" if report.clean else
                                 f"{report.damaged} damaged" if report.damaged else
                                 "no damage; orphans or temporaries left (--repair)"))
    if report.damaged:
        ctx.exit(1)
    if not report.clean:
        ctx.exit(2)


@click.command("delete-study")
@click.argument("study_instance_uid")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option()
@click.pass_context
def delete_study(ctx: click.Context, study_instance_uid: str, yes: bool) -> None:
    """Delete a study: its files, rows and vectors (the index drops them on its
    next reconciliation: at once when no `sidecar serve` runs, else within
    index.save_interval seconds)."""
    cfg = load(ctx)
    if not yes:
        click.confirm(f"Delete study {study_instance_uid} and its files?", abort=True)
    with catalogue(cfg) as (_, repo):
        summary = repo.study_summary(study_instance_uid)
        paths = repo.delete_study(study_instance_uid)
    if paths is None or summary is None:
        raise click.ClickException(f"no study {study_instance_uid} in the catalogue")
    removed = remove_stored(cfg.storage_dir, paths)
    remove_previews(cfg.previews_dir, study_instance_uid)
    logger.info("study %s deleted: %d files removed", study_instance_uid, removed)
    audit_deletion(cfg, study_instance_uid, summary, "sidecar delete-study")
    click.echo(f"deleted study {study_instance_uid}: {len(paths)} instances, {removed} files")


def audit_deletion(cfg: Config, study_uid: str, summary: StudySummary, reason: str) -> None:
    """Record a DICOM Study Deleted message (the local file, and the collector when on)."""
    if not cfg.audit.enabled:
        return
    try:
        trail = audit_setup.open_trail(cfg)
    except (OSError, ValueError) as exc:  # the collector's TLS files (ssl.SSLError is OSError)
        logger.error("study %s deleted but not audited: audit.syslog: %s", study_uid, exc)
        click.echo(f"warning: the deletion was not audited (audit.syslog: {exc})", err=True)
        return
    trail.start()
    try:
        audit_setup.auditor(cfg, trail).study_deleted(
            Requester.cli().name, study_uid, summary.patient_id,
            summary.issuer_of_patient_id, sop_class_counts(summary.sop_classes.items()),
            reason=reason,
        )
    finally:
        trail.stop()
