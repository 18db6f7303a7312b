"""Metrics of a gender classifier, honest about their uncertainty: accuracy and friends with
bootstrap CIs, subgroup slices, errors per group x gender with Wilson intervals, a label audit
by identity, the surest mistakes.

Pure computation on labels and scores (1 = male) and the rows' attributes: no files written,
no model loaded. Heads (:mod:`featgender.evaluate`), fine-tuned networks
(:mod:`featgender.finetune`) and the benchmarks share it through :func:`evaluate_scores`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from featgender.data import LABEL_NAMES, image_folder, read_identities
from featgender.errors import FeatgenderError

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

    The images are resampled with replacement ``n_boot`` times (seeded, :func:`_resamples`).
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    scores = None if scores is None else np.asarray(scores)
    batches = [
        resampled_metrics(labels[rows], predicted[rows], None if scores is None else scores[rows])
        for rows in _resamples(len(labels), n_boot, seed)
    ]
    samples = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    tail = (1 - level) / 2 * 100
    return {
        name: [float(np.nanpercentile(values, tail)), float(np.nanpercentile(values, 100 - tail))]
        for name, values in samples.items()
    }


def _resamples(size: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """``n_boot`` seeded bootstrap resamples of ``size`` rows (row indices, resamples x rows), a
    batch at a time: memory stays near 2**22 resampled rows whatever the split's size."""
    rng, per_batch = np.random.default_rng(seed), max(1, 2**22 // size)
    for done in range(0, n_boot, per_batch):
        yield rng.integers(0, size, size=(min(per_batch, n_boot - done), size))


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
        cells: list[dict[str, Any]] = []
        for group, gender, members in _group_gender_cells(data, name):
            n, errors = int(members.sum()), int((predicted[members] != data.labels[members]).sum())
            cells.append(
                {
                    "group": group,
                    "gender": gender,
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


def mcnemar_exact(only_first_right: int, only_second_right: int) -> float:
    """Two-sided exact McNemar p-value: how likely, were the two classifiers equally accurate,
    a split of their discordant faces at least this uneven would be (the binomial test on the
    faces one got right and the other wrong; the faces both got right or wrong say nothing)."""
    n, fewer = only_first_right + only_second_right, min(only_first_right, only_second_right)
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(fewer + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_comparison(
    data, first: np.ndarray, second: np.ndarray, groups: list[str] | None = None, *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Two classifiers' predictions (0/1) on the same rows, compared face by face.

    Their accuracies; the difference (second - first) with its paired percentile bootstrap
    95% CI (the same resampled faces for both); the discordant faces and the exact McNemar
    p-value; and per group x gender cell (as :func:`group_gender_errors` makes them) each one's
    errors and the cell's own McNemar p-value. Paired, a difference that unpaired CIs call
    overlapping can be told from chance, and one that they call apart can be found not to be.
    """
    labels = np.asarray(data.labels)
    right = np.stack([np.asarray(first) == labels, np.asarray(second) == labels]).astype(np.int8)
    gained = right[1] - right[0]
    sampled = np.concatenate([gained[rows].mean(1) for rows in _resamples(len(labels), n_boot, seed)])
    first_only, second_only = right[0] > right[1], right[1] > right[0]
    cells = {
        name: [
            {
                "group": group,
                "gender": gender,
                "n": int(members.sum()),
                "errors": [int((1 - right[0][members]).sum()), int((1 - right[1][members]).sum())],
                "p_value": mcnemar_exact(int(first_only[members].sum()), int(second_only[members].sum())),
            }
            for group, gender, members in _group_gender_cells(data, name)
        ]
        for name in (default_groups(data) if groups is None else groups)
    }
    return {
        "n": int(len(labels)),
        "accuracy": [float(right[0].mean()), float(right[1].mean())],
        "difference": float(right[1].mean() - right[0].mean()),
        "difference_ci95": [float(np.percentile(sampled, 2.5)), float(np.percentile(sampled, 97.5))],
        "only_first_right": int(first_only.sum()),
        "only_second_right": int(second_only.sum()),
        "p_value": mcnemar_exact(int(first_only.sum()), int(second_only.sum())),
        "group_gender": cells,
    }


def _group_gender_cells(data, name: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """Each non-empty cell of attribute ``name`` x true gender: group, 'women' or 'men', rows."""
    codes, group_names = _usable_groups(data, name)
    for code, group in enumerate(group_names):
        for gender, gender_name in ((0, "women"), (1, "men")):
            members = (codes == code) & (data.labels == gender)
            if members.any():
                yield group, gender_name, members


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


def wrong_where_failed(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """P(male) ``scores`` with each failed image's NaN made the surest wrong answer
    (``--count-failed``)."""
    return np.where(np.isnan(scores), 1.0 - labels, scores)


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
