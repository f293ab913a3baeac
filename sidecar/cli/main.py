"""Command-line interface; the only place that configures logging.

Domain errors become a clean message and a non-zero exit code here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, cast

import click
import yaml

from sidecar.archive.layout import remove_stored
from sidecar.cli.models_text import describe
from sidecar.config import CONFIG_ENV, Config, load_config
from sidecar.errors import (
    ConfigError,
    InvalidDataset,
    OutOfResources,
    SidecarError,
    StorageFailure,
)
from sidecar.files import walk_files
from sidecar.logsetup import configure_logging
from sidecar.sdnotify import notify

logger = logging.getLogger("sidecar")

DEFAULT_CONFIG = Path("config/sidecar.yaml")


def _load(ctx: click.Context) -> Config:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "config" not in obj:
        path = obj.get("config_path")
        if path is None and not os.environ.get(CONFIG_ENV) and DEFAULT_CONFIG.exists():
            path = DEFAULT_CONFIG
        try:
            obj["config"] = load_config(path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        configure_logging(obj.get("log_level") or obj["config"].logging.level)
    cfg: Config = obj["config"]
    return cfg


@click.group()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"YAML configuration (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG} if present).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Override logging.level.",
)
@click.version_option(package_name="pacs-sidecar")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str | None) -> None:
    """pacs-sidecar: DICOM similarity search beside a PACS."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["log_level"] = log_level.upper() if log_level else None


@main.command("check-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Configuration file to check.")
@click.pass_context
def check_config(ctx: click.Context, config_path: Path | None) -> None:
    """Validate the configuration and print the effective settings.

    With dicom.tls.enabled, also loads the certificate, key and CA files and
    prints until when the certificate is valid (a warning within 30 days; an
    expired one is an error).
    """
    if config_path is not None:
        ctx.obj["config_path"] = config_path
    cfg = _load(ctx)
    cert_line = None
    if cfg.dicom.tls.enabled:
        from sidecar.dicom.tls import checked_certificate

        try:
            cert = checked_certificate(cfg.dicom.tls)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        soon = cert.expires_soon()
        cert_line = (f"# {'WARNING: ' if soon else ''}DICOM TLS certificate {cert.describe()}"
                     + (": renew it soon" if soon else ""))
    click.echo(yaml.safe_dump(cfg.effective(), sort_keys=False).rstrip("\n"))
    if cert_line is not None:
        click.echo(cert_line, err=True)
    click.echo("# configuration OK", err=True)


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the DICOM node and the scheduled jobs in the foreground until stopped."""
    from sidecar.service.app import Sidecar

    cfg = _load(ctx)
    stop = threading.Event()

    def _signal(signum: int, _frame: Any) -> None:
        logger.info("received signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, _signal)
    signal.signal(signal.SIGTERM, _signal)
    try:
        app = Sidecar(
            cfg,
            receiver_processes=None,
            log_level=ctx.obj.get("log_level") or cfg.logging.level,
        )
    except Exception as exc:
        raise click.ClickException(f"cannot start: {exc}") from exc
    try:
        host, port = app.start()
    except OSError as exc:
        app.stop()
        raise click.ClickException(
            f"cannot listen on {cfg.dicom.bind_address}:{cfg.dicom.port}: {exc.strerror}"
        ) from exc
    except SidecarError as exc:  # the index is busy, say
        app.stop()
        raise click.ClickException(f"cannot start: {exc}") from exc
    click.echo(f"sidecar ready: AE {cfg.dicom.ae_title} on {host}:{port}, data in {cfg.data_dir}",
               err=True)
    notify(f"READY=1\nSTATUS=AE {cfg.dicom.ae_title} on {host}:{port}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        notify("STOPPING=1")
        app.stop()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Instance counts by state, studies and disk use."""
    from sidecar.archive.store import quarantine_usage
    from sidecar.service.app import open_catalogue

    cfg = _load(ctx)
    from sidecar.db.vectors import ACTIVE_MODEL_KEY, VectorRepository

    engine, repo = open_catalogue(cfg)
    try:
        rep = repo.status()
        vrepo = VectorRepository(engine)
        vectors = vrepo.count_vectors()
        active_model = vrepo.get_setting(ACTIVE_MODEL_KEY)
        retrying, given_up = vrepo.failed_breakdown(cfg.worker.max_attempts)
    finally:
        engine.dispose()
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
    click.echo(f"stored: {_human(rep.stored_bytes)}   disk free: {_human(disk.free)} "
               f"of {_human(disk.total)}{refusing} {_human(floor)} (storage.min_free_mb)")
    click.echo(f"quarantine: {quarantine.datasets} refused dataset(s), "
               f"{_human(quarantine.bytes)} of {_human(cfg.storage.quarantine_max_mb * 2**20)} "
               f"({cfg.quarantine_dir})")
    click.echo(f"active model: {active_model or '(none yet)'}")
    for model_id, count in sorted(vectors.items()):
        click.echo(f"  vectors of model {model_id}: {count}")


