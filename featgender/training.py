"""``featgender fit``: a head trained on the cached features of one dataset or several
(stacked, weighted per ``balance``), evaluated on another split, saved as an artifact."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featgender.cache import iter_cache_chunks, library_versions, open_rows
from featgender.data import split_code
from featgender.defaults import DEFAULT_HEAD
from featgender.errors import FeatgenderError
from featgender.evaluate import evaluate_datasets
from featgender.files import HEAD_MODEL, check_writable
from featgender.heads import HeadModel, fit_head, fit_head_streaming
from featgender.metrics import public_result
from featgender.mixing import balance_weights, cache_list, parse_balance, read_datasets, stack_rows

logger = logging.getLogger(__name__)


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
    head: str = DEFAULT_HEAD,
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
    split_code(train_split, "--train-split")
    if eval_split is not None:
        split_code(eval_split, "--eval-split")
    if out is not None:
        check_writable(out, HEAD_MODEL)
    datasets = [cache_list(caches), *map(cache_list, stack)]
    started = time.perf_counter()
    if out_of_core:
        pipeline, sources, n_train, search_result = _fit_out_of_core(
            datasets, head, balance, search, train_split, in_progress, head_params
        )
        trained_on = [{"name": Path(str(sources[0].get("dataset_root", ""))).name, "images": n_train}]
    else:
        pipeline, sources, n_train, search_result, trained_on = _fit_in_memory(
            datasets, head, balance, search, train_split, in_progress, head_params
        )
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


def _fit_in_memory(
    datasets: list[list[Path]], head: str, balance, search: bool, train_split: str, in_progress: bool, head_params: dict
):
    """The fit on the datasets' stacked train rows: (pipeline, sources, rows, search result,
    what each dataset gave)."""
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
    trained_on = [
        {
            "name": part.name,
            "caches": [str(path.resolve()) for path in part.caches],
            "images": len(part.rows.labels),
            "dataset_fingerprints": [source.get("dataset_fingerprint") for source in part.rows.metadata["sources"]],
        }
        for part in parts
    ]
    return pipeline, parts[0].rows.metadata["sources"], len(labels), search_result, trained_on


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
