"""Honest evaluation of gender heads: metrics with bootstrap CIs, subgroup slices, reports.

The positive class is 1 = male. :func:`evaluate_model` scores a head artifact on a cache
split; :func:`train_head` (``featgender fit``) fits a head on one split, evaluates it on
another and saves the artifact; :func:`write_report` writes metrics.json, a markdown
summary and PNG plots (with the ``plots`` extra).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from featgender.backbones import feature_preprocessing
from featgender.cache import CacheData, iter_cache_chunks, library_versions, open_rows, read_caches
from featgender.data import LABEL_NAMES, image_folder, read_identities
from featgender.errors import FeatgenderError
from featgender.heads import HeadModel, fit_head, fit_head_streaming, load_model
from featgender.mixing import balance_weights, parse_balance, read_datasets, stack_rows

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc")
CELEBA_GROUPS = ("Young", "Pale_Skin", "Eyeglasses", "Wearing_Hat", "Heavy_Makeup", "Bald", "Blond_Hair", "Smiling")
AGE_BINS = (0, 30, 45, 60, 200)  # 18-29, 30-44, 45-59, 60+


def classification_metrics(labels: np.ndarray, predicted: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Accuracy, balanced accuracy, precision, recall, F1, ROC-AUC and the confusion matrix.

    ``scores`` are probabilities (or decision values) of the male class; ROC-AUC is left
    out without them or when only one class is present.
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    result = {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predicted)),
        "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
        "recall": float(skm.recall_score(labels, predicted, zero_division=0)),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
    }
    if scores is not None and len(np.unique(labels)) == 2:
        result["roc_auc"] = float(skm.roc_auc_score(labels, scores))
    return result


def resampled_metrics(truth: np.ndarray, guess: np.ndarray, scores: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` for each row of 2-D (resamples x images) label arrays.

    Vectorised over resamples; ROC-AUC through the rank-sum (Mann-Whitney) identity.
    """
    from scipy.stats import rankdata

    truth, guess = np.asarray(truth).astype(bool), np.asarray(guess).astype(bool)
    size = truth.shape[1]
    true_pos, true_neg = (truth & guess).sum(1), (~truth & ~guess).sum(1)
    positives, predicted_pos = truth.sum(1), guess.sum(1)
    negatives = size - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = true_pos / positives
        precision = np.where(predicted_pos > 0, true_pos / predicted_pos, 0.0)
        samples = {
            "accuracy": (true_pos + true_neg) / size,
            "balanced_accuracy": (recall + true_neg / negatives) / 2,
            "precision": precision,
            "recall": recall,
            "f1": np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0),
        }
        if scores is not None:
            ranks = rankdata(scores, axis=1)
            samples["roc_auc"] = ((ranks * truth).sum(1) - positives * (positives + 1) / 2) / (positives * negatives)
    return samples


