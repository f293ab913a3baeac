"""`sidecar evaluate`: retrieval quality on a labelled data set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import click

from sidecar.cli.options import config_option, load
from sidecar.errors import SidecarError


@click.command()
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
              help="ONNX (.onnx with its .onnx.json) or TorchScript file, or SliceNetV1 "
              "weights with their .json beside them "
              "(default: the configured model).")
@config_option()
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
    # lab loads torch and the whole service: only for this command
    from sidecar.lab import evaluate as ev  # noqa: PLC0415
    from sidecar.lab.report import format_table  # noqa: PLC0415

    cfg = load(ctx)
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
