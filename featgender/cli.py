"""The ``featgender`` command line: a thin typer skin over the library.

Options left out reach the library as ``None`` and are dropped there, so every default is
the library's own. Library errors (:class:`~featgender.errors.FeatgenderError`) become a
one-line ``Error: ...`` and exit status 1, in one place: :func:`_command`.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path

import typer

from featgender.defaults import DEFAULT_BACKBONE, DEFAULT_HEAD, SERVE_HOST, SERVE_PORT, default_model_path
from featgender.errors import FeatgenderError

app = typer.Typer(
    help="Gender classification from face images with frozen CNN features and scikit-learn heads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


TRAINING_STACK = ("torch", "torchvision", "sklearn", "h5py", "joblib")  # the 'train' extra's top-level modules


def _command(function):
    """Register a command whose library errors print as one line instead of a traceback."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FeatgenderError as error:
            typer.echo(f"Error: {error}", err=True)
            raise typer.Exit(1) from None
        except ModuleNotFoundError as error:
            if error.name not in TRAINING_STACK:
                raise
            typer.echo(
                f"Error: {function.__name__.replace('_', '-')} needs {error.name}, which this install lacks: "
                "pip install 'featgender[train]' (an install with only 'onnx' predicts and serves exported models)",
                err=True,
            )
            raise typer.Exit(1) from None

    run.__doc__ = _unwrapped(function.__doc__ or "")
    return app.command()(run)