def bootstrap_ci(
    labels: np.ndarray,
    predicted: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals of every metric in :data:`METRICS`.

    The images are resampled with replacement ``n_boot`` times (seeded), a batch of
    resamples at a time: memory stays near 2**22 resampled images whatever the split's size.
    """
    rng = np.random.default_rng(seed)
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    scores = None if scores is None else np.asarray(scores)
    per_batch = max(1, 2**22 // len(labels))
    batches = []
    for done in range(0, n_boot, per_batch):
        rows = rng.integers(0, len(labels), size=(min(per_batch, n_boot - done), len(labels)))
        batches.append(resampled_metrics(labels[rows], predicted[rows], None if scores is None else scores[rows]))
    samples = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    tail = (1 - level) / 2 * 100
    return {
        name: [float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))]
        for name, values in samples.items()
    }


def _group_values(data, name: str) -> tuple[np.ndarray, list[str]] | None:
    """Group codes and names for one attribute: 0/1 flags, text categories, or age bins."""
    if data.attributes is None or name not in data.attribute_names:
        return None
    column = data.attributes[:, data.attribute_names.index(name)]
    if name in data.attribute_categories:
        return column, data.attribute_categories[name]
    if name.lower() == "age":
        codes = np.digitize(column, AGE_BINS[1:-1])
        return codes, ["<30", "30-44", "45-59", "60+"]
    if set(np.unique(column).tolist()) <= {0, 1}:
        return column, [f"not {name}", name]
    return None


def default_groups(data) -> list[str]:
    """The attributes sliced by default: CelebA's eight, or a CSV's age and race."""
    wanted = list(CELEBA_GROUPS) + ["age", "race", "Age", "Race"]
    return [name for name in wanted if name in data.attribute_names]


def subgroup_metrics(data, predicted: np.ndarray, groups: list[str] | None = None, min_size: int = 10) -> dict:
    """Per-group accuracy and error rates for each attribute, and the largest accuracy gap.

    For each group: n, accuracy, the rate at which women are called men (``female_error``)
    and men called women (``male_error``). Groups smaller than ``min_size`` are reported but
    left out of the gap.
    """
    groups = default_groups(data) if groups is None else groups
    result = {}
    for name in groups:
        codes, group_names = _usable_groups(data, name)
        rows: dict[str, dict[str, Any]] = {}
        for code, group in enumerate(group_names):
            members = codes == code
            if not members.any():
                continue
            truth, guess = data.labels[members], predicted[members]
            women, men = truth == 0, truth == 1
            rows[group] = {
                "n": int(members.sum()),
                "accuracy": float((truth == guess).mean()),
                "female_error": float((guess[women] == 1).mean()) if women.any() else None,
                "male_error": float((guess[men] == 0).mean()) if men.any() else None,
            }
        sized = [row["accuracy"] for row in rows.values() if row["n"] >= min_size]
        result[name] = {"groups": rows, "accuracy_gap": float(max(sized) - min(sized)) if len(sized) > 1 else 0.0}
    return result


def wilson_interval(errors: int, n: int, z: float = 1.959964) -> list[float]:
    """The 95% Wilson score interval of a rate of ``errors`` in ``n``: right at 0 errors and in
    cells of a few dozen faces, where the normal approximation and the bootstrap say [0, 0]."""
    if n == 0:
        return [float("nan"), float("nan")]
    rate, spread = errors / n, z * z / n
    centre = (rate + spread / 2) / (1 + spread)
    half = z * np.sqrt(rate * (1 - rate) / n + spread / (4 * n)) / (1 + spread)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def group_gender_errors(
    data,
    predicted: np.ndarray,
    groups: list[str] | None = None,
    *,
    failed: np.ndarray | None = None,
    min_size: int = 10,
) -> dict:
    """Errors per group x true gender for each attribute, as Gender Shades measured them.

    Each cell (a group of the attribute, women or men) gives n, the errors (women called men,
    or men called women: the equalized-odds view), the error rate with its 95% Wilson
    interval, and how many of its faces failed (no face found, unreadable: ``failed``, counted
    as errors when they are in ``predicted``). Per attribute: the worst cell and the largest
    gap between cells' error rates, and the equalized-odds gap (the largest spread across
    groups of women's or of men's error rate); cells under ``min_size`` faces are listed but
    left out of both.
    """
    groups = default_groups(data) if groups is None else groups
    failed = np.zeros(len(data.labels), dtype=bool) if failed is None else np.asarray(failed, dtype=bool)
    result = {}
    for name in groups:
        codes, group_names = _usable_groups(data, name)
        cells: list[dict[str, Any]] = []
        for code, group in enumerate(group_names):
            for gender, gender_name in ((0, "women"), (1, "men")):
                members = (codes == code) & (data.labels == gender)
                n, errors = int(members.sum()), int((predicted[members] != gender).sum())
                if n:
                    cells.append(
                        {
                            "group": group,
                            "gender": gender_name,
                            "n": n,
                            "errors": errors,
                            "error_rate": errors / n,
                            "ci95": wilson_interval(errors, n),
                            "failed": int(failed[members].sum()),
                        }
                    )
        sized = [cell for cell in cells if cell["n"] >= min_size]
        worst = max(sized, key=lambda cell: cell["error_rate"], default=None)
        spreads = [
            max(rates) - min(rates)
            for rates in (
                [cell["error_rate"] for cell in sized if cell["gender"] == gender] for gender in ("women", "men")
            )
            if len(rates) > 1
        ]
        result[name] = {
            "cells": cells,
            "worst": None if worst is None else {key: worst[key] for key in ("group", "gender", "n", "error_rate")},
            "error_gap": float(worst["error_rate"] - min(cell["error_rate"] for cell in sized)) if worst else 0.0,
            "equalized_odds_gap": float(max(spreads, default=0.0)),
        }
    return result


def _usable_groups(data, name: str) -> tuple[np.ndarray, list[str]]:
    """:func:`_group_values`, or the one-line error naming the attributes there are."""
    found = _group_values(data, name)
    if found is None:
        raise FeatgenderError(
            f"--groups {name!r}: not a usable attribute of this cache "
            f"(attributes: {', '.join(data.attribute_names) or 'none'})"
        )
    return found


def evaluate_scores(
    data, scores: np.ndarray, *, groups: list[str] | None = None, n_boot: int = 1000, failed: np.ndarray | None = None
) -> dict:
    """Metrics, bootstrap 95% CIs, subgroup slices and errors per group x gender of P(male)
    ``scores`` for ``data``'s rows; ``failed`` marks rows whose face was not found (already
    made wrong answers by :func:`wrong_where_failed`), shown per cell.

    ``data`` is anything with ``labels`` and attributes (a :class:`CacheData` or a
    :class:`~featgender.data.FaceDataset`), so heads and fine-tuned networks share one evaluation.
    """
    if len(data.labels) == 0:
        raise FeatgenderError("the evaluation split has no images")
    predicted = (scores >= 0.5).astype(int)
    result = classification_metrics(data.labels, predicted, scores)
    result["ci95"] = bootstrap_ci(data.labels, predicted, scores if "roc_auc" in result else None, n_boot=n_boot)
    result["subgroups"] = subgroup_metrics(data, predicted, groups)
    result["group_gender"] = group_gender_errors(data, predicted, groups, failed=failed)
    audit = label_audit(data, predicted, n_boot=n_boot)
    if audit is not None:
        result["label_audit"] = audit
    result["worst_mistakes"] = worst_mistakes(data, scores, contradicted=audit["conflicting_images"] if audit else ())
    result["_curves"] = {"labels": data.labels, "scores": scores}
    return result


def worst_mistakes(data, scores: np.ndarray, count: int = 24, contradicted: Sequence[str] = ()) -> list[dict]:
    """The ``count`` wrong answers the model was surest of, surest first: image path, true
    label, P(male), and whether another image of the same person contradicts the label
    (image ids in ``contradicted``, see :func:`label_audit`). People look at errors; this is
    what a contact sheet shows them."""
    wrong = np.flatnonzero((scores >= 0.5).astype(int) != data.labels)
    surest = wrong[np.argsort(-np.abs(scores[wrong] - 0.5), kind="stable")][:count]
    image_ids, doubted = _rows_source(data)[2], set(contradicted)
    return [
        {
            "image": _image_path(data, row),
            "label": LABEL_NAMES[int(data.labels[row])],
            "p_male": round(float(scores[row]), 4),
            "label_contradicted": image_ids[row] in doubted,
        }
        for row in surest
    ]


def label_audit(data, predicted: np.ndarray, *, n_boot: int = 1000) -> dict | None:
    """Labels that contradict each other, where the dataset knows each image's person
    (CelebA's ``identity_CelebA.txt``): the people whose images among ``data``'s rows are
    labelled both female and male (one of their labels at least is wrong), their images, and
    the accuracy on the other rows, so that label errors are not read as model errors.
    None where the dataset has no identities."""
    root, format, image_ids = _rows_source(data)
    identities = read_identities(root, format)
    if identities is None:
        return None
    people = np.array([identities.get(image_id, f"unknown:{image_id}") for image_id in image_ids])
    names, codes = np.unique(people, return_inverse=True)
    males = np.bincount(codes, weights=data.labels, minlength=len(names))
    conflicting = (males > 0) & (males < np.bincount(codes, minlength=len(names)))
    in_conflict = conflicting[codes]
    truth, guess = data.labels[~in_conflict], predicted[~in_conflict]
    return {
        "identities": int(len(names)),
        "conflicting_identities": int(conflicting.sum()),
        "conflicting_images": [image_ids[row] for row in np.flatnonzero(in_conflict)],
        "n_consistent": int(len(truth)),
        "accuracy_consistent": float((truth == guess).mean()) if len(truth) else None,
        "ci95_consistent": bootstrap_ci(truth, guess, n_boot=n_boot)["accuracy"] if len(truth) else None,
    }


def audit_sentence(audit: dict, shown: int = 12) -> str:
    """:func:`label_audit`'s finding in one sentence (the first ``shown`` images named), for
    reports and the command line."""
    images = audit["conflicting_images"]
    listed = ", ".join(images[:shown]) + (f" and {len(images) - shown} more" if len(images) > shown else "")
    sentence = (
        f"{audit['conflicting_identities']} of {audit['identities']} people have images labelled both "
        f"female and male ({len(images)} images{': ' + listed if images else ''}); "
        "one label at least of each is wrong."
    )
    if audit["accuracy_consistent"] is None:
        return sentence
    low, high = audit["ci95_consistent"]
    return (
        sentence + f" Accuracy on the other {audit['n_consistent']} images: "
        f"{audit['accuracy_consistent']:.4f} (95% CI {low:.4f} - {high:.4f})."
    )


def _rows_source(data) -> tuple[Path, str, list[str]]:
    """A dataset's or a cache's rows: dataset folder, layout and image ids."""
    if hasattr(data, "image_ids"):
        return data.root, data.format, data.image_ids
    return Path(data.metadata.get("dataset_root", ".")), data.metadata.get("dataset_format", ""), data.ids


def _image_path(data, row: int) -> str:
    """Where a row's image is: a dataset's path, or a cache's id in its dataset's image folder."""
    if hasattr(data, "paths"):
        return str(data.paths[row])
    root, format, image_ids = _rows_source(data)
    return str(image_folder(root, format) / image_ids[row])


def public_result(result: dict) -> dict:
    """An evaluation without its in-memory parts (``_curves``): what is saved and printed."""
    return {key: value for key, value in result.items() if not key.startswith("_")}


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
    model = load_model(model, trusted=trusted) if isinstance(model, (str, Path)) else model
    caches = [caches] if isinstance(caches, (str, Path)) else list(caches)
    data = read_caches(caches, split, include_failed=count_failed, in_progress=in_progress)
    _check_caches_fit_model(model, data)
    failed = ~np.isfinite(data.features).all(axis=1)
    scores = np.full(len(data.labels), np.nan)
    if (~failed).any():
        scores[~failed] = model.predict_proba(data.features[~failed] if failed.any() else data.features)
    result = evaluate_scores(data, wrong_where_failed(data.labels, scores), groups=groups, failed=failed)
    result["failed_counted_as_errors"] = int(failed.sum())
    result["split"] = split
    result["caches"] = [str(path) for path in caches]
    if report is not None:
        write_report(result, report, title=f"{model.head} on {' + '.join(b['backbone'] for b in model.backbones)}")
    return result


def wrong_where_failed(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """P(male) ``scores`` with each failed image's NaN made the surest wrong answer
    (``--count-failed``)."""
    return np.where(np.isnan(scores), 1.0 - labels, scores)


def _check_caches_fit_model(model: HeadModel, data: CacheData) -> None:
    """Refuse caches whose features mean something else than the model's: another network,
    layer, weights, preprocessing or flip. How faces were found (a calibrated box or
    detection) may differ: it ends in the same crop or chip."""
    if len(model.backbones) != len(data.metadata["sources"]):
        raise FeatgenderError(f"the model expects {len(model.backbones)} cache(s), got {len(data.metadata['sources'])}")
    for expected, found in zip(model.backbones, data.metadata["sources"], strict=True):
        for key in ("backbone", "layer", "weights_sha256", "flip", "preprocessing"):
            same = (
                feature_preprocessing(expected.get(key, "")) == feature_preprocessing(found.get(key, ""))
                if key == "preprocessing"
                else str(expected.get(key)) == str(found.get(key))
            )
            if not same:
                raise FeatgenderError(
                    f"cache of {found.get('backbone')} does not match the model's features ({key} differs)"
                )


BACKBONE_KEYS = (
    "backbone",
    "layer",
    "feature_dim",
    "input_kind",
    "weights",
    "weights_sha256",
    "weights_path",
    "preprocessing",
    "flip",
    "precision",
    "dtype",
)


def train_head(
    caches: Sequence[str | Path] | str | Path,
    head: str = "logreg",
    *,
    stack: Sequence[Sequence[str | Path] | str | Path] = (),
    balance: str | Sequence[str] | None = None,
    train_split: str = "train",
    eval_split: str | None = "valid",
    search: bool = False,
    out_of_core: bool = False,
    in_progress: bool = False,
    out: str | Path | None = None,
    groups: list[str] | None = None,
    **head_params,
) -> tuple[HeadModel, dict]:
    """Fit ``head`` on ``train_split`` of the cache(s), evaluate on ``eval_split``, save to ``out``.

    ``caches``: one dataset's caches, joined side by side by image id (e.g. two backbones).
    ``stack``: more datasets, each a cache or a list of caches like ``caches``, whose rows
    train the head too (:mod:`featgender.mixing`); each dataset is then evaluated on its own.
    ``balance``: what the sample weights even out: none (default), or some of dataset,
    gender, group (see :func:`featgender.mixing.balance_weights`).
    ``head_params`` (pca, normalize, C, ...) go to :func:`featgender.heads.make_head`.
    ``out_of_core`` streams the features from HDF5 (one cache, linear heads only).
    ``in_progress``: train and evaluate on the images finished so far of caches still being
    extracted (a snapshot taken once: every epoch sees the same rows).

    Returns the model and the evaluation (also stored in ``model.metrics``).
    """
    datasets = [_cache_list(caches)] + [_cache_list(more) for more in stack]
    started = time.perf_counter()
    if out_of_core:
        pipeline, sources, n_train, search_result = _fit_out_of_core(
            datasets, head, balance, search, train_split, in_progress, head_params
        )
        trained_on = [{"name": Path(str(sources[0].get("dataset_root", ""))).name, "images": n_train}]
    else:
        parts = read_datasets(datasets, train_split, in_progress=in_progress)
        for part in parts:
            if len(part.rows.labels) == 0:
                raise FeatgenderError(f"--train-split {train_split}: no images in {part.caches[0]}")
        features, labels = stack_rows(parts)
        pipeline, search_result = fit_head(
            features,
            labels,
            head,
            search=search,
            overwrite_features=True,
            sample_weight=balance_weights(parts, balance),
            **head_params,
        )
        sources, n_train = parts[0].rows.metadata["sources"], len(labels)
        trained_on = [
            {
                "name": part.name,
                "caches": [str(path.resolve()) for path in part.caches],
                "images": len(part.rows.labels),
                "dataset_fingerprints": [source.get("dataset_fingerprint") for source in part.rows.metadata["sources"]],
            }
            for part in parts
        ]
    fit_seconds = time.perf_counter() - started
    model = HeadModel(
        pipeline,
        head=head,
        params={**{k: v for k, v in head_params.items() if v is not None}, **search_result.get("best_params", {})},
        backbones=[{key: source.get(key) for key in BACKBONE_KEYS} for source in sources],
        training={
            "caches": [str(Path(path).resolve()) for path in datasets[0]],
            "dataset_fingerprints": [source.get("dataset_fingerprint") for source in sources],
            "datasets": trained_on,
            "balance": parse_balance(balance),
            "split": train_split,
            "images": n_train,
            "fit_seconds": round(fit_seconds, 3),
            "search": search_result,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        versions=library_versions(),
    )
    evaluation = {}
    if eval_split is not None:
        evaluation = evaluate_datasets(model, datasets, eval_split, groups=groups, in_progress=in_progress)
        model.metrics = public_result(evaluation)
    if out is not None:
        model.save(out)
    return model, evaluation


def _cache_list(caches: Sequence[str | Path] | str | Path) -> list[Path]:
    return [Path(caches)] if isinstance(caches, (str, Path)) else [Path(path) for path in caches]


def _fit_out_of_core(
    datasets: list[list[Path]], head: str, balance, search: bool, train_split: str, in_progress: bool, head_params: dict
):
    """The streaming SGD fit of one cache: (pipeline, sources, rows seen, search result)."""
    if len(datasets) != 1 or len(datasets[0]) != 1:
        raise FeatgenderError("--out-of-core: fits on one cache at a time (no --stack, no joined caches)")
    unsupported = [f"--{key}" for key in ("pca", "C") if head_params.get(key) is not None] + ["--search"] * search
    unsupported += ["--balance"] * bool(parse_balance(balance))
    if unsupported:
        raise FeatgenderError(
            f"--out-of-core: {', '.join(unsupported)} not supported by the streaming SGD fit (its options: --normalize)"
        )
    options = {key: head_params[key] for key in ("normalize", "epochs", "alpha") if head_params.get(key) is not None}
    rows = open_rows(datasets[0][0], in_progress=in_progress)
    order = np.random.default_rng(0)  # another block order each epoch, the same each run
    pipeline = fit_head_streaming(
        lambda: iter_cache_chunks(rows, train_split, shuffle=order), head, overwrite_chunks=True, **options
    )
    return pipeline, [rows.metadata], int(pipeline.named_steps["scale"].n_samples_seen_), {}


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
    parts = read_datasets([_cache_list(caches) for caches in datasets], split, in_progress=in_progress)
    evaluations = {}
    for part in parts:
        _check_caches_fit_model(model, part.rows)
        wanted = None if groups is None else [name for name in groups if name in part.rows.attribute_names]
        evaluations[part.name] = evaluate_features(model, part.rows, groups=groups if len(parts) == 1 else wanted)
        evaluations[part.name]["split"] = split
    if len(parts) == 1:
        return evaluations[parts[0].name]
    return pool_evaluations(evaluations, split)


def pool_evaluations(evaluations: dict[str, dict], split: str) -> dict:
    """Several datasets' evaluations as one: the metrics of all their rows pooled (with CIs),
    and each dataset's own evaluation under ``datasets``."""
    labels = np.concatenate([evaluation["_curves"]["labels"] for evaluation in evaluations.values()])
    scores = np.concatenate([evaluation["_curves"]["scores"] for evaluation in evaluations.values()])
    predicted = (scores >= 0.5).astype(int)
    pooled = classification_metrics(labels, predicted, scores)
    pooled.update(
        ci95=bootstrap_ci(labels, predicted, scores),
        subgroups={},
        split=split,
        datasets={name: public_result(evaluation) for name, evaluation in evaluations.items()},
        _curves={"labels": labels, "scores": scores},
    )
    return pooled


# --- reports ---------------------------------------------------------------------------------


def write_report(result: dict, folder: str | Path, *, title: str = "featgender evaluation") -> list[Path]:
    """metrics.json, report.md, mistakes.png (a contact sheet of the worst mistakes) and
    (with matplotlib) roc.png, confusion.png, subgroups.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = public_result(result)
    written = [folder / "metrics.json", folder / "report.md"]
    written[0].write_text(json.dumps(plain, indent=2))
    written[1].write_text(markdown_summary(plain, title))
    if plain.get("worst_mistakes"):
        written.append(contact_sheet(plain["worst_mistakes"], folder / "mistakes.png"))
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'featgender[plots]'): no PNG plots")
        return written
    written += _plots(result, folder)
    return written


def markdown_summary(result: dict, title: str) -> str:
    """A markdown table of the metrics with CIs, the confusion matrix and subgroup gaps."""
    lines = [
        f"# {title}",
        "",
        f"Split: {result.get('split', '?')}, {result['n']} images.",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
    ]
    for name in METRICS:
        if name in result:
            low, high = result["ci95"].get(name, [float("nan")] * 2)
            lines.append(f"| {name} | {result[name]:.4f} | {low:.4f} – {high:.4f} |")
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    lines += [
        "",
        "Confusion matrix (rows: true female, male; columns: predicted female, male):",
        "",
        "| | female | male |",
        "|---|---|---|",
        f"| female | {tn} | {fp} |",
        f"| male | {fn} | {tp} |",
    ]
    for name, slices in result.get("subgroups", {}).items():
        lines += [
            "",
            f"## {name} (largest accuracy gap {slices['accuracy_gap']:.4f})",
            "",
            "| group | n | accuracy | women called men | men called women |",
            "|---|---|---|---|---|",
        ]
        for group, row in slices["groups"].items():
            rates = [f"{row[k]:.4f}" if row[k] is not None else "–" for k in ("female_error", "male_error")]
            lines.append(f"| {group} | {row['n']} | {row['accuracy']:.4f} | {rates[0]} | {rates[1]} |")
    for name, table in result.get("group_gender", {}).items():
        lines += [
            "",
            f"## Errors per {name} x gender ({group_gender_headline(table)})",
            "",
            "| group | gender | n | errors | error rate | 95% CI | faces not found |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {cell['group']} | {cell['gender']} | {cell['n']} | {cell['errors']} | {cell['error_rate']:.2%} | "
            f"{cell['ci95'][0]:.2%} – {cell['ci95'][1]:.2%} | {cell['failed']} |"
            for cell in table["cells"]
        ]
    audit = result.get("label_audit")
    if audit is not None:
        lines += ["", "## Labels checked by identity", "", audit_sentence(audit)]
    if result.get("worst_mistakes"):
        lines += [
            "",
            "## Worst mistakes (the surest wrong answers; mistakes.png shows them)",
            "",
            "| image | true | P(male) | label contradicted by the same person's images |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {Path(m['image']).name} | {m['label']} | {m['p_male']:.4f} | "
            f"{'yes' if m.get('label_contradicted') else ''} |"
            for m in result["worst_mistakes"]
        ]
    return "\n".join(lines) + "\n"


def group_gender_headline(table: dict) -> str:
    """One attribute's table of :func:`group_gender_errors` in a phrase: its worst cell and gaps."""
    worst = table["worst"]
    if worst is None:
        return "no cell of 10 faces or more"
    return (
        f"worst: {worst['group']} {worst['gender']} {worst['error_rate']:.1%} wrong of {worst['n']}; "
        f"largest gap {table['error_gap']:.1%}, equalized-odds gap {table['equalized_odds_gap']:.1%}"
    )


def group_gender_lines(table: dict) -> list[str]:
    """One attribute's table of :func:`group_gender_errors` as aligned text, a line per group:
    each gender's error rate, its 95% CI and n (for the command line)."""
    width = max(len(cell["group"]) for cell in table["cells"]) if table["cells"] else 0
    by_group: dict[str, dict[str, str]] = {}
    for cell in table["cells"]:
        low, high = cell["ci95"]
        failed = f", {cell['failed']} not found" if cell["failed"] else ""
        by_group.setdefault(cell["group"], {})[cell["gender"]] = (
            f"{cell['error_rate']:6.1%} ({low:.1%}-{high:.1%}, n={cell['n']}{failed})"
        )
    return [
        f"{group:<{width}}  women {parts.get('women', '-'):<30} men {parts.get('men', '-')}"
        for group, parts in by_group.items()
    ]


def contact_sheet(mistakes: list[dict], out: Path, *, columns: int = 6, side: int = 128) -> Path:
    """A PNG grid of the mistakes' images, each captioned with its true label and P(male)
    (an image that cannot be read gets a grey tile)."""
    from PIL import Image, ImageDraw

    from featgender.images import load_image

    caption = 30
    rows = -(-len(mistakes) // columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, mistake in enumerate(mistakes):
        left, top = index % columns * side, index // columns * (side + caption)
        try:
            tile = Image.fromarray(load_image(mistake["image"]).permute(1, 2, 0).numpy())
            tile.thumbnail((side, side))
        except Exception:  # moved or unreadable: the caption still says what was wrong
            tile = Image.new("RGB", (side, side), (160, 160, 160))
        sheet.paste(tile, (left + (side - tile.width) // 2, top + (side - tile.height) // 2))
        doubt = " (label?)" if mistake.get("label_contradicted") else ""
        draw.text((left + 4, top + side + 2), f"true {mistake['label']}{doubt}", fill="black")
        draw.text((left + 4, top + side + 15), f"P(male) {mistake['p_male']:.3f}", fill="firebrick")
    sheet.save(out)
    return out


def _plots(result: dict, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    curves = result.get("_curves")
    if curves is not None and "roc_auc" in result:
        false_pos, true_pos, _ = skm.roc_curve(curves["labels"], curves["scores"])
        figure, axes = plt.subplots(figsize=(4.5, 4.5))
        axes.plot(false_pos, true_pos, label=f"AUC {result['roc_auc']:.4f}")
        axes.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        axes.set(xlabel="false positive rate (women called men)", ylabel="true positive rate (men)", title="ROC")
        axes.legend(loc="lower right")
        written.append(_save(figure, folder / "roc.png"))
    figure, axes = plt.subplots(figsize=(4, 3.5))
    skm.ConfusionMatrixDisplay(np.array(result["confusion_matrix"]), display_labels=["female", "male"]).plot(
        ax=axes, colorbar=False
    )
    written.append(_save(figure, folder / "confusion.png"))
    subgroups = result.get("subgroups", {})
    if subgroups:
        names, accuracies, colours = [], [], []
        for index, (attribute, slices) in enumerate(subgroups.items()):
            for group, row in slices["groups"].items():
                names.append(f"{attribute}: {group} (n={row['n']})")
                accuracies.append(row["accuracy"])
                colours.append(f"C{index % 10}")
        figure, axes = plt.subplots(figsize=(7, 0.3 * len(names) + 1))
        axes.barh(names, accuracies, color=colours)
        axes.axvline(result["accuracy"], color="k", linestyle=":", linewidth=0.8)
        axes.set(xlabel="accuracy", xlim=(max(0.0, min(accuracies) - 0.05), 1.0), title="Accuracy per group")
        axes.invert_yaxis()
        written.append(_save(figure, folder / "subgroups.png"))
    if result.get("group_gender"):
        written.append(_group_gender_plot(result["group_gender"], folder / "group_gender.png"))
    return written


def _group_gender_plot(tables: dict, path: Path) -> Path:
    """Error rate per group x gender with 95% CIs, one panel per attribute (Gender Shades' view)."""
    import matplotlib.pyplot as plt

    heights = [len(table["cells"]) for table in tables.values()]
    figure, panels = plt.subplots(
        len(tables),
        1,
        figsize=(7, 0.28 * sum(heights) + 1.2 * len(tables)),
        gridspec_kw={"height_ratios": [max(h, 1) for h in heights]},
        squeeze=False,
    )
    for axes, (name, table) in zip(panels[:, 0], tables.items(), strict=True):
        cells = table["cells"]
        rates = np.array([cell["error_rate"] for cell in cells]) * 100
        spans = (
            np.array([[cell["error_rate"] - cell["ci95"][0], cell["ci95"][1] - cell["error_rate"]] for cell in cells]).T
            * 100
        )
        axes.barh(
            [f"{cell['group']} {cell['gender']} (n={cell['n']})" for cell in cells],
            rates,
            xerr=spans if len(cells) else None,
            capsize=2,
            color=["firebrick" if cell["gender"] == "women" else "steelblue" for cell in cells],
        )
        axes.set(xlabel="error rate (%)", title=f"{name} x gender: {group_gender_headline(table)}")
        axes.title.set_fontsize(8)
        axes.invert_yaxis()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
