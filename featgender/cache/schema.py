"""The cache's schema, defined once: the HDF5 datasets and root attributes of a finished
cache, what decides whether two caches hold the same features, and where caches go.

:data:`DATASETS` and :data:`ROOT_ATTRIBUTES` are the reference: the writer writes them (a
test holds every written cache to them) and ``docs/cache.md`` shows them as
:func:`schema_markdown` renders them (a test holds the page to it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import h5py
import numpy as np

from featgender.data import FaceDataset
from featgender.version import __version__

if TYPE_CHECKING:
    from featgender.backbones import Backbone


FORMAT_VERSION = 1


DEFAULT_CACHE_DIR = Path("cache")


# Identity fields: a cache, or a partial one, is reused only when all of these match.
IDENTITY_KEYS = (
    "backbone",
    "layer",
    "weights",
    "weights_sha256",
    "preprocessing",
    "flip",
    "precision",
    "dtype",
    "dataset_fingerprint",
)


def default_cache_path(
    dataset: FaceDataset,
    backbone: str,
    limit: int | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    flip: bool = False,
    layer: str | None = None,
) -> Path:
    """``cache/<dataset>-<backbone>[@<layer>][-limit<N>][-flip].h5``: ``layer`` when it is not
    the backbone's default one."""
    suffix = (f"@{layer}" if layer else "") + (f"-limit{limit}" if limit else "") + ("-flip" if flip else "")
    return Path(cache_dir) / f"{dataset.name}-{backbone}{suffix}.h5"


def library_versions() -> dict:
    """Versions of featgender and the libraries whose output it stores."""
    import sklearn
    import torch
    import torchvision

    versions = {
        "featgender": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "scikit-learn": sklearn.__version__,
    }
    return {name: str(version) for name, version in versions.items()}  # TorchVersion is no plain str


def cache_metadata(
    dataset: FaceDataset,
    backbone: Backbone,
    precision: str,
    dtype: str,
    limit: int | None,
    seed: int,
    flip: bool = False,
) -> dict:
    """The root attributes a cache of ``dataset`` embedded by ``backbone`` carries."""
    config = backbone.config
    return {
        "format_version": FORMAT_VERSION,
        "backbone": config.name,
        "layer": config.layer,
        "feature_dim": backbone.feature_dim,
        "input_kind": config.input_kind,
        "weights": backbone.weights.name,
        "weights_sha256": backbone.weights.sha256 or "",
        "weights_path": backbone.weights.path or "",
        "preprocessing": json.dumps(config.preprocessing(), sort_keys=True),
        "flip": bool(flip),
        "precision": precision,
        "dtype": dtype,
        "dataset_root": str(dataset.root.resolve()),
        "dataset_format": dataset.format,
        "dataset_fingerprint": dataset.fingerprint(),
        "num_images": len(dataset),
        "split_source": dataset.split_source,
        "limit": limit if limit is not None else -1,
        "seed": seed,
        "versions": json.dumps(library_versions(), sort_keys=True),
    }


# What decides what features mean: caches (or a cache and the model fitted on one) that agree
# on these hold features the same head uses. How the face was found (a dataset's calibrated box,
# detection, the photo face step: preprocessing's FACE_FINDING_KEYS) is left out, since every
# way ends in the same face crop or aligned chip.
FEATURE_KEYS = ("backbone", "layer", "weights_sha256", "flip", "preprocessing")
FACE_FINDING_KEYS = ("face_box", "face_step")


def feature_preprocessing(preprocessing: str | dict) -> dict:
    """The part of a cache's ``preprocessing`` (JSON or dict) that decides what its features
    mean: all but how the face was found (:data:`FACE_FINDING_KEYS`)."""
    values = json.loads(preprocessing or "{}") if isinstance(preprocessing, str) else dict(preprocessing)
    return {key: value for key, value in values.items() if key not in FACE_FINDING_KEYS}


def features_mismatch(found: dict, wanted: dict) -> list[str]:
    """The :data:`FEATURE_KEYS` in which two caches' features (or a cache's and a model's) differ."""

    def value(source: dict, key: str):
        return feature_preprocessing(source.get(key) or "") if key == "preprocessing" else str(source.get(key))

    return [key for key in FEATURE_KEYS if value(found, key) != value(wanted, key)]


