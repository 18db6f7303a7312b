"""``featgender evaluate``: a saved model scored on a split, from a cache (a head on cached
features) or from the images themselves (a head with its backbones rebuilt, or a fine-tuned
network), one dataset or several each on its own. The metrics are :mod:`featgender.metrics`';
the report :mod:`featgender.report`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featgender.cache import CacheData, features_mismatch, read_caches
from featgender.data import FaceDataset, load_dataset, split_code
from featgender.errors import FeatgenderError
from featgender.files import check_writable_folder
from featgender.heads import HeadModel, load_model
from featgender.metrics import (
    evaluate_scores,
    pool_evaluations,
    wrong_where_failed,
)
from featgender.mixing import cache_list, read_datasets
from featgender.models import load
from featgender.report import write_report

logger = logging.getLogger(__name__)


def evaluate_features(
    model: HeadModel, data: CacheData, *, groups: list[str] | None = None, n_boot: int = 1000
) -> dict:
    """:func:`evaluate_scores` of a head on cached rows."""
    return evaluate_scores(data, model.predict_proba(data.features), groups=groups, n_boot=n_boot)


def evaluate_model(
    model: str | Path | HeadModel,
    caches: Sequence[str | Path] | str | Path,
    *,
    split: str = "test",
    groups: list[str] | None = None,
    report: str | Path | None = None,
    trusted: bool = False,
    count_failed: bool = False,
    in_progress: bool = False,
) -> dict:
    """Evaluate a head artifact on a split of the cache(s) it was trained for: ``featgender evaluate``.

    Images that failed at extraction (unreadable, or no face found in a photo) are left out,
    or with ``count_failed`` counted as wrong answers. ``trusted``: open an artifact not
    written here (see :func:`featgender.heads.load_model`). ``in_progress``: score the images
    finished so far of caches still being extracted.
    """
    if report is not None:
        check_writable_folder(report, "--report")
    model = load_model(model, trusted=trusted) if isinstance(model, (str, Path)) else model
    caches = cache_list(caches)
    data = read_caches(caches, split, include_failed=count_failed, in_progress=in_progress)
    scores = cache_scores(model, data)
    failed = np.isnan(scores)
    result = evaluate_scores(data, wrong_where_failed(data.labels, scores), groups=groups, failed=failed)
    result["failed_counted_as_errors"] = int(failed.sum())
    result["split"] = split
    result["caches"] = [str(path) for path in caches]
    if report is not None:
        write_report(result, report, title=f"{model.head} on {' + '.join(b['backbone'] for b in model.backbones)}")
    return result


def cache_scores(model: HeadModel, data: CacheData) -> np.ndarray:
    """P(male) of a head for each cached row (caches checked to fit it); NaN where the image
    failed at extraction (rows read with ``include_failed``)."""
    _check_caches_fit_model(model, data)
    failed = ~np.isfinite(data.features).all(axis=1)
    scores = np.full(len(data.labels), np.nan)
    if (~failed).any():
        scores[~failed] = model.predict_proba(data.features[~failed] if failed.any() else data.features)
    return scores


def _check_caches_fit_model(model: HeadModel, data: CacheData) -> None:
    """Refuse caches whose features mean something else than the model's: another network,
    layer, weights, preprocessing or flip. How faces were found (a calibrated box or
    detection) may differ: it ends in the same crop or chip."""
    if len(model.backbones) != len(data.metadata["sources"]):
        raise FeatgenderError(f"the model expects {len(model.backbones)} cache(s), got {len(data.metadata['sources'])}")
    for expected, found in zip(model.backbones, data.metadata["sources"], strict=True):
        differing = features_mismatch(found, expected)
        if differing:
            raise FeatgenderError(
                f"cache of {found.get('backbone')} does not match the model's features ({differing[0]} differs)"
            )


def evaluate_datasets(
    model: HeadModel,
    datasets: Sequence[Sequence[str | Path] | str | Path],
    split: str,
    *,
    groups: list[str] | None = None,
    in_progress: bool = False,
) -> dict:
    """A head on ``split`` of one dataset (its caches), or of several, each evaluated on its own.

    With several, the result holds the pooled metrics of all their rows (with CIs) and, under
    ``datasets``, each dataset's own evaluation: its slices and errors per group x gender
    (``groups`` where the dataset has them)."""
    parts = read_datasets(datasets, split, in_progress=in_progress)
    evaluations = {}
    for part in parts:
        _check_caches_fit_model(model, part.rows)
        wanted = None if groups is None else [name for name in groups if name in part.rows.attribute_names]
        evaluations[part.name] = evaluate_features(model, part.rows, groups=groups if len(parts) == 1 else wanted)
        evaluations[part.name]["split"] = split
    if len(parts) == 1:
        return evaluations[parts[0].name]
    return pool_evaluations(evaluations, split)


def split_rows(data: str | Path, split: str = "test", *, format: str = "auto") -> FaceDataset:
    """A dataset's rows of one split, or the one-line error saying it has none."""
    dataset = load_dataset(data, format=format)
    rows = dataset.subset(np.flatnonzero(dataset.splits == split_code(split)))
    if not len(rows):
        raise FeatgenderError(f"--data {data}: no {split} images")
    return rows


def image_scores(
    model: str | Path,
    rows: FaceDataset,
    *,
    trusted: bool = False,
    face_box: str | tuple = "auto",
    faces: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """P(male) of a saved model for each of ``rows``' images as ``predict`` scores them; NaN
    where an image failed (unreadable, no face found)."""
    predictor = load(model, trusted=trusted, device=device, batch_size=batch_size, workers=workers, face_box=face_box)
    predictions = predictor.predict(rows.paths, faces=faces, progress=progress)
    return np.array([np.nan if found.probability is None else found.probability for found in predictions])


def evaluate_images(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    groups: list[str] | None = None,
    report: str | Path | None = None,
    trusted: bool = False,
    count_failed: bool = False,
    format: str = "auto",
    face_box: str | tuple = "auto",
    faces: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate a saved model, a head (``.joblib``) or a fine-tuned network (``.pt``), on a split
    of any dataset from its images, no cache needed: ``featgender evaluate --data``.

    The model's own network embeds (a head's backbones, rebuilt) or classifies (a fine-tuned
    network) the split's images, with faces aligned where they sit in them (``face_box``, as
    ``predict --face-box``): another dataset than the training one measures domain shift, for
    fine-tuned networks too. Each image goes the way ``predict`` sends it (``faces``, as
    ``predict --faces``: by default its route, decided per image), so the figures are what
    ``predict`` would score. Failed images (unreadable, no face) are left out, or with
    ``count_failed`` counted as wrong answers; ``failed`` says how many there were.
    """
    if report is not None:
        check_writable_folder(report, "--report")
    rows = split_rows(data, split, format=format)
    scores = image_scores(
        model,
        rows,
        trusted=trusted,
        face_box=face_box,
        faces=faces,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    failed = np.isnan(scores)
    if count_failed:
        scores = wrong_where_failed(rows.labels, scores)
        result = evaluate_scores(rows, scores, groups=groups, failed=failed)
    else:
        result = evaluate_scores(rows.subset(np.flatnonzero(~failed)), scores[~failed], groups=groups)
    result.update(failed=int(failed.sum()), split=split, data=str(data))
    if report is not None:
        write_report(result, report, title=f"{Path(model).name} on {rows.name}")
    return result
