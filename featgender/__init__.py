"""featgender: gender classification from faces with frozen CNN features and scikit-learn heads.

Embed a face dataset once into an HDF5 cache with a frozen pretrained backbone, then train
and compare classical heads on that cache in seconds.

The names below load their module (and torch, scikit-learn) on first use, so that
``import featgender`` and ``featgender --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from featgender.errors import FeatgenderError
from featgender.version import __version__

_LAZY = {
    "CNNFeatures": "featgender.embed",
    "build_backbone": "featgender.backbones",
    "build_cache": "featgender.extract",
    "list_backbones": "featgender.backbones",
    "list_heads": "featgender.heads",
    "load": "featgender.models",
    "load_dataset": "featgender.data",
    "load_model": "featgender.heads",
    "make_head": "featgender.heads",
    "read_cache": "featgender.cache",
    "register_backbone": "featgender.backbones",
}

if TYPE_CHECKING:
    from featgender.backbones import build_backbone, list_backbones, register_backbone
    from featgender.cache import read_cache
    from featgender.data import load_dataset
    from featgender.embed import CNNFeatures
    from featgender.extract import build_cache
    from featgender.heads import list_heads, load_model, make_head
    from featgender.models import load


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'featgender' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", "FeatgenderError", *sorted(_LAZY)]
