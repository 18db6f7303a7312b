"""Every reader of a cache: its metadata, its rows (finished, or those of an extraction still
running), its splits as arrays, chunks for out-of-core fitting.

Reading while writing (what HDF5's SWMR mode offers, without its single-file constraints):
:func:`open_rows` with ``in_progress=True`` sees the finished chunks, alone or across a
torchrun job's shards, bit-identical to the rows of the cache to come.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featgender.cache.layout import PartialFolder, missing_shards, shards_in_progress
from featgender.cache.schema import FORMAT_VERSION, identity_mismatch
from featgender.data import SPLITS, split_code
from featgender.errors import FeatgenderError


def read_metadata(path: str | Path, *, check_shards: bool = True) -> dict:
    """Root attributes of a cache, as plain Python values.

    A cache joined from torchrun shards is refused when a shard is missing, unless not
    ``check_shards``. A cache still being extracted is refused, saying how far it is."""
    path = Path(path)
    if not path.is_file():
        raise FeatgenderError(_missing_cache_message(path))
    try:
        with h5py.File(path, "r") as h5:
            metadata = {key: _plain(value) for key, value in h5.attrs.items()}
    except OSError as error:
        raise FeatgenderError(f"{path}: not a readable HDF5 cache ({error})") from None
    if check_shards and "shards" in metadata:  # a torchrun extraction's join: its features live in the shards
        missing = missing_shards(path, metadata)
        if missing:
            raise FeatgenderError(
                f"{path}: its shard {missing[0]} is missing ({len(missing)} of "
                f"{len(json.loads(metadata['shards']))}); keep {path.name}.shards/ beside it"
            )
    return metadata


def _missing_cache_message(path: Path) -> str:
    rows = _rows_in_progress(path)
    if rows is None:
        return f"{path}: no such cache file"
    return (
        f"{path}: still being extracted ({rows.metadata['finished_rows']} of {rows.metadata['num_images']} "
        "images done); pass --in-progress to read the finished ones"
    )


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class CacheRows:
    """A snapshot of a cache's rows, finished or still being written: what every reader reads.

    The per-row flags are in memory (``labels``, ``splits``, ``finished``: the image has been
    processed, ``valid``: processed and embedded); features, ids and attributes are read from
    disk by row number on demand, so a reader's memory follows what it asks for. Rows that
    finish after the snapshot was taken are not seen.
    """

    metadata: dict
    labels: np.ndarray
    splits: np.ndarray
    finished: np.ndarray
    valid: np.ndarray
    attribute_names: list[str]
    attribute_categories: dict

    def read(self, column: str, index: np.ndarray) -> np.ndarray | None:
        """Rows ``index`` (sorted, finished) of 'features', 'ids' or 'attributes' (None if absent)."""
        raise NotImplementedError

    def read_held(self, column: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of 'features' or 'ids', which every cache holds."""
        values = self.read(column, index)
        assert values is not None, f"a cache without {column}"  # the schema requires both
        return values

    def _set_attribute_info(self, h5: h5py.File) -> None:
        self.attribute_names, self.attribute_categories = [], {}
        if "attributes" in h5:
            self.attribute_names = [str(name) for name in h5["attributes"].attrs["names"]]
            self.attribute_categories = json.loads(h5["attributes"].attrs["categories"])


def _read_h5_rows(path: Path, column: str, index: np.ndarray) -> np.ndarray | None:
    """Rows ``index`` (sorted) of one dataset of an HDF5 file, read as one slice over their span
    (and only selected from when they have gaps: a split of 1 GB is not copied twice)."""
    with h5py.File(path, "r") as h5:
        if column not in h5:
            return None
        data = h5[column].asstr() if column == "ids" else h5[column]
        if not len(index):
            return data[0:0]
        span = data[index[0] : index[-1] + 1]
        return span if len(span) == len(index) else span[index - index[0]]