def identity_mismatch(found: dict, wanted: dict) -> list[str]:
    """The identity fields (:data:`IDENTITY_KEYS`) in which two caches' metadata differ."""
    return [key for key in IDENTITY_KEYS if str(found.get(key)) != str(wanted.get(key))]


class SchemaEntry(NamedTuple):
    """One HDF5 dataset or root attribute of a cache: its name, what it holds and what it means."""

    name: str
    kind: str
    meaning: str


DATASETS = (
    SchemaEntry(
        "features",
        "(N, D) float16 or float32, chunked by rows",
        "one embedding per image; NaN rows where the image failed",
    ),
    SchemaEntry("labels", "(N,) int8", "1 = male, 0 = female"),
    SchemaEntry("split", "(N,) int8", "index into its attribute `names` (train, valid, test)"),
    SchemaEntry("ids", "(N,) utf-8 strings", "image names relative to the dataset root"),
    SchemaEntry("valid", "(N,) bool", "False where the image failed"),
    SchemaEntry(
        "attributes",
        "(N, K) int32, optional",
        "CelebA's 40 attributes (0/1) or a CSV's extra columns; attrs `names`, `categories` "
        "(JSON: the codes of text columns)",
    ),
    SchemaEntry("failed/ids", "(F,) utf-8 strings, optional", "the images that failed"),
    SchemaEntry("failed/reasons", "(F,) utf-8 strings, optional", "why each failed (unreadable, no face, ...)"),
)
ROOT_ATTRIBUTES = (
    SchemaEntry("format_version", "int", "version of this schema"),
    SchemaEntry("complete", "bool", "True once every row is written"),
    SchemaEntry("backbone", "str", "registry name of the network"),
    SchemaEntry("layer", "str", "graph node embedded from (pooled when 4-D)"),
    SchemaEntry("feature_dim", "int", "D"),
    SchemaEntry("input_kind", "str", "what the backbone expects: face crop or photo"),
    SchemaEntry("weights", "str", "the weights, in words"),
    SchemaEntry("weights_sha256", "str", "sha256 of the weights file ('' for random weights)"),
    SchemaEntry("weights_path", "str", "the weights file"),
    SchemaEntry("preprocessing", "JSON", "resize, crop, mean, std, interpolation, face box"),
    SchemaEntry("flip", "bool", "each embedding averaged with the mirrored image's"),
    SchemaEntry("precision", "str", "float32 or bfloat16 (autocast) of the forward pass"),
    SchemaEntry("dtype", "str", "float16 or float32 of `features`"),
    SchemaEntry("dataset_root", "str", "the dataset's folder"),
    SchemaEntry("dataset_format", "str", "celeba, celeba-kaggle, fairface, folder or csv"),
    SchemaEntry("dataset_fingerprint", "str", "sha256 of the ids, labels and splits"),
    SchemaEntry("num_images", "int", "N"),
    SchemaEntry("split_source", "str", "the dataset's own splits, or the seeded split used"),
    SchemaEntry("limit", "int", "the seeded subset's size (-1: all images)"),
    SchemaEntry("seed", "int", "seed of the subset and split"),
    SchemaEntry("versions", "JSON", "featgender, torch, torchvision, numpy, h5py, scikit-learn"),
    SchemaEntry("failed_count", "int", "F"),
    SchemaEntry("created", "str", "UTC time the file was written (ISO 8601)"),
    SchemaEntry("shards", "JSON, torchrun only", "the shard files `features` is a virtual dataset over"),
)


def schema_markdown() -> str:
    """The two tables of :data:`DATASETS` and :data:`ROOT_ATTRIBUTES`, in markdown."""
    lines = ["| dataset | shape, dtype | meaning |", "|---|---|---|"]
    lines += [f"| `{entry.name}` | {entry.kind} | {entry.meaning} |" for entry in DATASETS]
    lines += ["", "| root attribute | type | meaning |", "|---|---|---|"]
    lines += [f"| `{entry.name}` | {entry.kind} | {entry.meaning} |" for entry in ROOT_ATTRIBUTES]
    return "\n".join(lines) + "\n"