@main.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def ingest(ctx: click.Context, paths: tuple[Path, ...], quiet: bool) -> None:
    """Import DICOM files and folders without the network (same path as C-STORE).

    Files that are not DICOM Part-10 files are skipped and counted. The exit
    code is 1 when any DICOM file was refused or failed.
    """
    from sidecar.archive.store import InstanceStore, Origin
    from sidecar.service.app import open_catalogue

    cfg = _load(ctx)
    engine, repo = open_catalogue(cfg)
    store = InstanceStore(cfg, repo)
    origin = Origin(ae_title="", host="ingest")
    files = list(walk_files(paths))
    tally: Counter[str] = Counter()
    problems: list[str] = []
    try:
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
    finally:
        engine.dispose()
    for line in problems:
        click.echo(line, err=True)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(tally.items())) or "nothing to do"
    click.echo(f"ingest: {len(files)} files: {summary}")
    if tally["refused"] or tally["failed"] or tally["unreadable"]:
        ctx.exit(1)


@main.command()
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
    from sidecar.archive.verify import repair_storage, verify_storage
    from sidecar.embeddings.registry import index_in_use
    from sidecar.service.app import open_catalogue

    cfg = _load(ctx)
    if repair and index_in_use(cfg):
        raise click.ClickException(
            "sidecar serve (or sidecar embed/reindex) is running: stop it to --repair "
            "(checking without --repair is safe while it runs)")
    engine, _ = open_catalogue(cfg)
    try:
        report = verify_storage(cfg, engine, checksums=checksums, min_age=min_age)
    finally:
        engine.dispose()
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
        checked = f", {_human(report.bytes_checked)} checksummed" if checksums else ""
        click.echo(f"verify: {report.rows} catalogue rows, {report.files} files in "
                   f"{cfg.storage_dir}{checked}, {report.seconds:.1f} s")
        for what, items in (("MISSING (acknowledged, file gone)", report.missing),
                            ("WRONG SIZE (changed after reception)", report.wrong_size),
                            ("WRONG CHECKSUM (changed after reception)", report.wrong_checksum),
                            ("UNREADABLE", report.unreadable),
                            ("orphan (file without a row, never acknowledged)", report.orphans),
                            ("stale temporary", report.stale_temporaries)):
            for rel in items:
                click.echo(f"  {what}: {rel}")
        if report.young_unrecorded:
            click.echo(f"  {report.young_unrecorded} file(s) younger than {min_age:g} s without "
                       "a row (stores in flight?) not judged")
        if repair:
            click.echo(f"repaired: {len(report.moved_orphans)} orphan(s) moved to "
                       f"{cfg.quarantine_dir / 'orphans'}, {report.removed_temporaries} "
                       "temporary file(s) removed")
        click.echo("verify: " + ("OK" if report.clean else
                                 f"{report.damaged} damaged" if report.damaged else
                                 "no damage; orphans or temporaries left (--repair)"))
    if report.damaged:
        ctx.exit(1)
    if not report.clean:
        ctx.exit(2)


