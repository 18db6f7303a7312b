"""The end-to-end demo: extract a cache, fit a head on its train split, report test metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from featgender.backbones import get_config, weights_available
from featgender.extraction import extract_to_cache
from featgender.evaluate import train_head

# Most accurate first, on UTKFace and unseen CelebA faces (benchmarks/README.md); all offline.
OFFLINE_BACKBONES = ("dlib_resnet", "efficientnet_lite0")


def best_offline_backbone() -> str:
    """The most accurate backbone whose code and weights are installed (no network needed)."""
    for name in OFFLINE_BACKBONES:
        if weights_available(get_config(name)) and (name != "dlib_resnet" or importlib.util.find_spec("dlib")):
            return name
    return OFFLINE_BACKBONES[-1]  # its build names the extra to install


def run_demo(
    data: str | Path,
    *,
    backbone: str | None = None,
    head: str = "logreg",
    limit: int | None = None,
    **extract_options,
) -> dict:
    """Run the whole path offline and return what it did and measured.

    ``backbone`` defaults to :func:`best_offline_backbone`. Returns a dict with ``cache``
    (the :class:`~featgender.extraction.CacheResult`), ``model`` (the fitted
    :class:`~featgender.heads.HeadModel`) and ``test`` (its evaluation).
    """
    result = extract_to_cache(data, backbone=backbone or best_offline_backbone(), limit=limit, **extract_options)
    model, evaluation = train_head(result.path, head, eval_split="test")
    return {"cache": result, "model": model, "test": evaluation}
