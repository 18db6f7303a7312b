"""One head from several datasets: their cached rows stacked, and sample weights that balance
datasets, genders and groups.

A gender classifier trained on CelebA alone learns CelebA's people (mostly lighter-skinned
celebrities) and errs most for darker-skinned women; mixing in race-diverse faces (UTKFace)
is the lever that data gives. Each dataset is read as :func:`featgender.cache.read_caches`
reads one (several caches of the same images join side by side, e.g. two backbones); the
datasets are then stacked by rows, so they must hold features of the same backbone(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from featgender.cache import CacheData, features_mismatch, read_caches
from featgender.errors import FeatgenderError

BALANCE_KEYS = ("dataset", "gender", "group")
# The attribute that "group" balances, where a dataset has it; datasets without it are one group.
BALANCE_GROUP = "race"


class LabelledRows(Protocol):
    """Rows with labels (1 = male) and optional attributes: cached rows or a dataset's split."""

    labels: np.ndarray
    attributes: np.ndarray | None
    attribute_names: list[str]


@dataclass
class DatasetRows:
    """One dataset's rows of a split: its name (the dataset folder's), its caches and the rows."""

    name: str
    caches: list[Path]
    rows: CacheData


def read_datasets(
    datasets: Sequence[Sequence[str | Path] | str | Path], split: str | None, *, in_progress: bool = False
) -> list[DatasetRows]:
    """Read ``split`` of each dataset, given as its cache or its list of caches (joined by image id).

    The datasets' features must mean the same (same backbone, layer, weights and flip, in the
    same order); a dataset named twice is refused, since its rows would count twice.
    """
    read = []
    for given in datasets:
        caches = cache_list(given)
        rows = read_caches(caches, split, in_progress=in_progress)
        read.append(DatasetRows(_dataset_name(rows, caches[0]), caches, rows))
    first = read[0]
    for index, other in enumerate(read[1:], start=1):
        theirs, ours = other.rows.metadata["sources"], first.rows.metadata["sources"]
        if len(theirs) != len(ours) or any(features_mismatch(a, b) for a, b in zip(theirs, ours, strict=True)):
            raise FeatgenderError(
                f"{other.caches[0]}: its features are not those of {first.caches[0]} "
                f"({_describe(other)} against {_describe(first)}); stacked datasets need the same "
                "backbone(s), weights and --flip"
            )
        fingerprint = _sources(other, lambda source: source.get("dataset_fingerprint"))
        if any(
            fingerprint == _sources(done, lambda source: source.get("dataset_fingerprint")) for done in read[:index]
        ):
            raise FeatgenderError(f"{other.caches[0]}: the same dataset is given twice")
    names = [dataset.name for dataset in read]
    for dataset in read:
        if names.count(dataset.name) > 1:
            dataset.name = f"{dataset.name} ({dataset.caches[0].name})"
    return read


def cache_list(caches: Sequence[str | Path] | str | Path) -> list[Path]:
    """One dataset's caches as a list of paths: one cache, or several joined by image id."""
    return [Path(caches)] if isinstance(caches, (str, Path)) else [Path(path) for path in caches]


def stack_rows(datasets: Sequence[DatasetRows]) -> tuple[np.ndarray, np.ndarray]:
    """The datasets' features and labels, one after the other."""
    features = (
        np.concatenate([dataset.rows.features for dataset in datasets])
        if len(datasets) > 1
        else datasets[0].rows.features
    )
    return features, np.concatenate([dataset.rows.labels for dataset in datasets])


def parse_balance(balance: str | Sequence[str] | None) -> list[str]:
    """``'dataset,gender'`` (or a list, or 'none'/None) as the checked list of what to balance."""
    if balance is None or balance == "none":
        return []
    keys = [key.strip() for key in balance.split(",")] if isinstance(balance, str) else list(balance)
    unknown = [key for key in keys if key not in BALANCE_KEYS]
    if unknown or not keys:
        raise FeatgenderError(
            f"--balance {balance!r}: use none, or a comma-separated choice of {', '.join(BALANCE_KEYS)}"
        )
    return [key for key in BALANCE_KEYS if key in keys]


def balance_weights(
    datasets: Sequence[DatasetRows | LabelledRows], balance: str | Sequence[str] | None
) -> np.ndarray | None:
    """Sample weights giving every cell the same total weight, cells being the rows that share
    what ``balance`` names: their dataset, gender, and group (the dataset's ``race`` where it has
    one). The weights average 1 over all rows; None when nothing is balanced.

    For example ``dataset,gender``: CelebA's women, CelebA's men, UTKFace's women and UTKFace's
    men weigh a quarter each, however many rows each has. Each dataset is given as its cached
    rows (:class:`DatasetRows`) or as any rows with labels and attributes (a
    :class:`~featgender.data.FaceDataset`'s split, for fine-tuning).
    """
    keys = parse_balance(balance)
    if not keys:
        return None
    columns = []
    for index, dataset in enumerate(datasets):
        rows = dataset.rows if isinstance(dataset, DatasetRows) else dataset
        group = np.zeros(len(rows.labels), dtype=np.int64)
        if rows.attributes is not None and BALANCE_GROUP in rows.attribute_names:
            group = rows.attributes[:, rows.attribute_names.index(BALANCE_GROUP)].astype(np.int64)
        parts = {"dataset": np.full(len(rows.labels), index), "gender": rows.labels.astype(np.int64), "group": group}
        columns.append(np.stack([parts[key] for key in keys], axis=1))
    cells, codes, counts = np.unique(np.concatenate(columns), axis=0, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    return (len(codes) / (len(cells) * counts))[codes]


def _dataset_name(rows: CacheData, first_cache: Path) -> str:
    root = rows.metadata.get("dataset_root")
    return Path(root).name if root else first_cache.stem


def _sources(dataset: DatasetRows, key) -> list:
    """``key`` of each cache's metadata of ``dataset``."""
    return [key(source) for source in dataset.rows.metadata["sources"]]


def _describe(dataset: DatasetRows) -> str:
    return " + ".join(
        f"{source.get('backbone')}{' --flip' if source.get('flip') else ''}"
        for source in dataset.rows.metadata["sources"]
    )


__all__ = [
    "BALANCE_KEYS",
    "DatasetRows",
    "LabelledRows",
    "balance_weights",
    "cache_list",
    "parse_balance",
    "read_datasets",
    "stack_rows",
]