@main.command("delete-study")
@click.argument("study_instance_uid")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def delete_study(ctx: click.Context, study_instance_uid: str, yes: bool) -> None:
    """Delete a study: its files, rows and vectors (the index drops them on its
    next reconciliation: at once when no `sidecar serve` runs, else within
    index.save_interval seconds)."""
    from sidecar.service.app import open_catalogue

    cfg = _load(ctx)
    if not yes:
        click.confirm(f"Delete study {study_instance_uid} and its files?", abort=True)
    engine, repo = open_catalogue(cfg)
    try:
        paths = repo.delete_study(study_instance_uid)
    finally:
        engine.dispose()
    if paths is None:
        raise click.ClickException(f"no study {study_instance_uid} in the catalogue")
    removed = remove_stored(cfg.storage_dir, paths)
    logger.info("study %s deleted: %d files removed", study_instance_uid, removed)
    click.echo(f"deleted study {study_instance_uid}: {len(paths)} instances, {removed} files")


def _open_embedding(ctx: click.Context) -> Any:
    """Catalogue + embedding parts for a one-shot command (index lock taken)."""
    from sidecar.embeddings.service import IndexBusy
    from sidecar.service.app import open_catalogue
    from sidecar.service.lifecycle import Embedding

    cfg = _load(ctx)
    engine, repo = open_catalogue(cfg)
    try:
        emb = Embedding(cfg, engine)
    except SidecarError as exc:  # ModelError: model file missing, corrupt or unfit
        engine.dispose()
        raise click.ClickException(f"cannot load the embedding model: {exc}") from exc
    try:
        emb.open()
    except IndexBusy as exc:
        engine.dispose()
        raise click.ClickException(str(exc)) from exc
    return cfg, engine, repo, emb


def _run_worker(emb: Any, repo: Any, cfg: Config, quiet: bool) -> Any:
    from sidecar.embeddings.worker import WorkStats

    total = WorkStats()
    due = repo.status().instances_by_state.get("pending", 0)
    with click.progressbar(length=max(due, 1), label="embed", hidden=quiet,
                           file=sys.stderr) as bar:
        while True:
            stats = emb.run_job(progress=bar.update)
            total.merge(stats)
            if stats.series == 0:
                break
    return total


@main.command()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def embed(ctx: click.Context, quiet: bool) -> None:
    """Run the embedding job in the foreground until nothing is due.

    Studies quiet for stability.stable_age seconds are marked stable first; only
    stable studies are embedded. Refuses to run while `sidecar serve` owns the index.
    """
    cfg, engine, repo, emb = _open_embedding(ctx)
    try:
        repo.mark_stable_studies(cfg.stability.stable_age)
        total = _run_worker(emb, repo, cfg, quiet)
    finally:
        emb.close()
        engine.dispose()
    click.echo(
        f"embed: {total.slices_embedded} slices from {total.instances_embedded} instances "
        f"in {total.series} series, {total.instances_failed} failed, {total.seconds:.1f} s"
    )


@main.command()
@click.option("--reembed", is_flag=True,
              help="Run the CNN again on every instance instead of using stored vectors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def reindex(ctx: click.Context, reembed: bool, quiet: bool) -> None:
    """Rebuild the vector index from stored vectors (or re-embed with --reembed)."""
    cfg, engine, repo, emb = _open_embedding(ctx)
    try:
        if reembed:
            n = emb.vectors.requeue(emb.embedder.model_id)
            emb.index.rebuild()
            click.echo(f"reindex: {n} instances queued for embedding", err=True)
            total = _run_worker(emb, repo, cfg, quiet)
            click.echo(f"reindex: re-embedded {total.slices_embedded} slices, "
                       f"{total.instances_failed} failed")
        else:
            count = emb.index.rebuild()
            click.echo(f"reindex: index of model {emb.embedder.model_id} rebuilt "
                       f"from {count} stored vectors")
    finally:
        emb.close()
        engine.dispose()


@main.group()
def model() -> None:
    """The embedding models: which exist, which is active, going back to an earlier one."""


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def model_list(ctx: click.Context, as_json: bool) -> None:
    """Models with vectors or recorded by on-site adaptation, and which one is active.

    Columns: the model id, where it comes from (shipped weights, adapted by
    on-site adaptation, other: e.g. a TorchScript embedding.model_path), its
    stored vectors, the model it was adapted from and its held-out score
    (its parent's in brackets). `*` marks the active model (its index answers
    queries), `>` the model the next start of `sidecar serve` loads (they
    differ while a model change re-embeds).
    """
    from sidecar.db.vectors import VectorRepository
    from sidecar.embeddings.registry import list_models
    from sidecar.service.app import open_catalogue

    cfg = _load(ctx)
    engine, _ = open_catalogue(cfg)
    try:
        rows = list_models(cfg, VectorRepository(engine))
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps({"models": [r.to_json() for r in rows],
                               "model_path": (str(cfg.embedding.model_path)
                                              if cfg.embedding.model_path else None)}, indent=2))
        return
    for line in describe(rows):
        click.echo(line)
    if cfg.embedding.model_path is not None:
        click.echo(f"embedding.model_path is set: the service loads {cfg.embedding.model_path}")


