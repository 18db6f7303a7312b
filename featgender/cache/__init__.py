"""The HDF5 feature cache: one file per dataset x backbone, readable with plain h5py.

- :mod:`~featgender.cache.schema`: what a cache holds (defined once; ``docs/cache.md``),
  which caches hold the same features, where caches go;
- :mod:`~featgender.cache.layout`: the files beside a cache while it is written;
- :mod:`~featgender.cache.read`: every reader, of finished caches and of extractions in progress;
- :mod:`~featgender.cache.write`: the one writer, crash-safe and resumable, and the torchrun join.

The names below are the package's public API.
"""

from featgender.cache.layout import PartialFolder, missing_shards, shard_path, shards_in_progress
from featgender.cache.read import (
    CacheData,
    CacheRows,
    cache_summary,
    iter_cache_chunks,
    open_rows,
    read_cache,
    read_caches,
    read_metadata,
)
from featgender.cache.schema import (
    DATASETS,
    DEFAULT_CACHE_DIR,
    FEATURE_KEYS,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    ROOT_ATTRIBUTES,
    cache_metadata,
    default_cache_path,
    feature_preprocessing,
    features_mismatch,
    identity_mismatch,
    library_versions,
    schema_markdown,
)
from featgender.cache.write import CacheWriter, join_shards, row_table_bytes, write_cache, write_rows

__all__ = [
    "DATASETS",
    "DEFAULT_CACHE_DIR",
    "FEATURE_KEYS",
    "FORMAT_VERSION",
    "IDENTITY_KEYS",
    "ROOT_ATTRIBUTES",
    "CacheData",
    "CacheRows",
    "CacheWriter",
    "PartialFolder",
    "cache_metadata",
    "cache_summary",
    "default_cache_path",
    "feature_preprocessing",
    "features_mismatch",
    "identity_mismatch",
    "iter_cache_chunks",
    "join_shards",
    "library_versions",
    "missing_shards",
    "open_rows",
    "read_cache",
    "read_caches",
    "read_metadata",
    "row_table_bytes",
    "schema_markdown",
    "shard_path",
    "shards_in_progress",
    "write_cache",
    "write_rows",
]
