"""The end-to-end demo: extract a cache, fit a head on its train split, report test metrics."""

from __future__ import annotations

from pathlib import Path

from featgender.cache import extract_to_cache, read_cache
from featgender.evaluate import classification_metrics
from featgender.heads import make_head


def run_demo(
    data: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    head: str = "logreg",
    limit: int | None = None,
    **extract_options,
) -> dict:
    """Run the whole path offline and return what it did and measured.

    Returns a dict with ``cache`` (the :class:`~featgender.cache.CacheResult`),
    ``head``, ``train_images`` and ``test`` metrics.
    """
    result = extract_to_cache(data, backbone=backbone, limit=limit, **extract_options)
    train = read_cache(result.path, "train")
    test = read_cache(result.path, "test")
    model = make_head(head).fit(train.features, train.labels)
    scores = model.predict_proba(test.features)[:, 1]
    return {
        "cache": result,
        "head": head,
        "train_images": len(train.labels),
        "test": classification_metrics(test.labels, (scores >= 0.5).astype(int), scores),
    }