@model.command("restore")
@click.argument("model_id", required=False)
@click.pass_context
def model_restore(ctx: click.Context, model_id: str | None) -> None:
    """Go back to the previous model, or to MODEL_ID (see `sidecar model list`).

    Without MODEL_ID: the model the current adapted model was made from. The
    choice is recorded in the catalogue and applies when `sidecar serve`
    (re)starts. No vector is ever deleted, so going back costs no CNN run for
    what the restored model embedded before: when its vectors cover every
    embedded series it is active at once (its index is loaded, or rebuilt from
    the stored vectors, at the next start). Otherwise (studies received since
    it was replaced, or a running service) the next start treats it as a
    model change: the current index keeps answering queries while only the
    missing series are embedded in the background, then it becomes active.
    Refused while embedding.model_path is set (the configuration chooses).
    """
    from sidecar.embeddings.registry import index_in_use, restore_model
    from sidecar.service.app import open_catalogue

    cfg = _load(ctx)
    running = index_in_use(cfg)
    engine, _ = open_catalogue(cfg)
    try:
        plan = restore_model(cfg, engine, model_id, service_running=running)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()
    what = "the shipped weights" if plan.path is None else plan.path
    click.echo(f"model {plan.model_id} ({what}) restored; was {plan.previous_model_id or '-'}")
    if plan.activated:
        click.echo("its vectors cover the archive: it is the active model now (no CNN run)")
    elif plan.missing_series:
        click.echo(f"{plan.missing_series} series lack its vectors: the next start of sidecar "
                   "serve embeds them in the background while the current index serves, then "
                   "switches")
    else:
        click.echo("its vectors cover the archive: the next start of sidecar serve switches "
                   "to it without a CNN run")
    if running:
        click.echo("sidecar serve (or another command) holds the index: restart it to apply",
                   err=True)


@main.command()
@click.option("--no-reembed", is_flag=True,
              help="Only record an accepted model; the next `sidecar serve` re-embeds in the "
              "background.")
@click.option("--from-npz", "npz", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Adapt on the train pixels of a labelled .npz instead of the archive "
              "(evaluation; needs --out; the catalogue is not touched).")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="With --from-npz: directory for the adapted weights (.pt and .json).")
