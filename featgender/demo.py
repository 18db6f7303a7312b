"""The end-to-end demo: fine-tune the backbone on the datasets (where a recipe is measured
for it), extract each dataset's cache with it, fit one head on their train splits, report each
dataset's test metrics, save the model."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from featgender.backbones import build_backbone, get_config, weights_available
from featgender.cache import DEFAULT_CACHE_DIR
from featgender.defaults import DEFAULT_HEAD
from featgender.errors import FeatgenderError
from featgender.extract import CacheResult, extract_layers, extract_to_cache
from featgender.files import HEAD_MODEL, check_writable
from featgender.finetune import RECIPES, FinetuneResult, finetune, recipe
from featgender.heads import make_head
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


def parse_join(join: Sequence[str]) -> list[tuple[str, str]]:
    """Each ``--join`` as (backbone, layer): ``arcface_mbf@neck.1`` names a layer, a plain name
    takes the backbone's own. An unknown backbone or layer, or one given twice, fails here."""
    specs = []
    for text in join:
        name, _, layer = text.partition("@")
        try:
            default = get_config(name).layer
        except FeatgenderError as error:
            raise FeatgenderError(str(error).replace("--backbone", "--join", 1)) from None
        if layer and layer != default:
            try:
                build_backbone(name, weights="none", layer=layer)  # a layer it does not have fails now
            except FeatgenderError as error:  # "--layer 'x': not a node ..." said of the --join
                raise FeatgenderError(f"--join {text}: {str(error).split(': ', 1)[1]}") from None
        if (name, layer or default) in specs:
            raise FeatgenderError(f"--join {text}: given twice")
        specs.append((name, layer or default))
    return specs


def joined_caches(dataset: str | Path, join: Sequence[tuple[str, str]], **options) -> list[CacheResult]:
    """The caches of the joined backbones' layers, in ``join``'s order: the layers of one
    network from one pass over the images (:func:`featgender.extract.extract_layers`)."""
    caches: dict[tuple[str, str], CacheResult] = {}
    for name in dict.fromkeys(name for name, _ in join):
        layers = [layer for each, layer in join if each == name]
        default = [get_config(name).layer]
        results = extract_layers(dataset, backbone=name, layers=None if layers == default else layers, **options)
        caches.update(zip([(name, layer) for layer in layers], results, strict=True))
    return [caches[spec] for spec in join]


def run_demo(
    data: str | Path | Sequence[str | Path],
    *,
    backbone: str | None = None,
    head: str = DEFAULT_HEAD,
    balance: str | None = DEMO_BALANCE,
    limit: int | None = None,
    out: str | Path | None = None,
    fine_tune: bool = True,
    join: Sequence[str] = (),
    C: float | None = None,
    progress: bool = True,
    **extract_options,
) -> dict:
    """Run the whole path offline and return what it did and measured.

    ``data``: one dataset, or several whose rows train one head together (each embedded into
    its own cache, weighted by ``balance`` as ``fit --balance``, each evaluated on its own test
    split). ``backbone`` defaults to :func:`best_offline_backbone`. With ``fine_tune``, a
    backbone with a recipe (:data:`featgender.finetune.RECIPES`) is first fine-tuned on the
    datasets (balanced the same way) into ``models/demo-<backbone>-ft[-limit<N>].pt``, then
    frozen again to embed them (caches in the folder of that name under ``cache/``); others
    embed them as they come. ``join``: frozen backbones (as they come, caches under the default
    folder) whose features join the first's side by side in the head, e.g. efficientnet_lite0
    on the whole crop (hair and ears, which dlib's chip cuts off), or ``name@layer`` for another
    of its layers (:func:`parse_join`; one network's layers come from one pass, the backbone's own
    among them when it is not fine-tuned); ``C``: the head's. The model
    is saved to ``out`` (default ``models/demo-<backbone>[+<joined>...]-<head>.joblib``).
    Returns a dict with ``finetuned`` (the :class:`~featgender.finetune.FinetuneResult`, or
    None), ``caches`` (the :class:`~featgender.extract.CacheResult` of each dataset),
    ``joined`` (each dataset's joined backbones' caches), ``model`` (the fitted
    :class:`~featgender.heads.HeadModel`), ``model_path`` and ``test`` (its evaluation).
    """
    datasets = [data] if isinstance(data, (str, Path)) else list(data)
    backbone = backbone or best_offline_backbone()
    specs = parse_join(join)  # a wrong name or layer fails now, not after the fine-tune
    first = (backbone, get_config(backbone).layer)
    if first in specs:
        raise FeatgenderError(f"--join {backbone}: the demo's backbone already gives that layer")
    name = "+".join([backbone, *join])
    out = Path(out) if out is not None else Path("models") / f"demo-{name}-{head}.joblib"
    make_head(head, C=C)  # an unknown head or C, and an --out no model can take, fail now, not after
    check_writable(out, HEAD_MODEL)  # the fine-tune and the extractions
    balance = balance if len(datasets) > 1 else None
    finetuned = None
    first_options = extract_options
    if fine_tune and backbone in RECIPES:
        finetuned = _fine_tune(datasets, backbone, balance, limit, progress, **extract_options)
        first_options = {
            **extract_options,
            "weights": str(finetuned.checkpoint),
            "cache_dir": Path(extract_options.get("cache_dir", DEFAULT_CACHE_DIR)) / finetuned.checkpoint.stem,
        }
    if finetuned is None:  # the backbone as it comes: a join of its other layers shares its pass
        both = [
            joined_caches(dataset, [first, *specs], limit=limit, progress=progress, **extract_options)
            for dataset in datasets
        ]
        caches, joined = [each[0] for each in both], [each[1:] for each in both]
    else:
        caches = [
            extract_to_cache(dataset, backbone=backbone, limit=limit, progress=progress, **first_options)
            for dataset in datasets
        ]
        joined = [
            joined_caches(dataset, specs, limit=limit, progress=progress, **extract_options) for dataset in datasets
        ]
    per_dataset = [
        [cache.path, *(extra.path for extra in extras)] for cache, extras in zip(caches, joined, strict=True)
    ]
    model, evaluation = train_head(
        per_dataset[0],
        head,
        stack=per_dataset[1:],
        balance=balance,
        eval_split="test",
        out=out,
        C=C,  # None: the head's own (make_head drops None)
    )
    return {
        "finetuned": finetuned,
        "caches": caches,
        "joined": joined,
        "model": model,
        "model_path": out,
        "test": evaluation,
    }


def _fine_tune(
    datasets: list, backbone: str, balance: str | None, limit: int | None, progress: bool, **options
) -> FinetuneResult:
    """``backbone``'s recipe on ``datasets``; resumed, as ``finetune`` is, when rerun."""
    return finetune(
        datasets,
        backbone=backbone,
        balance=balance,
        limit=limit,
        progress=progress,
        out=Path("models") / f"demo-{backbone}-ft{f'-limit{limit}' if limit else ''}.pt",
        **{key: options[key] for key in ("device", "precision", "format") if key in options},
        **recipe(backbone, limit),
    )
