"""The ``featgender`` command line: a thin typer skin over the library.

Options left out reach the library as ``None`` and are dropped there, so every default is
the library's own. Library errors (:class:`~featgender.errors.FeatgenderError`) become a
one-line ``Error: ...`` and exit status 1, in one place: :func:`_command`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Optional

import typer

from featgender.errors import FeatgenderError

app = typer.Typer(
    help="Gender classification from face images with frozen CNN features and scikit-learn heads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _command(function):
    """Register a command whose library errors print as one line instead of a traceback."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FeatgenderError as error:
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(1) from None

    return app.command()(run)


def _given(**options) -> dict:
    """Only the options the user gave: the library supplies the rest."""
    return {key: value for key, value in options.items() if value is not None}


DataOption = typer.Option(..., "--data", help="Dataset: CelebA folder (official or Kaggle layout), class folders, or a CSV file/folder.")
FormatOption = typer.Option(None, "--format", help="auto (default), celeba, celeba-kaggle, folder or csv.")
LimitOption = typer.Option(None, "--limit", help="Use a seeded subset of N images, stratified by split and label.")
BackboneOption = typer.Option(None, "--backbone", "-b", help="Backbone name (see `featgender backbones`); default efficientnet_lite0.")
WeightsOption = typer.Option(None, "--weights", help="default (pretrained), none (random init) or PATH to a state_dict file.")
BatchOption = typer.Option(None, "--batch-size", help="Images per forward pass (default 8 on CPU, 128 on GPU).")
DeviceOption = typer.Option(None, "--device", help="auto (GPU if there is one), cpu, or cuda[:N].")
WorkersOption = typer.Option(None, "--workers", help="Image decoding processes (default: 1 on CPU, up to 8 on GPU).")
DtypeOption = typer.Option(None, "--dtype", help="Stored feature type: float16 (default) or float32.")
PrecisionOption = typer.Option(None, "--precision", help="Compute type: auto (bfloat16 where the GPU/CPU runs it natively), float32, bfloat16.")


@_command
def extract(
    data: Path = DataOption,
    backbone: Optional[str] = BackboneOption,
    weights: Optional[str] = WeightsOption,
    layer: Optional[str] = typer.Option(None, "--layer", help="Graph node to embed from (default: pooled penultimate layer)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache file (default cache/<dataset>-<backbone>.h5)."),
    format: Optional[str] = FormatOption,
    limit: Optional[int] = LimitOption,
    batch_size: Optional[int] = BatchOption,
    device: Optional[str] = DeviceOption,
    workers: Optional[int] = WorkersOption,
    dtype: Optional[str] = DtypeOption,
    precision: Optional[str] = PrecisionOption,
    image_column: Optional[str] = typer.Option(None, "--image-column", help="CSV column of image paths."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="CSV column of gender labels."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache (or unfinished one) of different identity."),
) -> None:
    """Embed every image of a dataset once into an HDF5 feature cache (resumable: rerun after a crash)."""
    from featgender.cache import extract_to_cache

    result = extract_to_cache(
        data,
        overwrite=overwrite,
        **_given(backbone=backbone, weights=weights, layer=layer, out=out, format=format, limit=limit,
                 batch_size=batch_size, device=device, workers=workers, dtype=dtype,
                 precision=precision, image_column=image_column, label_column=label_column),
    )
    if result.status == "up to date":
        typer.echo(f"{result.path}: already complete ({result.num_images} images); nothing to do")
    else:
        resumed = f", resumed at image {result.resumed_from}" if result.resumed_from else ""
        typer.echo(f"{result.path}: {result.num_images} images, {result.num_failed} failed{resumed}")


@_command
def info(
    cache: Path = typer.Argument(..., help="A cache file written by `featgender extract`."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print a cache's metadata and its image counts per split."""
    from featgender.cache import cache_summary

    summary = cache_summary(cache)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for key, value in summary.items():
        if key == "splits":
            for split, counts in value.items():
                typer.echo(f"{'split ' + split:>20}: {counts['images']} images, {counts['male']} male")
        else:
            typer.echo(f"{key:>20}: {value}")


@_command
def backbones() -> None:
    """List the backbone registry: feature width, input size, whether its weights are here now."""
    from featgender.backbones import get_config, list_backbones, weights_available

    typer.echo(f"{'name':<20} {'dim':>5} {'input':>6}  {'weights here':<12} weights")
    for name in list_backbones():
        config = get_config(name)
        here = "yes" if weights_available(config) else "no"
        typer.echo(f"{name:<20} {config.feature_dim:>5} {config.input_size:>6}  {here:<12} {config.weights}")


@_command
def download(
    dataset: str = typer.Argument(..., help="Dataset to download: celeba."),
    root: Path = typer.Argument(..., help="Folder to download into (CelebA lands in ROOT/celeba)."),
) -> None:
    """Download a dataset with torchvision's downloader (needs a network)."""
    from featgender.data import download_celeba

    if dataset.lower() != "celeba":
        raise FeatgenderError(f"download {dataset!r}: only celeba can be downloaded")
    target = download_celeba(root)
    typer.echo(f"CelebA is in {target}; next: featgender extract --data {target}")


@_command
def demo(
    data: Path = DataOption,
    backbone: Optional[str] = BackboneOption,
    limit: Optional[int] = LimitOption,
    format: Optional[str] = FormatOption,
    device: Optional[str] = DeviceOption,
) -> None:
    """Run the whole path offline: extract a cache, fit a head on train, print test metrics."""
    from featgender.demo import run_demo

    result = run_demo(data, **_given(backbone=backbone, limit=limit, format=format, device=device))
    cache, test = result["cache"], result["test"]
    typer.echo(f"cache: {cache.path} ({cache.status}, {cache.num_images} images)")
    typer.echo(f"head: {result['head']}, trained on {result['train_images']} images")
    typer.echo(
        f"test ({test['n']} images): accuracy {test['accuracy']:.4f}, balanced accuracy "
        f"{test['balanced_accuracy']:.4f}, F1 {test['f1']:.4f}, ROC-AUC {test.get('roc_auc', float('nan')):.4f}"
    )


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app()
