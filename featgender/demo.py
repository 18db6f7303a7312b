"""The end-to-end demo: extract a cache, fit a head on its train split, report test metrics."""

from __future__ import annotations

from pathlib import Path

from featgender.cache import extract_to_cache
from featgender.evaluate import train_head


def run_demo(
    data: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    head: str = "logreg",
    limit: int | None = None,
    **extract_options,
) -> dict:
    """Run the whole path offline and return what it did and measured.

    Returns a dict with ``cache`` (the :class:`~featgender.cache.CacheResult`), ``model``
    (the fitted :class:`~featgender.heads.HeadModel`) and ``test`` (its evaluation).
    """
    result = extract_to_cache(data, backbone=backbone, limit=limit, **extract_options)
    model, evaluation = train_head(result.path, head, eval_split="test")
    return {"cache": result, "model": model, "test": evaluation}
