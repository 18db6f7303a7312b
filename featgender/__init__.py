"""featgender: gender classification from faces with frozen CNN features and scikit-learn heads.

Embed a face dataset once into an HDF5 cache with a frozen pretrained backbone, then train
and compare classical heads on that cache in seconds.
"""

from featgender.backbones import build_backbone, list_backbones, register_backbone
from featgender.cache import read_cache
from featgender.data import load_dataset
from featgender.errors import FeatgenderError
from featgender.extraction import build_cache
from featgender.extract import CNNFeatures
from featgender.heads import list_heads, load_model, make_head
from featgender.predict import load
from featgender.version import __version__

__all__ = [
    "__version__",
    "CNNFeatures",
    "FeatgenderError",
    "build_backbone",
    "build_cache",
    "list_backbones",
    "list_heads",
    "load",
    "load_dataset",
    "load_model",
    "make_head",
    "read_cache",
    "register_backbone",
]
