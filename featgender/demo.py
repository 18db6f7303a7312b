"""The end-to-end demo: extract each dataset's cache, fit one head on their train splits,
report each dataset's test metrics, save the model."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from featgender.backbones import get_config, weights_available
from featgender.defaults import DEFAULT_HEAD
from featgender.extract import extract_to_cache
from featgender.training import train_head

# Most accurate first, on UTKFace and unseen CelebA faces (benchmarks/README.md); all offline.
OFFLINE_BACKBONES = ("dlib_resnet", "efficientnet_lite0")
# What the weights even out when the demo trains on several datasets (benchmarks/README.md,
# "Fair across skin tone and gender").
DEMO_BALANCE = "dataset,gender"


def best_offline_backbone() -> str:
    """The most accurate backbone whose code and weights are installed (no network needed)."""
    for name in OFFLINE_BACKBONES:
        if weights_available(get_config(name)) and (name != "dlib_resnet" or importlib.util.find_spec("dlib")):
            return name
    return OFFLINE_BACKBONES[-1]  # its build names the extra to install


def run_demo(
    data: str | Path | Sequence[str | Path],
    *,
    backbone: str | None = None,
    head: str = DEFAULT_HEAD,
    balance: str | None = DEMO_BALANCE,
    limit: int | None = None,
    out: str | Path | None = None,
    **extract_options,
) -> dict:
    """Run the whole path offline and return what it did and measured.

    ``data``: one dataset, or several whose rows train one head together (each embedded into
    its own cache, weighted by ``balance`` as ``fit --balance``, each evaluated on its own test
    split). ``backbone`` defaults to :func:`best_offline_backbone`. The model is saved to
    ``out`` (default ``models/demo-<backbone>-<head>.joblib``). Returns a dict with ``caches``
    (the :class:`~featgender.extract.CacheResult` of each dataset), ``model`` (the fitted
    :class:`~featgender.heads.HeadModel`), ``model_path`` and ``test`` (its evaluation).
    """
    datasets = [data] if isinstance(data, (str, Path)) else list(data)
    backbone = backbone or best_offline_backbone()
    caches = [extract_to_cache(dataset, backbone=backbone, limit=limit, **extract_options) for dataset in datasets]
    out = Path(out) if out is not None else Path("models") / f"demo-{backbone}-{head}.joblib"
    model, evaluation = train_head(
        caches[0].path,
        head,
        stack=[cache.path for cache in caches[1:]],
        balance=balance if len(caches) > 1 else None,
        eval_split="test",
        out=out,
    )
    return {"caches": caches, "model": model, "model_path": out, "test": evaluation}