def _unwrapped(docstring: str) -> str:
    """A docstring's paragraphs each on one line: rich keeps a source line break in `--help`'s command list."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(docstring).split("\n\n"))


def _given(**options) -> dict:
    """Only the options the user gave: the library supplies the rest."""
    return {key: value for key, value in options.items() if value is not None}


FaceBoxOption = typer.Option(
    None,
    "--face-box",
    help=(
        "dlib_resnet only: auto (default: where faces sit still in the dataset's aligned crops, skip detection), "
        "detect (in every image), or L,T,R,B fractions."
    ),
)
DataOption = typer.Option(
    ..., "--data", help="Dataset: CelebA folder (official or Kaggle layout), class folders, or a CSV file/folder."
)
FormatOption = typer.Option(None, "--format", help="auto (default), celeba, celeba-kaggle, fairface, folder or csv.")
LimitOption = typer.Option(None, "--limit", help="Use a seeded subset of N images, stratified by split and label.")
BackboneOption = typer.Option(
    None, "--backbone", "-b", help=f"Backbone name (see `featgender backbones`); default {DEFAULT_BACKBONE}."
)
WeightsOption = typer.Option(
    None,
    "--weights",
    help="default (pretrained), none (random init) or PATH to a state_dict file (dlib_resnet: or dlib's .dat).",
)
BatchOption = typer.Option(None, "--batch-size", help="Images per forward pass (default 8 on CPU, 128 on GPU).")
DeviceOption = typer.Option(None, "--device", help="auto (GPU if there is one), cpu, or cuda[:N].")
WorkersOption = typer.Option(None, "--workers", help="Image decoding processes (default: 1 on CPU, up to 8 on GPU).")
DtypeOption = typer.Option(None, "--dtype", help="Stored feature type: float16 (default) or float32.")
PrecisionOption = typer.Option(
    None, "--precision", help="Compute type: auto (bfloat16 where the GPU/CPU runs it natively), float32, bfloat16."
)


@_command
def extract(
    data: Path = DataOption,
    backbone: str | None = BackboneOption,
    weights: str | None = WeightsOption,
    layer: list[str] | None = typer.Option(
        None,
        "--layer",
        help=(
            "Graph node to embed from (default: the backbone's embedding layer; `featgender layers` lists them). "
            "Repeat for several: one forward pass, one cache per layer."
        ),
    ),
    out: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Cache file (default cache/<dataset>-<backbone>[@<layer>].h5); with several --layer, put {layer} in it.",
    ),
    format: str | None = FormatOption,
    limit: int | None = LimitOption,
    batch_size: int | None = BatchOption,
    device: str | None = DeviceOption,
    workers: int | None = WorkersOption,
    dtype: str | None = DtypeOption,
    precision: str | None = PrecisionOption,
    flip: bool = typer.Option(
        False, "--flip", help="Average each embedding with the mirrored image's (2x the compute)."
    ),
    image_column: str | None = typer.Option(None, "--image-column", help="CSV column of image paths."),
    label_column: str | None = typer.Option(None, "--label-column", help="CSV column of gender labels."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a cache (or unfinished one) of different identity."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Stop at the first unreadable image instead of recording and skipping it."
    ),
    faces: str | None = typer.Option(
        None,
        "--faces",
        help=(
            "crop (default): images are face crops; photo: find the largest face in each photo first (dlib, extra "
            "'faces'); photos without a face are recorded as failed."
        ),
    ),
    face_box: str | None = FaceBoxOption,
) -> None:
    """Embed every image of a dataset once into an HDF5 feature cache (resumable: rerun after a crash)."""
    from featgender.extract import extract_layers

    results = extract_layers(
        data,
        overwrite=overwrite,
        strict=strict,
        flip=flip,
        **_given(
            backbone=backbone,
            weights=weights,
            layers=layer or None,
            out=out,
            format=format,
            limit=limit,
            batch_size=batch_size,
            device=device,
            workers=workers,
            dtype=dtype,
            precision=precision,
            image_column=image_column,
            label_column=label_column,
            face_box=face_box,
            faces=faces,
        ),
    )
    for result in results:
        if result.status == "up to date":
            typer.echo(f"{result.path}: already complete ({result.num_images} images); nothing to do")
        else:
            resumed = f", resumed at image {result.resumed_from}" if result.resumed_from else ""
            typer.echo(f"{result.path}: {result.num_images} images, {result.num_failed} failed{resumed}")


@_command
def info(
    cache: Path = typer.Argument(..., help="A cache file written by `featgender extract`, or one it is still writing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print a cache's metadata and its image counts per split; of one still being extracted,
    how many images are done (finished_rows)."""
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
def layers(
    backbone: str = typer.Option(
        DEFAULT_BACKBONE, "--backbone", "-b", help="Backbone name (see `featgender backbones`)."
    ),
    all_nodes: bool = typer.Option(False, "--all", help="Every traced graph node, not only the blocks."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the layers one can embed from (--layer), in forward order: output shape per image,
    pooled feature width; the default embedding layer marked with *."""
    from dataclasses import asdict

    from featgender.layers import list_layers

    found = list_layers(backbone, all_nodes=all_nodes)
    if as_json:
        typer.echo(json.dumps([asdict(layer) for layer in found], indent=2))
        return
    typer.echo(f"  {'layer':<40} {'output per image':<20} {'dim':>6}")
    for layer in found:
        shape = " x ".join(map(str, layer.shape))
        typer.echo(f"{'*' if layer.default else ' '} {layer.name:<40} {shape:<20} {layer.feature_dim:>6}")


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


CacheOption = typer.Option(
    ..., "--cache", "-c", help="Feature cache (repeat to join several backbones' caches by image id)."
)


def _announce(model: Path) -> None:
    """Say which model file is about to be used, by its sha256."""
    if model.is_file():
        from featgender.files import file_sha256

        typer.echo(f"model {model}: sha256 {file_sha256(model)}", err=True)


ModelOption = typer.Option(
    ...,
    "--model",
    "-m",
    help=(
        "Model written by `featgender fit` (.joblib), `featgender finetune` (.pt) or `featgender export` (.onnx: "
        "runs on onnxruntime, no torch needed)."
    ),
)
TrustedOption = typer.Option(
    False,
    "--trusted",
    help=(
        "Open a model file not written by featgender on this machine (loading it runs a pickle: only for sources you "
        "trust)."
    ),
)
GroupsOption = typer.Option(
    None, "--groups", help="Comma-separated attributes to slice by (default: CelebA's eight, or age and race)."
)


def _print_metrics(evaluation: dict, dataset: str = "") -> None:
    ci = evaluation["ci95"]
    typer.echo(
        f"{dataset + ', ' if dataset else ''}{evaluation['split']} ({evaluation['n']} images"
        f"{' of ' + str(len(evaluation['datasets'])) + ' datasets, pooled' if 'datasets' in evaluation else ''}):"
    )
    from featgender.metrics import METRICS

    for name in METRICS:
        if name in evaluation:
            typer.echo(f"  {name:<18} {evaluation[name]:.4f}  (95% CI {ci[name][0]:.4f} - {ci[name][1]:.4f})")
    for attribute, slices in evaluation["subgroups"].items():
        worst = min(slices["groups"].items(), key=lambda item: item[1]["accuracy"])
        typer.echo(
            f"  {attribute}: largest accuracy gap {slices['accuracy_gap']:.4f} "
            f"(lowest: {worst[0]} {worst[1]['accuracy']:.4f}, n={worst[1]['n']})"
        )
    from featgender.report import group_gender_headline, group_gender_lines

    for attribute, table in evaluation.get("group_gender", {}).items():
        typer.echo(f"  errors per {attribute} x gender ({group_gender_headline(table)}):")
        for line in group_gender_lines(table):
            typer.echo(f"    {line}")
    if "label_audit" in evaluation:
        from featgender.report import audit_sentence

        typer.echo(f"  labels checked by identity: {audit_sentence(evaluation['label_audit'])}")
    for name, own in evaluation.get("datasets", {}).items():
        _print_metrics(own, name)


InProgressOption = typer.Option(
    False, "--in-progress", help="The cache is still being extracted: use the images finished so far."
)


def _split_groups(groups: str | None) -> list[str] | None:
    return None if groups is None else [name.strip() for name in groups.split(",") if name.strip()]


@_command
def fit(
    cache: list[Path] = CacheOption,
    head: str | None = typer.Option(None, "--head", help="logreg (default), svm, svm-rbf, gbm or mlp."),
    train_split: str | None = typer.Option(None, "--train-split", help="Split to train on (default train)."),
    eval_split: str | None = typer.Option(None, "--eval-split", help="Split to report metrics on (default valid)."),
    pca: int | None = typer.Option(None, "--pca", help="PCA components before the classifier (0: none)."),
    normalize: str | None = typer.Option(
        None, "--normalize", help="Row normalisation: power (default: signed square root, then unit length), l2, none."
    ),
    c: float | None = typer.Option(None, "-C", "--C", help="Regularisation C (logreg, svm, svm-rbf)."),
    search: bool = typer.Option(
        False, "--search", help="Tune the key hyper-parameter by cross-validation on the train split."
    ),
    out_of_core: bool = typer.Option(
        False, "--out-of-core", help="Stream features from HDF5 (logreg/svm via SGD) for caches larger than memory."
    ),
    in_progress: bool = InProgressOption,
    out: Path | None = typer.Option(None, "--out", "-o", help="Model file (default models/<head>.joblib)."),
    groups: str | None = GroupsOption,
    stack: list[str] | None = typer.Option(
        None,
        "--stack",
        "-s",
        help=(
            "Another dataset's cache, whose rows train the head too (repeat for more; A.h5,B.h5 for a dataset's caches"
            " joined as --cache joins them). Each dataset is evaluated on its own."
        ),
    ),
    balance: str | None = typer.Option(
        None,
        "--balance",
        help=(
            "Sample weights that even out: none (default), or a comma-separated choice of dataset, gender, group "
            "(UTKFace's race)."
        ),
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the evaluation as JSON."),
) -> None:
    """Train a scikit-learn head on the train split of a cache, or of several datasets' caches
    (--stack), print eval metrics per dataset and per group x gender, save the model."""
    from featgender.training import train_head

    head_name = head or DEFAULT_HEAD
    out = out or Path(default_model_path(head_name))
    model, evaluation = train_head(
        cache,
        head_name,
        search=search,
        out_of_core=out_of_core,
        in_progress=in_progress,
        out=out,
        groups=_split_groups(groups),
        stack=[item.split(",") for item in stack or []],
        **_given(train_split=train_split, eval_split=eval_split, pca=pca, normalize=normalize, C=c, balance=balance),
    )
    if as_json:
        typer.echo(
            json.dumps(
                {"model": str(out), "training": model.training, "params": model.params, "metrics": model.metrics},
                indent=2,
                default=str,
            )
        )
        return
    typer.echo(
        f"{model.head} fitted on {model.training['images']} images in {model.training['fit_seconds']:.2f} s"
        + (f"; best {model.training['search']['best_params']}" if model.training["search"] else "")
    )
    if evaluation:
        _print_metrics(evaluation)
    typer.echo(f"saved {out}")


def _cache_or_data(
    cache: list[Path] | None, data: Path | None, either: str, *, cache_only: dict, data_only: dict
) -> None:
    """Exactly one of --cache and --data (``either`` says what each does), and none of the
    options that only the other takes."""
    if bool(cache) == (data is not None):
        raise FeatgenderError(either)
    misplaced = [name for name, value in (cache_only if data is not None else data_only).items() if value]
    if misplaced:
        raise FeatgenderError(f"{', '.join(misplaced)}: only with {'--cache' if data is not None else '--data'}")


@_command
def evaluate(
    model: Path = ModelOption,
    cache: list[Path] | None = typer.Option(
        None, "--cache", "-c", help="A head's feature cache(s) (repeat to join backbones, as in fit)."
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help=(
            "Or a dataset, scored from its images (no cache): any model, fine-tuned networks included; any dataset, "
            "for domain shift."
        ),
    ),
    split: str | None = typer.Option(None, "--split", help="Split to evaluate (default test)."),
    report: Path | None = typer.Option(None, "--report", help="Write metrics.json, report.md and PNG plots here."),
    groups: str | None = GroupsOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    count_failed: bool = typer.Option(
        False,
        "--count-failed",
        help=(
            "Count images that failed at extraction (unreadable, no face found) as wrong answers instead of leaving "
            "them out."
        ),
    ),
    in_progress: bool = InProgressOption,
    trusted: bool = TrustedOption,
    format: str | None = FormatOption,
    face_box: str | None = typer.Option(
        None,
        "--face-box",
        help=(
            "With --data, dlib_resnet: auto (default: where faces sit in the dataset's images), detect, or L,T,R,B "
            "fractions."
        ),
    ),
    faces: str | None = typer.Option(
        None,
        "--faces",
        help="With --data: auto (default: each image routed as predict routes it), crop or photo (predict --faces).",
    ),
    device: str | None = DeviceOption,
) -> None:
    """Score a saved model on a split, of its cache(s) or of a dataset's images: metrics with
    bootstrap 95% CIs, subgroup gaps, labels checked by identity (CelebA). With --data, each
    image goes the way predict sends it (--faces), so the figures are predict's."""
    from featgender.evaluate import evaluate_images, evaluate_model
    from featgender.metrics import public_result

    _cache_or_data(
        cache,
        data,
        "evaluate: give --cache (a head on its cached features) or --data (a dataset's images)",
        cache_only={"--in-progress": in_progress},
        data_only={"--format": format, "--face-box": face_box, "--faces": faces, "--device": device},
    )
    _announce(model)
    options = dict(
        report=report, groups=_split_groups(groups), trusted=trusted, count_failed=count_failed, **_given(split=split)
    )
    if data is not None:
        evaluation = evaluate_images(
            model, data, **options, **_given(format=format, face_box=face_box, faces=faces, device=device)
        )
    else:
        evaluation = evaluate_model(model, cache or [], in_progress=in_progress, **options)
    if as_json:
        typer.echo(json.dumps(public_result(evaluation), indent=2))
        return
    _print_metrics(evaluation)
    if report is not None:
        typer.echo(f"report written to {report}")


@_command
def compare(
    model: list[Path] = typer.Option(
        ..., "--model", "-m", help="The two models to compare, first and second (any that evaluate --data takes)."
    ),
    data: Path | None = typer.Option(None, "--data", help="The dataset whose images both models score."),
    cache: list[Path] | None = typer.Option(
        None, "--cache", "-c", help="Or the cache(s) both heads were trained on (repeat to join, as in fit): seconds."
    ),
    split: str | None = typer.Option(None, "--split", help="Split to compare on (default test)."),
    groups: str | None = GroupsOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    trusted: bool = TrustedOption,
    format: str | None = FormatOption,
    face_box: str | None = typer.Option(
        None, "--face-box", help="dlib_resnet: auto (default: where faces sit in the images), detect, or L,T,R,B."
    ),
    faces: str | None = typer.Option(
        None, "--faces", help="auto (default: each image routed as predict routes it), crop or photo."
    ),
    device: str | None = DeviceOption,
) -> None:
    """Compare two saved models face by face on the same images: each one's accuracy, the
    difference with a paired 95% CI, the faces only one gets right and the exact McNemar
    p-value, overall and per group x gender. Paired, it tells apart differences that two
    overlapping CIs cannot; a face a model fails to find counts as its wrong answer. With
    --cache instead of --data, two heads on the same cached features."""
    from featgender.compare import compare_caches, compare_images, comparison_markdown

    if len(model) != 2:
        raise FeatgenderError(f"compare: give --model twice (got {len(model)})")
    _cache_or_data(
        cache,
        data,
        "compare: give --data (both models on its images) or --cache (two heads on it)",
        cache_only={},
        data_only={"--format": format, "--face-box": face_box, "--faces": faces, "--device": device},
    )
    for each in model:
        _announce(each)
    options = dict(groups=_split_groups(groups), trusted=trusted, **_given(split=split))
    if data is not None:
        result = compare_images(
            model[0], model[1], data, **options, **_given(format=format, face_box=face_box, faces=faces, device=device)
        )
    else:
        result = compare_caches(model[0], model[1], cache or [], **options)
    typer.echo(json.dumps(result, indent=2) if as_json else comparison_markdown(result))


@_command
def predict(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    model: Path = ModelOption,
    faces: str = typer.Option(
        "auto",
        "--faces",
        help=(
            "crop: each image is a face crop, classified whole; photo: find faces first (dlib, extra 'faces') and "
            "print each with its box; auto (default): photo for --all-faces; with a face-finding backbone "
            "(dlib_resnet) per image: pictures above 512 px are photos; a smaller one is a crop, classified whole, "
            "when most faces of the images given sit at one place and its own face is there (the landmarks "
            "sought in that box hold it and the chip cut there looks like a face); else its face is found and "
            "decides (crop when it fills the picture or none is found, photo when small); other backbones: crop. "
            "Each line says its image's route."
        ),
    ),
    all_faces: bool = typer.Option(
        False, "--all-faces", help="In photos, classify every face found, not only the largest."
    ),
    csv: Path | None = typer.Option(
        None, "--csv", help="Also write id,label rows (Kaggle submission style; a box column for photos)."
    ),
    face_box: str | None = typer.Option(
        None,
        "--face-box",
        help=(
            "dlib_resnet, face crops: auto (default: where faces sit in the images given, as extract finds it for a "
            "dataset; the training data's box would misalign crops framed otherwise), detect (in every image), or "
            "L,T,R,B fractions."
        ),
    ),
    device: str | None = DeviceOption,
    batch_size: int | None = BatchOption,
    precision: str | None = PrecisionOption,
    trusted: bool = TrustedOption,
) -> None:
    """Classify raw images with a saved model: one line per image, or per face in photos
    (label, P(male), box); broken files and images without a face are reported, not guessed."""
    from featgender.faces.route import NO_FACE
    from featgender.models import load
    from featgender.predictor import expand_inputs, write_predictions_csv

    files = expand_inputs(images)
    _announce(model)
    predictor = load(
        model,
        trusted=trusted,
        **_given(device=device, batch_size=batch_size, face_box=face_box, precision=precision),
    )
    predictions = predictor.predict(files, faces=faces, all_faces=all_faces, progress=len(files) > 100)
    for prediction in predictions:
        if prediction.error:
            typer.echo(f"{prediction.image}: error: {prediction.error}", err=True)
        else:
            box = "" if prediction.box is None else "\tbox=" + ",".join(map(str, prediction.box))
            line = f"{prediction.image}\t{prediction.label}\t{prediction.probability:.4f}\t{prediction.route}{box}"
            typer.echo(line)
    if csv is not None:
        typer.echo(f"wrote {write_predictions_csv(predictions, csv)} rows to {csv}", err=True)
    no_face = sum(1 for p in predictions if p.error == NO_FACE)
    unreadable = sum(1 for p in predictions if p.error and p.error != NO_FACE)
    if no_face:
        typer.echo(f"{no_face} of {len(files)} images: {NO_FACE} (not classified)", err=True)
    if unreadable:
        typer.echo(f"{unreadable} of {len(files)} images could not be read", err=True)


@_command
def finetune(
    data: list[Path] = typer.Option(
        ...,
        "--data",
        help="Dataset (repeat: one network trained on all of them, each evaluated on its own test split).",
    ),
    backbone: str | None = BackboneOption,
    weights: str | None = WeightsOption,
    layer: str | None = typer.Option(
        None,
        "--layer",
        help=(
            "Graph node the logit reads, pooled (default: the backbone's embedding layer); the layers above it "
            "are left out. Extract the result with the same --layer."
        ),
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Most epochs to train (default 10)."),
    unfreeze_last: str | None = typer.Option(
        None, "--unfreeze-last", help="Blocks of the backbone to train: 0 (head only, default), N, or all."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per step (default 32)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-3)."),
    patience: int | None = typer.Option(
        None, "--patience", help="Stop after this many epochs without a better valid loss (default 2)."
    ),
    balance: str | None = typer.Option(
        None,
        "--balance",
        help=(
            "Draw training images so that these weigh the same: none (default), or a comma-separated choice of "
            "dataset, gender, group (UTKFace's race)."
        ),
    ),
    samples_per_epoch: int | None = typer.Option(
        None,
        "--samples-per-epoch",
        help="Training images drawn per epoch, with replacement (default: each training image once, shuffled).",
    ),
    augment: str | None = typer.Option(
        None,
        "--augment",
        help="Augmentations: basic (zoom, flip, shear; default) or web (adds low resolution, rotation, "
        "grayscale, exposure: web photos such as FairFace's).",
    ),
    layer_decay: float | None = typer.Option(
        None,
        "--layer-decay",
        help="Each block down from the top trains at this factor of the rate of the one above (default 1).",
    ),
    schedule: str | None = typer.Option(
        None, "--schedule", help="Learning rate: constant (default) or cosine (5% warm-up, then down to 0)."
    ),
    head_first: bool = typer.Option(
        False, "--head-first", help="Start the logit from a logistic regression on the frozen embedding."
    ),
    batch_norm: str | None = typer.Option(
        None,
        "--batch-norm",
        help="Batch-norm statistics: train (default: updated in the blocks that train) or frozen (kept as "
        "pretrained; their scale and shift still train): for ImageNet networks on small CPU batches.",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Best checkpoint (default models/<backbone>-ft.pt)."),
    limit: int | None = LimitOption,
    device: str | None = DeviceOption,
    workers: int | None = WorkersOption,
    face_box: str | None = FaceBoxOption,
    precision: str | None = PrecisionOption,
) -> None:
    """Fine-tune a backbone end to end on one dataset or several; resumable. To keep what the
    network knows (faces in the wild, issue #34): --unfreeze-last all --head-first --layer-decay 0.8
    --schedule cosine --augment web, and --batch-norm frozen for batch-norm networks (Lite0); freeze
    the result again with extract --weights."""
    from featgender.finetune import finetune as run_finetune

    result = run_finetune(
        data,
        **_given(
            backbone=backbone,
            weights=weights,
            layer=layer,
            epochs=epochs,
            unfreeze_last=unfreeze_last,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            balance=balance,
            samples_per_epoch=samples_per_epoch,
            augment=augment,
            layer_decay=layer_decay,
            schedule=schedule,
            head_first=head_first or None,
            batch_norm=batch_norm,
            out=out,
            limit=limit,
            device=device,
            workers=workers,
            face_box=face_box,
            precision=precision,
        ),
    )
    for row in result.history:
        typer.echo(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, valid loss {row['valid_loss']:.4f}, "
            f"valid accuracy {row['valid_accuracy']:.4f}"
        )
    typer.echo(f"best epoch {result.best_epoch}; saved {result.checkpoint}")
    if result.test:
        _print_metrics(result.test)


@_command
def bench(
    data: list[Path] = typer.Option(
        ...,
        "--data",
        help=(
            "Dataset (repeat: heads and the fine-tuned network train on all of them; accuracy pooled and per dataset)."
        ),
    ),
    backbones: str | None = typer.Option(
        None, "--backbones", help=f"Comma-separated backbones (default {DEFAULT_BACKBONE})."
    ),
    heads: str | None = typer.Option(None, "--heads", help="Comma-separated heads (default logreg,svm)."),
    finetune: bool = typer.Option(
        False,
        "--finetune",
        help="Also fine-tune the first backbone and report its test accuracy and s/epoch: its measured recipe "
        "(dlib_resnet: the quick start's), else one epoch at finetune's defaults.",
    ),
    balance: str | None = typer.Option(
        None,
        "--balance",
        help="With several --data: weigh training rows as fit --balance does (none, or dataset, gender, group).",
    ),
    weights: str | None = WeightsOption,
    limit: int | None = LimitOption,
    repeats: int | None = typer.Option(None, "--repeats", help="Timed repeats after one warm-up (default 3)."),
    device: str | None = DeviceOption,
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write results.json, results.md and accuracy_vs_cost.png here."
    ),
) -> None:
    """Time every stage (decode, preprocess, forward, cache write, head fit/predict, fine-tune) on your hardware."""
    from featgender.bench import run_bench

    results = run_bench(
        data,
        finetune=finetune,
        out=out,
        **_given(
            backbones=backbones.split(",") if backbones else None,
            heads=heads.split(",") if heads else None,
            balance=balance,
            weights=weights,
            limit=limit,
            repeats=repeats,
            device=device,
        ),
    )
    for row in results["heads"]:
        typer.echo(f"{row['backbone']} + {row['head']}: accuracy {row['test_accuracy']:.4f}, fit {row['fit_s']:.3f} s")
    for row in results["backbones"]:
        typer.echo(
            f"{row['backbone']}: "
            + ", ".join(f"{stage} {v['images_per_s']} img/s" for stage, v in row["stages"].items())
        )
    if "finetune" in results:
        typer.echo(f"fine-tune {results['finetune']['backbone']}: {results['finetune']['s_per_epoch']} s/epoch")
    if out is not None:
        typer.echo(f"report written to {out}")


@_command
def demo(
    data: list[Path] = typer.Option(
        ..., "--data", help="Dataset (repeat: one head trained on all of them, each evaluated on its own test split)."
    ),
    backbone: str | None = BackboneOption,
    head: str | None = typer.Option(None, "--head", help="Head to fit (default logreg)."),
    balance: str | None = typer.Option(
        None,
        "--balance",
        help="With several --data: what the sample weights even out (default dataset,gender; see fit --balance).",
    ),
    limit: int | None = LimitOption,
    format: str | None = FormatOption,
    device: str | None = DeviceOption,
    precision: str | None = PrecisionOption,
    fine_tune: bool = typer.Option(
        True,
        "--fine-tune/--frozen",
        help="Fine-tune dlib_resnet on the datasets first (2 epochs of 12,000 faces; the recipe in "
        "benchmarks/README.md), then embed them with it; --frozen embeds with the network as it comes, as "
        "every other backbone does (no recipe).",
    ),
    join: list[str] = typer.Option(
        [],
        "--join",
        help="A frozen backbone whose features join the first's in the head (repeat for more; NAME@LAYER for "
        "another of its layers, all of one network's from one pass, the backbone's own among them when it is "
        "not fine-tuned). The quick start is --backbone arcface_mbf --join arcface_mbf@neck.1 --head svm-rbf --C 3 "
        "(extra 'arcface'): a face network taught on web photos, at its identity embedding and at the layer "
        "before it. predict runs every network on each face, dlib's face step finding the faces of photos for "
        "all (benchmarks/README.md).",
    ),
    c: float | None = typer.Option(None, "-C", "--C", help="The head's regularisation C (default the head's)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Model file (default models/demo-<backbone>[+<joined>]-<head>.joblib)."
    ),
) -> None:
    """Run the whole path offline: fine-tune the backbone on the datasets (dlib_resnet), extract
    each dataset's cache with it, fit one head on their train splits, print each dataset's test
    metrics and errors per group x gender, save the model.

    The backbone defaults to the most accurate one installed: dlib_resnet (extra 'faces'),
    else efficientnet_lite0 (extra 'offline'). The fine-tuned network is saved as
    models/demo-dlib_resnet-ft.pt, which the model needs beside it (export folds it in).
    Rerunning resumes the fine-tune and reuses the caches."""
    from featgender.demo import run_demo

    result = run_demo(
        data,
        fine_tune=fine_tune,
        join=join,
        **_given(
            C=c,
            backbone=backbone,
            head=head,
            balance=balance,
            limit=limit,
            format=format,
            device=device,
            precision=precision,
            out=out,
        ),
    )
    if result["finetuned"] is not None:
        finetuned = result["finetuned"]
        typer.echo(
            f"fine-tuned: {finetuned.checkpoint} (best epoch {finetuned.best_epoch} of {len(finetuned.history)})"
        )
    model = result["model"]
    for cache, joined in zip(result["caches"], result["joined"], strict=True):
        for built, entry in zip([cache, *joined], model.backbones, strict=True):
            typer.echo(f"cache: {built.path} ({built.status}, {built.num_images} images, backbone {entry['backbone']})")
    typer.echo(
        f"head: {model.head}, trained on {model.training['images']} images in {model.training['fit_seconds']:.2f} s"
        f"{'; balanced by ' + ', '.join(model.training['balance']) if model.training['balance'] else ''}"
    )
    _print_metrics(result["test"])
    typer.echo(f"model: {result['model_path']}")


@_command
def export(
    model: Path = typer.Option(
        ..., "--model", "-m", help="Model to export: `featgender fit`'s (.joblib) or `featgender finetune`'s (.pt)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="ONNX file to write (default: the model's path, .onnx)."),
    trusted: bool = TrustedOption,
) -> None:
    """Export a saved model as one ONNX graph (network, pooling and head; uint8 pixels in, P(male)
    out, any batch size), with its model card in the metadata: predict and serve it on
    onnxruntime, without torch (the 'onnx' extra)."""
    from featgender.export import export_onnx

    _announce(model)
    written = export_onnx(model, out, trusted=trusted)
    from featgender.files import file_sha256

    typer.echo(f"exported: {written} ({written.stat().st_size / 1e6:.1f} MB, sha256 {file_sha256(written)})")


@_command
def serve(
    model: Path = ModelOption,
    host: str = typer.Option(
        SERVE_HOST, "--host", help="Address to bind (default: this machine only). Another needs --auth."
    ),
    port: int = typer.Option(SERVE_PORT, "--port", min=1, max=65535, help="Port to listen on."),
    share: bool = typer.Option(
        False, "--share", help="Also open a public Gradio share link (needs --auth; faces are personal data)."
    ),
    auth: str | None = typer.Option(
        None, "--auth", help="USER:PASSWORD asked of every visitor (required with --share or a non-local --host)."
    ),
    device: str | None = DeviceOption,
    trusted: bool = TrustedOption,
) -> None:
    """Serve a web page over a saved model (Gradio, extra 'app'): drop a photo, see every face
    boxed with its label and P(male); batch CSV; the model card. Uploads are not kept."""
    from featgender.app import serve as run_server

    _announce(model)
    credentials = None
    if auth is not None:
        user, _, password = auth.partition(":")
        if not user or not password:
            raise FeatgenderError("--auth: want USER:PASSWORD")
        credentials = (user, password)
    run_server(model, host=host, port=port, share=share, auth=credentials, trusted=trusted, **_given(device=device))


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("featgender").setLevel(logging.INFO)  # ours; the libraries below say only what is wrong
    app()