@click.option("--model", "model_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --from-npz: SliceNetV1 weights to start from (default: shipped).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def adapt(
    ctx: click.Context, no_reembed: bool, npz: Path | None, out_dir: Path | None,
    model_path: Path | None, as_json: bool, quiet: bool,
) -> None:
    """Run one on-site adaptation now, in the foreground, with the adaptation.* settings.

    Fine-tunes the current model on the archive's embedded slices, scores it
    against the current model on held-out series, and keeps it only if it is
    better by adaptation.min_improvement. An accepted model is recorded and the
    archive is re-embedded with it here (unless --no-reembed), then it becomes
    active; `sidecar model restore` goes back.

    Needs the index for itself: refused while `sidecar serve` runs (a running
    service adapts on its own schedule when adaptation.enabled is true; stop it
    to adapt now). Exit codes: 0 a candidate was trained and accepted or
    rejected, 1 nothing was compared (too few slices, time budget, ...).

    With --from-npz FILE --out DIR: adapts the shipped model (or --model) on
    the train images of a labelled .npz instead (labels unused), saves the
    candidate in DIR whether accepted or not, and prints both scores; then
    `sidecar evaluate FILE --model DIR/<id>.pt` measures what adaptation adds.
    """
    from sidecar.embeddings.registry import index_in_use
    from sidecar.training.adapt import AdaptationBusy, adapt_npz

    cfg = _load(ctx)
    if npz is not None:
        if out_dir is None:
            raise click.UsageError("--from-npz needs --out DIR")
        try:
            outcome = adapt_npz(cfg, npz, out_dir, weights=model_path)
        except (SidecarError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        if out_dir is not None or model_path is not None:
            raise click.UsageError("--out and --model go with --from-npz")
        if index_in_use(cfg):
            raise click.ClickException(
                "the index is in use by sidecar serve (or sidecar embed/reindex): stop it to "
                "adapt now; a running service adapts on its schedule (adaptation.enabled, "
                "adaptation.schedule)"
            )
        cfg, engine, repo, emb = _open_embedding(ctx)
        try:
            try:
                outcome = emb.adapt()
            except AdaptationBusy as exc:
                raise click.ClickException(str(exc)) from exc
            if outcome.accepted and not no_reembed and emb.reembedding:
                total = _run_worker(emb, repo, cfg, quiet)
                click.echo(f"adapt: re-embedded {total.slices_embedded} slices of "
                           f"{total.series} series with model {emb.model.model_id}", err=True)
        finally:
            emb.close()
            engine.dispose()
    if as_json:
        click.echo(json.dumps(outcome.to_dict(), indent=2))
    else:
        click.echo(f"adapt: {outcome.reason}")
        if outcome.weights_path is not None:
            click.echo(f"adapt: weights {outcome.weights_path}")
    if outcome.candidate_score is None:
        ctx.exit(1)


def _read_query_images(path: Path) -> list[Any]:
    """The DICOM Part-10 files under ``path`` (a file or a folder), parsed."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

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
    from sidecar.search.types import SearchResult

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


@main.command()
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
    from sidecar.search.front import QueryService, Requester, SimilarityRequest
    from sidecar.search.readonly import ReadOnlyEmbedding
    from sidecar.search.service import SearchService
    from sidecar.search.types import Level, Reference, SearchFilters
    from sidecar.service.app import open_catalogue

    given = [x for x in (file_or_folder, study_uid, series_uid, instance_uid) if x]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one reference: FILE_OR_FOLDER, --study, --series or --instance"
        )
    cfg = _load(ctx)
    datasets = _read_query_images(file_or_folder) if file_or_folder is not None else []

    engine, _ = open_catalogue(cfg)

    def _embedder() -> Any:
        from sidecar.db.vectors import VectorRepository
        from sidecar.embeddings.registry import load_service_embedder

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
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_result(result)


@main.command()
@click.option("--data", "data", multiple=True, required=True,
              type=click.Path(exists=True, path_type=Path),
              help="Training images (repeatable): .npz in the MedMNIST layout (only "
              "train_images is read: no labels, no val or test) and/or DICOM files or "
              "folders (every image series; neighbouring slices serve as positives).")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the weights (.pt) and their description (.json).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the recipe's number of epochs.")
@click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
@click.option("--recipe", "recipe_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file with TrainRecipe fields (missing ones take the defaults), or "
              "the JSON beside trained weights (their recipe is reused).")
@click.option("--init", "init_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from these SliceNetV1 weights (.pt with .json beside it) instead "
              "of a random initialisation; their architecture and input size are used.")
@click.option("--quiet", "-q", is_flag=True, help="No per-epoch progress.")
@click.pass_context
def train(
    ctx: click.Context,
    data: tuple[Path, ...],
    out_dir: Path,
    epochs: int | None,
    seed: int | None,
    recipe_path: Path | None,
    init_path: Path | None,
    quiet: bool,
) -> None:
    """Train the embedding CNN without labels (self-supervised, contrastive).

    Images go through the worker's pre-processing (configuration's preprocess
    and embedding.input_size). Writes the weights and a JSON with the recipe,
    seed, data manifest (SHA-256 of every input), torch version and time
    taken; use them with `sidecar evaluate --model PATH`.
    """
    from sidecar.embeddings.model import load_weights
    from sidecar.files import sha256_file
    from sidecar.training import selfsup as training
    from sidecar.training.data import load_training_data

    cfg = _load(ctx)
    try:
        raw: dict[str, Any] = {}
        if recipe_path is not None:
            raw = json.loads(recipe_path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("the recipe file must hold a JSON object")
            trained = raw.get("training")
            if isinstance(trained, dict) and isinstance(trained.get("recipe"), dict):
                raw = dict(trained["recipe"])  # a weights JSON: the recipe that made them
        raw.setdefault("input_size", cfg.embedding.input_size)
        if epochs is not None:
            raw["epochs"] = epochs
        if seed is not None:
            raw["seed"] = seed
        init_state = None
        if init_path is not None:
            model, info = load_weights(init_path)
            raw["hparams"] = info.hparams.to_json()
            raw["input_size"] = info.input_size
            init_state = model.state_dict()
        recipe = training.TrainRecipe.from_dict(raw)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"bad recipe: {exc}") from exc
    except SidecarError as exc:
        raise click.ClickException(f"cannot load --init weights: {exc}") from exc
    try:
        loaded = load_training_data(data, cfg, recipe.input_size)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the training data: {exc}") from exc
    manifest = dict(loaded.manifest)
    if init_path is not None:
        manifest["init"] = {"path": str(init_path), "sha256": sha256_file(init_path)}
    click.echo(f"train: {loaded.images.shape[0]} images ({manifest['grouped_images']} in DICOM "
               f"series), {recipe.epochs} epochs, seed {recipe.seed}, {recipe.threads} threads",
               err=True)

    def _progress(epoch: int, loss: float) -> None:
        if not quiet:
            click.echo(f"epoch {epoch}/{recipe.epochs}: loss {loss:.4f}", err=True)

    result = training.train_model(loaded.images, recipe, init_state=init_state,
                                  groups=loaded.groups, progress=_progress,
                                  sources=loaded.sources, studies=loaded.studies)
    try:
        path = training.save_weights(out_dir, result, recipe, manifest)
    except OSError as exc:
        raise click.ClickException(f"cannot write the weights: {exc}") from exc
    click.echo(f"train: wrote {path} and {path.with_suffix('.json').name}, model id "
               f"{result.model_id}, {result.seconds:.0f} s")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--path", "which", type=click.Choice(["a", "b", "both"]), default="a",
              show_default=True,
              help="a: the model alone (pre-processing, CNN, exact cosine); b: the product "
              "(C-STORE, worker, query by example, similarity C-FIND; slower); both.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Path (b) only: at most N queries and N near-duplicate copies "
              "(seeded samples). Path (a) always uses every query.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Queries: test to report, val to tune (the gallery is always train).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the samples, the perturbations and the bootstrap.")
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=0), default=1000,
              show_default=True, help="Bootstrap resamples for the 95 % intervals (0: none).")
@click.option("--model", "model_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TorchScript file, or SliceNetV1 weights with their .json beside them "
              "(default: the configured model).")
@click.pass_context
def evaluate(
    ctx: click.Context,
    file: Path,
    which: str,
    limit: int | None,
    split: str,
    as_json: bool,
    seed: int,
    n_boot: int,
    model_path: Path | None,
) -> None:
    """Retrieval quality on a labelled .npz in the MedMNIST layout.

    Gallery = train, queries = test (or val). Prints P@1, P@10, mAP over the
    full ranking, kNN-11 accuracy, Mahbod et al.'s mAP@5 and ACC@1 and the
    near-duplicate rate with bootstrap 95 % intervals, beside the raw-pixel
    baseline and the majority-class rate. Path (b) runs a sidecar in-process
    on a temporary directory; the configured data directory is not touched.
    """
    from sidecar.lab import evaluate as ev
    from sidecar.lab.report import format_table

    cfg = _load(ctx)
    try:
        embedder = ev.load_model(cfg, model_path)
    except SidecarError as exc:
        raise click.ClickException(f"cannot load the embedding model: {exc}") from exc
    try:
        report = ev.evaluate(
            file, cfg, embedder, which=cast("ev.Which", which),  # click.Choice checked it
            split=split, limit=limit, n_boot=n_boot, seed=seed,
        )
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_table(report))


if __name__ == "__main__":  # pragma: no cover
    main()