class _FileRows(CacheRows):
    """A finished cache file."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = read_metadata(path)
        if self.metadata.get("format_version") != FORMAT_VERSION or not self.metadata.get("complete"):
            raise FeatgenderError(f"{path}: not a complete featgender cache (format {FORMAT_VERSION})")
        with h5py.File(path, "r") as h5:
            self.labels, self.splits, self.valid = h5["labels"][:], h5["split"][:], h5["valid"][:]
            self._set_attribute_info(h5)
        self.finished = np.ones(len(self.labels), dtype=bool)

    def read(self, column: str, index: np.ndarray) -> np.ndarray | None:
        return _read_h5_rows(self.path, column, index)


class _PartialRows(CacheRows):
    """The finished chunks of an extraction in progress (``<out>.partial/``). When the
    extraction ends while they are read, the rows are read from the finished file instead:
    it was assembled from these very chunks."""

    def __init__(self, partial: PartialFolder):
        self.partial = partial
        meta = partial.read_meta()
        if meta is None:  # finished meanwhile: callers read the finished file instead
            raise FileNotFoundError(partial.meta_path)
        with h5py.File(partial.rows_path, "r") as h5:
            self.labels, self.splits = h5["labels"][:], h5["split"][:]
            self._set_attribute_info(h5)
        self.starts = np.array(partial.chunk_starts(), dtype=np.int64)
        self.finished = np.zeros(len(self.labels), dtype=bool)
        self.valid = np.zeros(len(self.labels), dtype=bool)
        for start in self.starts:
            errors = self.partial.read_chunk(start, "errors")
            self.finished[start : start + len(errors)] = True
            self.valid[start : start + len(errors)] = errors == ""
        self.metadata = {
            **meta,
            "complete": False,
            "num_images": len(self.labels),
            "finished_rows": int(self.finished.sum()),
        }

    def read(self, column: str, index: np.ndarray) -> np.ndarray | None:
        try:
            if column != "features":
                return _read_h5_rows(self.partial.rows_path, column, index)
            chunk = np.searchsorted(self.starts, index, side="right") - 1
            parts = [
                self.partial.read_chunk(self.starts[c], "features")[index[chunk == c] - self.starts[c]]
                for c in np.unique(chunk)
            ]
            if not parts:
                return np.empty((0, self.metadata["feature_dim"]), dtype=self.metadata["dtype"])
            return np.concatenate(parts)
        except FileNotFoundError:  # finished meanwhile: the chunks are gone, the cache is there
            finished = _FileRows(self.partial.out)
            if identity_mismatch(finished.metadata, self.metadata):
                raise FeatgenderError(
                    f"{self.partial.out}: replaced by another extraction while being read; read it again"
                ) from None
            return finished.read(column, index)


class _JoinedRows(CacheRows):
    """Consecutive row blocks read as one: the shards of a torchrun extraction in progress."""

    def __init__(self, parts: list[CacheRows]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(part.labels) for part in parts])
        for name in ("labels", "splits", "finished", "valid"):
            setattr(self, name, np.concatenate([getattr(part, name) for part in parts]))
        self.attribute_names, self.attribute_categories = parts[0].attribute_names, parts[0].attribute_categories
        self.metadata = {
            **parts[0].metadata,
            "complete": False,
            "num_images": int(self.offsets[-1]),
            "finished_rows": int(self.finished.sum()),
        }

    def read(self, column: str, index: np.ndarray) -> np.ndarray | None:
        pieces = [
            part.read(column, index[(index >= low) & (index < high)] - low)
            for part, low, high in zip(self.parts, self.offsets[:-1], self.offsets[1:], strict=True)
        ]
        held = [piece for piece in pieces if piece is not None]
        return np.concatenate(held) if len(held) == len(pieces) else None


def _written_rows(path: Path) -> CacheRows | None:
    """What is written at ``path``: the finished cache, the finished chunks of the extraction
    writing it, or None."""
    if path.is_file():
        return _FileRows(path)
    partial = PartialFolder(path)
    rows = _PartialRows(partial) if partial.readable() else None
    return _FileRows(path) if path.is_file() else rows  # see _rows_in_progress


def _rows_in_progress(out: Path) -> CacheRows | None:
    """The finished rows of the extraction writing ``out``, alone or by torchrun; None if none
    is, or if it finished while we looked (its chunks are gone)."""
    partial = PartialFolder(out)
    try:
        if partial.readable():
            rows = _PartialRows(partial)
            # the chunks are deleted once the finished file is in place: listed meanwhile, some
            # were gone, and the snapshot would go back in time; the file has them all
            return None if out.is_file() else rows
        # the shards of a torchrun job; a rank that has not started yet adds no rows
        parts = [rows for rows in map(_written_rows, shards_in_progress(out)) if rows is not None]
    except FileNotFoundError:
        return None
    return _JoinedRows(parts) if parts else None


def open_rows(path: str | Path, *, in_progress: bool = False) -> CacheRows:
    """A snapshot of the cache ``path``'s rows (:class:`CacheRows`).

    ``in_progress``: where ``path`` is not written yet because its extraction is still running
    (alone or under torchrun), the rows finished so far. Every chunk of rows is written
    atomically, so a reader sees finished rows only, bit-identical to the cache to come.
    """
    path = Path(path)
    if path.is_file() or not in_progress:
        return _FileRows(path)
    rows = _rows_in_progress(path)
    if rows is not None:
        return rows
    if path.is_file():  # it finished while we looked
        return _FileRows(path)
    raise FeatgenderError(f"{path}: no such cache file, and no extraction is writing it")


@dataclass
class CacheData:
    """Rows of a cache read into memory."""

    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    splits: np.ndarray
    attributes: np.ndarray | None
    attribute_names: list[str]
    attribute_categories: dict
    metadata: dict

    def take(self, keep: np.ndarray) -> CacheData:
        """The rows where ``keep`` is True."""
        return CacheData(
            features=self.features[keep],
            labels=self.labels[keep],
            ids=[image_id for image_id, kept in zip(self.ids, keep, strict=True) if kept],
            splits=self.splits[keep],
            attributes=None if self.attributes is None else self.attributes[keep],
            attribute_names=self.attribute_names,
            attribute_categories=self.attribute_categories,
            metadata=self.metadata,
        )


def read_cache(
    path: str | Path,
    split: str | None = None,
    *,
    dtype: type = np.float32,
    include_failed: bool = False,
    in_progress: bool = False,
) -> CacheData:
    """Read a cache (optionally one split) into memory.

    Rows whose image failed to decode are left out unless ``include_failed``.
    ``in_progress``: read the finished rows of a cache still being extracted (:func:`open_rows`).
    """
    code = None if split is None else split_code(split)
    rows = open_rows(path, in_progress=in_progress)
    wanted = rows.finished if include_failed else rows.valid
    if code is not None:
        wanted = wanted & (rows.splits == code)
    index = np.flatnonzero(wanted)
    return CacheData(
        features=rows.read_held("features", index).astype(dtype, copy=False),
        labels=rows.labels[index],
        ids=rows.read_held("ids", index).tolist(),
        splits=rows.splits[index],
        attributes=rows.read("attributes", index),
        attribute_names=rows.attribute_names,
        attribute_categories=rows.attribute_categories,
        metadata=rows.metadata,
    )


def read_caches(
    paths: Sequence[str | Path] | str | Path,
    split: str | None = None,
    *,
    dtype: type = np.float32,
    include_failed: bool = False,
    in_progress: bool = False,
) -> CacheData:
    """Read one cache, or several caches of the same images side by side.

    Several caches (e.g. two backbones) are joined by image id into one feature matrix; they
    must hold the same images with the same labels and splits (with ``in_progress``, the
    images finished in all of them). Rows whose image failed in any of them are left out
    unless ``include_failed`` (their features are NaN). ``metadata['sources']`` lists each
    cache's metadata.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise FeatgenderError("--cache: give at least one cache file")
    parts = [
        read_cache(path, split, dtype=dtype, include_failed=len(paths) > 1 or include_failed, in_progress=in_progress)
        for path in paths
    ]
    if in_progress and len(parts) > 1:  # extractions still running have finished different rows
        common = set.intersection(*(set(part.ids) for part in parts))
        parts = [part.take(np.array([image_id in common for image_id in part.ids], dtype=bool)) for part in parts]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        if part.ids != first.ids:
            if sorted(part.ids) != sorted(first.ids):
                raise FeatgenderError(f"{path}: holds other images than {paths[0]}; caches are joined by image id")
            position = {image_id: row for row, image_id in enumerate(part.ids)}
            order = np.array([position[image_id] for image_id in first.ids])
            part.features, part.labels, part.splits = part.features[order], part.labels[order], part.splits[order]
        if not (np.array_equal(part.labels, first.labels) and np.array_equal(part.splits, first.splits)):
            raise FeatgenderError(f"{path}: labels or splits differ from {paths[0]} for the same images")
    first.features = np.hstack([part.features for part in parts]) if len(parts) > 1 else first.features
    first.metadata["sources"] = [part.metadata for part in parts]
    return first if include_failed else first.take(np.isfinite(first.features).all(axis=1))


