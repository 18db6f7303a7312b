"""``featgender compare``: two saved models on the same faces, face by face: from a dataset's
images (any two models), or from cached features (two heads on the same caches).

Two models' accuracies on one test split, each with its own CI, overlap more often than their
difference is chance: both err on most of the same hard faces. Scored on the same images (as
``predict`` scores them, as ``evaluate --data`` does), the faces one gets right and the other
wrong tell them apart: the exact McNemar test on those, and the accuracy difference with a
paired bootstrap CI, overall and per group x gender (:func:`featgender.metrics.paired_comparison`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featgender.cache import read_caches
from featgender.errors import FeatgenderError
from featgender.evaluate import cache_scores, image_scores, split_rows
from featgender.heads import load_model
from featgender.metrics import default_groups, paired_comparison, wrong_where_failed
from featgender.mixing import cache_list


def compare_images(
    first: str | Path,
    second: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    groups: list[str] | None = None,
    trusted: bool = False,
    format: str = "auto",
    face_box: str | tuple = "auto",
    faces: str = "auto",
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """:func:`~featgender.metrics.paired_comparison` of two saved models on a split of a
    dataset's images, each image routed as ``predict`` routes it for each model. An image that
    fails for a model (unreadable, no face found) is that model's wrong answer, so that both are
    judged on every face; ``failed`` says how many failed for each."""
    rows = split_rows(data, split, format=format)
    scores = [
        image_scores(model, rows, trusted=trusted, face_box=face_box, faces=faces, device=device, progress=progress)
        for model in (first, second)
    ]
    return _paired(rows, scores, groups, models=(first, second), split=split, source=str(data))


def compare_caches(
    first: str | Path,
    second: str | Path,
    caches: Sequence[str | Path] | str | Path,
    *,
    split: str = "test",
    groups: list[str] | None = None,
    trusted: bool = False,
) -> dict:
    """The same for two heads on the same cache(s) (one backbone's, or several joined, as both
    heads were trained on): seconds, where the images take minutes. Rows whose image failed at
    extraction are both heads' wrong answers."""
    caches = cache_list(caches)
    rows = read_caches(caches, split, include_failed=True)
    scores = [_cache_scores(model, rows, trusted) for model in (first, second)]
    return _paired(rows, scores, groups, models=(first, second), split=split, source=" + ".join(map(str, caches)))


def _cache_scores(model: str | Path, rows, trusted: bool) -> np.ndarray:
    """:func:`cache_scores`, its error naming the model it is about (there are two)."""
    try:
        return cache_scores(load_model(model, trusted=trusted), rows)
    except FeatgenderError as error:
        raise FeatgenderError(f"--model {model}: {error}") from None


def _paired(
    rows, scores: list[np.ndarray], groups: list[str] | None, *, models: tuple, split: str, source: str
) -> dict:
    """The paired comparison of two models' P(male) columns for ``rows`` (NaN: failed, made
    wrong), with what was compared: the models, the split and its source (``data``)."""
    first, second = ((wrong_where_failed(rows.labels, each) >= 0.5).astype(int) for each in scores)
    result = paired_comparison(rows, first, second, default_groups(rows) if groups is None else groups)
    failed = [int(np.isnan(each).sum()) for each in scores]
    return {**result, "failed": failed, "models": [str(model) for model in models], "split": split, "data": source}


def comparison_markdown(result: dict) -> str:
    """The comparison as markdown: the overall line, then each group x gender cell."""
    first, second = (Path(model).name for model in result["models"])
    low, high = (100 * value for value in result["difference_ci95"])
    lines = [
        f"{result['n']} {result['split']} faces of {result['data']}: {first} {result['accuracy'][0]:.4f}, "
        f"{second} {result['accuracy'][1]:.4f}; difference {100 * result['difference']:+.2f} points "
        f"(paired 95% CI {low:+.2f} to {high:+.2f}); right only for {first}: {result['only_first_right']}, "
        f"only for {second}: {result['only_second_right']}; McNemar exact p = {result['p_value']:.3g}",
    ]
    for name, cells in result["group_gender"].items():
        header = f"| {name} | gender | n | errors {first} | errors {second} | McNemar p |"
        lines += ["", header, "|---|---|---|---|---|---|"]
        lines += [
            f"| {cell['group']} | {cell['gender']} | {cell['n']} | {cell['errors'][0]} | {cell['errors'][1]} "
            f"| {cell['p_value']:.3g} |"
            for cell in cells
        ]
    return "\n".join(lines)