# Rows per block when streaming in a shuffled order: small enough that a 16,384-row chunk
# mixes 64 places of the cache, large enough to be read as one slice.
SHUFFLE_BLOCK_ROWS = 256


def iter_cache_chunks(
    cache: str | Path | CacheRows,
    split: str | None = None,
    rows: int = 16384,
    dtype: type = np.float32,
    shuffle: np.random.Generator | int | None = None,
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of a split, ``rows`` at a time, without loading the whole cache.

    ``cache``: a path or a snapshot from :func:`open_rows` (to stream the same rows of a cache
    still being extracted several times). ``shuffle`` (a seed, or a generator that gives
    another order on each pass): each chunk gathers blocks of 256 consecutive rows from
    random places of the split instead of the next ``rows`` rows, so that every chunk holds
    both classes even when the cache is sorted by label (as class folders are); an SGD fit
    over label-sorted chunks loses ~12 points of accuracy. Memory stays within about
    ``rows`` x D x 4 bytes, plus 12 bytes per image for the row flags and block order.
    """
    cache = cache if isinstance(cache, CacheRows) else open_rows(cache)
    wanted = cache.valid if split is None else cache.valid & (cache.splits == split_code(split))
    block = rows if shuffle is None else min(rows, SHUFFLE_BLOCK_ROWS)
    starts = np.arange(0, len(wanted), block)
    if shuffle is not None:
        starts = np.random.default_rng(shuffle).permutation(starts)
    per_chunk = rows // block
    for first in range(0, len(starts), per_chunk):
        index = [np.flatnonzero(wanted[start : start + block]) + start for start in starts[first : first + per_chunk]]
        index = [part for part in index if len(part)]
        if index:  # no name here holds a chunk while the next one is read
            yield _read_blocks(cache, index, dtype), cache.labels[np.concatenate(index)]


def _read_blocks(cache: CacheRows, index: list[np.ndarray], dtype: type) -> np.ndarray:
    """The features of rows ``index`` (sorted blocks, in this order) as one ``dtype`` array."""
    if len(index) == 1:
        return cache.read_held("features", index[0]).astype(dtype, copy=False)
    features: np.ndarray = np.empty((sum(map(len, index)), int(cache.metadata["feature_dim"])), dtype)
    filled = 0
    for part in index:  # filled in place: one chunk in memory, not two
        features[filled : filled + len(part)] = cache.read_held("features", part)
        filled += len(part)
    return features


def cache_summary(path: str | Path, *, in_progress: bool = True) -> dict:
    """Metadata plus row counts per split and label: what ``featgender info`` prints.

    Of a cache still being extracted, what is known so far (``finished_rows``)."""
    rows = open_rows(path, in_progress=in_progress)
    metadata = dict(rows.metadata)
    metadata["features_shape"] = [len(rows.labels), int(metadata["feature_dim"])]
    if rows.attribute_names:
        metadata["attributes"] = rows.attribute_names
    metadata["splits"] = {
        name: {
            "images": int((rows.splits == code).sum()),
            "male": int(((rows.splits == code) & (rows.labels == 1)).sum()),
        }
        for code, name in enumerate(SPLITS)
    }
    return metadata
