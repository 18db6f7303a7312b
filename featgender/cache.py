"""The HDF5 feature cache: schema, crash-safe resumable writing, and reading.

Schema of a finished cache (plain HDF5; ``h5py`` or ``h5dump`` read it with no featgender code):

=================  ==========================  ==========================================
dataset            shape, dtype                meaning
=================  ==========================  ==========================================
``features``       (N, D) float16 or float32   one embedding per image, chunked by rows;
                                               NaN rows for images that failed to decode
``labels``         (N,) int8                   1 = male, 0 = female
``split``          (N,) int8                   index into the attribute ``names``
                                               (train, valid, test)
``ids``            (N,) utf-8 strings          image names relative to the dataset root
``valid``          (N,) bool                   False where the image failed to decode
``attributes``     (N, K) int32, optional      CelebA's 40 attributes (0/1) or a CSV's extra
                                               columns; attrs ``names`` and ``categories``
                                               (JSON: codes of categorical columns)
``failed/ids``     (F,) strings, optional      images that failed, with ``failed/reasons``
=================  ==========================  ==========================================

Root attributes: ``format_version``, ``complete``, ``backbone``, ``layer``, ``feature_dim``,
``weights``, ``weights_sha256``, ``weights_path``, ``preprocessing`` (JSON), ``flip``, ``precision``,
``dtype``, ``dataset_root``,
``dataset_format``, ``dataset_fingerprint``, ``split_source``, ``limit``, ``seed``,
``versions`` (JSON), ``created``.

Writing goes through ``<out>.partial/``: every chunk of rows is saved to its own file with
write-to-temp + fsync + rename (:mod:`featgender.files`), so a kill at any moment loses at
most the chunk in flight; rerunning resumes at the first missing chunk. The HDF5 file is
assembled from the chunks into a temporary file that atomically replaces ``out`` at the end,
so an existing cache is never half-overwritten.

Reading while writing (what HDF5's SWMR mode offers, without its single-file constraints):
``<out>.partial/rows.h5`` holds the dataset's rows from the start, so :func:`open_rows` with
``in_progress=True`` sees the finished chunks, alone or across a torchrun job's shards.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from featgender.backbones import Backbone
from featgender.data import SPLITS, FaceDataset
from featgender.errors import FeatgenderError
from featgender.files import atomic_write, exclusive

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path("cache")
# Identity fields: a cache, or a partial one, is reused only when all of these match.
IDENTITY_KEYS = ("backbone", "layer", "weights", "weights_sha256", "preprocessing", "flip", "precision", "dtype",
                 "dataset_fingerprint")


def default_cache_path(dataset: FaceDataset, backbone: str, limit: int | None = None,
                       cache_dir: str | Path = DEFAULT_CACHE_DIR, flip: bool = False) -> Path:
    """``cache/<dataset>-<backbone>[-limit<N>][-flip].h5``."""
    suffix = (f"-limit{limit}" if limit else "") + ("-flip" if flip else "")
    return Path(cache_dir) / f"{dataset.name}-{backbone}{suffix}.h5"


def library_versions() -> dict:
    """Versions of featgender and the libraries whose output it stores."""
    import sklearn
    import torch
    import torchvision

    from featgender import __version__

    versions = {
        "featgender": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "scikit-learn": sklearn.__version__,
    }
    return {name: str(version) for name, version in versions.items()}  # TorchVersion is no plain str


def cache_metadata(dataset: FaceDataset, backbone: Backbone, precision: str, dtype: str,
                   limit: int | None, seed: int, flip: bool = False) -> dict:
    """The root attributes a cache of ``dataset`` embedded by ``backbone`` carries."""
    config = backbone.config
    return {
        "format_version": FORMAT_VERSION,
        "backbone": config.name,
        "layer": config.layer,
        "feature_dim": int(config.feature_dim),
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


def _identity_mismatch(found: dict, wanted: dict) -> list[str]:
    return [key for key in IDENTITY_KEYS if str(found.get(key)) != str(wanted.get(key))]


# --- writing ---------------------------------------------------------------------------


class _PartialCache:
    """The ``<out>.partial/`` folder of an extraction in progress: ``meta.json`` (what is being
    written), ``rows.h5`` (the dataset's rows: the schema less ``features``, for readers) and
    one ``.npz`` file per finished chunk of rows."""

    def __init__(self, out: Path):
        self.out = out
        self.folder = out.with_name(out.name + ".partial")
        self.rows_path = self.folder / "rows.h5"

    def chunk_path(self, start: int) -> Path:
        return self.folder / f"rows-{start:010d}.npz"

    def chunk_starts(self) -> list[int]:
        """First rows of the finished chunks, sorted."""
        return sorted(int(path.stem[len("rows-"):]) for path in self.folder.glob("rows-" + "[0-9]" * 10 + ".npz"))

    def read_meta(self) -> dict | None:
        meta_file = self.folder / "meta.json"
        return json.loads(meta_file.read_text()) if meta_file.is_file() else None

    def readable(self) -> bool:
        """Whether readers can see this extraction's finished rows (it has started)."""
        return self.rows_path.is_file() and (self.folder / "meta.json").is_file()

    def start(self, meta: dict, dataset: FaceDataset) -> None:
        """Record the dataset's rows and what is being written, unless a resumed run did."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.rows_path.is_file():
            with atomic_write(self.rows_path, size=row_table_bytes(dataset)) as tmp, h5py.File(tmp, "w") as h5:
                write_row_table(h5, dataset)
        if self.read_meta() is None:
            with atomic_write(self.folder / "meta.json") as tmp:
                tmp.write_text(json.dumps(meta, indent=1))

    def done_rows(self, chunk_rows: int, total: int) -> int:
        """Rows covered by the unbroken run of finished chunks from row 0."""
        start = 0
        while start < total and self.chunk_path(start).is_file():
            start += chunk_rows
        return min(start, total)

    def write_chunk(self, start: int, features: np.ndarray, errors: list[str]) -> None:
        with atomic_write(self.chunk_path(start)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, features=features, errors=np.array(errors, dtype=str))

    def read_chunk(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.chunk_path(start), allow_pickle=False) as chunk:
            return chunk["features"], chunk["errors"]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class CacheResult:
    """What :func:`build_cache` did."""

    path: Path
    status: str  # 'created', 'resumed' or 'up to date'
    num_images: int
    num_failed: int
    resumed_from: int = 0


def build_cache(
    dataset: FaceDataset,
    backbone: Backbone,
    out: str | Path,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    workers: int | None = None,
    dtype: str = "float16",
    precision: str = "auto",
    flip: bool = False,
    chunk_rows: int = 1024,
    overwrite: bool = False,
    strict: bool = False,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> CacheResult:
    """Embed every image of ``dataset`` once into the HDF5 cache ``out``; resume if interrupted.

    A finished cache with the same identity (backbone, weights, preprocessing, dtype, dataset
    rows) is left as it is; one with another identity is refused unless ``overwrite``.
    ``batch_size``, ``workers`` and ``precision`` default to what suits the device (see
    :mod:`featgender.extract`); ``flip`` averages each embedding with the mirrored image's.
    Progress is saved every ``chunk_rows`` images (rounded up to
    whole batches, so that a resumed run feeds the network the very same batches).
    Unreadable images are recorded in the cache (``failed/``) and skipped; with ``strict``
    the first one stops the extraction (resumable once the file is fixed or removed).
    A second extraction of the same ``out`` while this one runs is refused.
    """
    from featgender.extract import default_batch_size, iter_features, resolve_device, resolve_precision

    out = Path(out)
    device = resolve_device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    precision = resolve_precision(precision, device)
    meta = cache_metadata(dataset, backbone, precision, dtype, limit, seed, flip)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):  # a second extraction of the same cache would write over this one's files
        if out.exists() and not overwrite:
            found = read_metadata(out)
            mismatch = _identity_mismatch(found, meta)
            if mismatch:
                raise FeatgenderError(
                    f"{out}: holds a different cache ({', '.join(mismatch)} differ); "
                    "pass --overwrite to replace it or --out to write elsewhere"
                )
            if found.get("complete"):
                return CacheResult(out, "up to date", int(found["num_images"]), int(found.get("failed_count", 0)))
        partial = _PartialCache(out)
        previous = partial.read_meta()
        if previous is not None and _identity_mismatch(previous, meta):
            if not overwrite:
                raise FeatgenderError(
                    f"{partial.folder}: an unfinished extraction of a different cache "
                    f"({', '.join(_identity_mismatch(previous, meta))} differ); pass --overwrite to discard it"
                )
            partial.remove()
            previous = None
        chunk_rows = previous["chunk_rows"] if previous else batch_size * -(-chunk_rows // max(batch_size, 1))
        partial.start({**meta, "chunk_rows": chunk_rows}, dataset)
        start = partial.done_rows(chunk_rows, len(dataset))
        if start:
            logger.info("%s: resuming at image %d of %d", out, start, len(dataset))
        batches = iter_features(backbone, dataset.paths, start=start, batch_size=batch_size, device=device,
                                workers=workers, dtype=dtype, precision=precision, flip=flip, progress=progress)
        _write_chunks(
            partial,
            _stop_at_first_error(batches, dataset.paths) if strict else batches,
            start,
            chunk_rows,
            len(dataset),
        )
        num_failed = _assemble(partial, dataset, meta, chunk_rows, out)
        partial.remove()
        return CacheResult(out, "resumed" if start else "created", len(dataset), num_failed, start)


def _stop_at_first_error(batches: Iterable, paths: Sequence[Path]) -> Iterable:
    for indices, features, errors in batches:
        for index, error in zip(indices, errors):
            if error:
                raise FeatgenderError(f"{paths[index]}: {error} (--strict: unreadable images are fatal)")
        yield indices, features, errors


def _write_chunks(partial: _PartialCache, batches: Iterable, start: int, chunk_rows: int, total: int) -> None:
    """Group batches into chunks of ``chunk_rows`` and save each on a writer thread."""
    features, errors, rows, chunk_start = [], [], 0, start
    pending = []
    with ThreadPoolExecutor(max_workers=1) as writer:  # overlaps disk writes with compute
        for _, batch_features, batch_errors in batches:
            features.append(batch_features)
            errors.extend(batch_errors)
            rows += len(batch_features)
            while rows >= chunk_rows or (rows and chunk_start + rows == total):
                block = np.concatenate(features) if len(features) > 1 else features[0]
                take = min(chunk_rows, rows)
                pending.append(writer.submit(partial.write_chunk, chunk_start, block[:take], errors[:take]))
                features = [block[take:]] if rows > take else []
                errors, rows, chunk_start = errors[take:], rows - take, chunk_start + take
            for future in [f for f in pending if f.done()]:
                future.result()  # re-raise a write error (e.g. disk full) without waiting for the end
                pending.remove(future)
        for future in pending:
            future.result()


def _assemble(partial: _PartialCache, dataset: FaceDataset, meta: dict, chunk_rows: int, out: Path) -> int:
    """Write the finished HDF5 file from the chunk files."""
    chunks = (partial.read_chunk(start) for start in range(0, len(dataset), chunk_rows))
    return write_cache(out, dataset, chunks, meta)


def write_cache(out: str | Path, dataset: FaceDataset, chunks: Iterable[tuple[np.ndarray, Sequence[str]]],
                metadata: dict) -> int:
    """Write a complete cache file from consecutive (features, errors) row blocks, atomically.

    The one writer of the schema: extraction uses it, and so can anyone with features of
    their own (benchmarks write generated features through it). ``metadata`` needs at least
    ``feature_dim`` and ``dtype``. Returns the number of failed rows (non-empty errors).
    """
    out = Path(out)
    total = len(dataset)
    errors = []
    size = total * metadata["feature_dim"] * np.dtype(metadata["dtype"]).itemsize + row_table_bytes(dataset)
    with atomic_write(out, size=size) as tmp, h5py.File(tmp, "w") as h5:
        features = h5.create_dataset(
            "features", shape=(total, metadata["feature_dim"]), dtype=metadata["dtype"],
            chunks=(min(max(total, 1), 1024), metadata["feature_dim"]),
        )
        for chunk_features, chunk_errors in chunks:
            features[len(errors):len(errors) + len(chunk_features)] = chunk_features
            errors.extend(str(error) for error in chunk_errors)
        if len(errors) != total:
            raise FeatgenderError(f"{out}: {len(errors)} feature rows written for {total} images")
        failed_count = write_rows(h5, dataset, errors, metadata)
    return failed_count


def write_rows(h5: h5py.File, dataset: FaceDataset, errors: Sequence[str], metadata: dict) -> int:
    """Everything of the schema but ``features``: the dataset's rows, which failed and why
    (``errors``, one per row, '' where the image was embedded), and the root attributes.
    Marks the file complete; returns the number of failed rows."""
    valid = np.array([not error for error in errors], dtype=bool)
    failed = np.flatnonzero(~valid)
    write_row_table(h5, dataset)
    h5.create_dataset("valid", data=valid)
    if len(failed):
        h5.create_dataset("failed/ids", data=[dataset.image_ids[row] for row in failed], dtype=h5py.string_dtype())
        h5.create_dataset("failed/reasons", data=[errors[row] for row in failed], dtype=h5py.string_dtype())
    h5.attrs.update({"format_version": FORMAT_VERSION, "num_images": len(dataset), **metadata})
    h5.attrs["failed_count"] = len(failed)
    h5.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    h5.attrs["complete"] = True
    return len(failed)


def row_table_bytes(dataset: FaceDataset) -> int:
    """An upper bound of the bytes :func:`write_row_table` and the root attributes take on disk
    (variable-length strings cost about 64 bytes each beyond their text)."""
    columns = 0 if dataset.attributes is None else dataset.attributes.shape[1]
    text = sum(len(image_id.encode()) + 64 for image_id in dataset.image_ids)
    return len(dataset) * (3 + 4 * columns) + text + 2**16


def write_row_table(h5: h5py.File, dataset: FaceDataset) -> None:
    """What the schema holds of the dataset itself: ``labels``, ``split``, ``ids``, ``attributes``."""
    h5.create_dataset("labels", data=dataset.labels.astype(np.int8))
    split = h5.create_dataset("split", data=dataset.splits.astype(np.int8))
    split.attrs["names"] = list(SPLITS)
    h5.create_dataset("ids", data=dataset.image_ids, dtype=h5py.string_dtype())
    if dataset.attributes is not None:
        attributes = h5.create_dataset("attributes", data=dataset.attributes.astype(np.int32))
        attributes.attrs["names"] = dataset.attribute_names
        attributes.attrs["categories"] = json.dumps(dataset.attribute_categories)


# --- reading ---------------------------------------------------------------------------


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
        from featgender.distributed import missing_shards

        missing = missing_shards(path, metadata)
        if missing:
            raise FeatgenderError(f"{path}: its shard {missing[0]} is missing ({len(missing)} of "
                                  f"{len(json.loads(metadata['shards']))}); keep {path.name}.shards/ beside it")
    return metadata


def _missing_cache_message(path: Path) -> str:
    rows = _rows_in_progress(path)
    if rows is None:
        return f"{path}: no such cache file"
    return (f"{path}: still being extracted ({rows.metadata['finished_rows']} of {rows.metadata['num_images']} "
            "images done); pass --in-progress to read the finished ones")


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
        span = data[index[0]:index[-1] + 1]
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

    def __init__(self, partial: _PartialCache):
        self.partial = partial
        meta = partial.read_meta()
        with h5py.File(partial.rows_path, "r") as h5:
            self.labels, self.splits = h5["labels"][:], h5["split"][:]
            self._set_attribute_info(h5)
        self.starts = np.array(partial.chunk_starts(), dtype=np.int64)
        self.finished = np.zeros(len(self.labels), dtype=bool)
        self.valid = np.zeros(len(self.labels), dtype=bool)
        for start in self.starts:
            errors = self._chunk(start, "errors")
            self.finished[start:start + len(errors)] = True
            self.valid[start:start + len(errors)] = errors == ""
        self.metadata = {**meta, "complete": False, "num_images": len(self.labels),
                         "finished_rows": int(self.finished.sum())}

    def _chunk(self, start: int, column: str) -> np.ndarray:
        with np.load(self.partial.chunk_path(start), allow_pickle=False) as chunk:
            return chunk[column]

    def read(self, column: str, index: np.ndarray) -> np.ndarray | None:
        try:
            if column != "features":
                return _read_h5_rows(self.partial.rows_path, column, index)
            chunk = np.searchsorted(self.starts, index, side="right") - 1
            parts = [self._chunk(self.starts[c], "features")[index[chunk == c] - self.starts[c]]
                     for c in np.unique(chunk)]
            if not parts:
                return np.empty((0, self.metadata["feature_dim"]), dtype=self.metadata["dtype"])
            return np.concatenate(parts)
        except FileNotFoundError:  # finished meanwhile: the chunks are gone, the cache is there
            finished = _FileRows(self.partial.out)
            if _identity_mismatch(finished.metadata, self.metadata):
                raise FeatgenderError(f"{self.partial.out}: replaced by another extraction while being read; "
                                      "read it again") from None
            return finished.read(column, index)


class _JoinedRows(CacheRows):
    """Consecutive row blocks read as one: the shards of a torchrun extraction in progress."""

    def __init__(self, parts: list[CacheRows]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(part.labels) for part in parts])
        for name in ("labels", "splits", "finished", "valid"):
            setattr(self, name, np.concatenate([getattr(part, name) for part in parts]))
        self.attribute_names, self.attribute_categories = parts[0].attribute_names, parts[0].attribute_categories
        self.metadata = {**parts[0].metadata, "complete": False, "num_images": int(self.offsets[-1]),
                         "finished_rows": int(self.finished.sum())}

    def read(self, column: str, index: np.ndarray) -> np.ndarray | None:
        pieces = [part.read(column, index[(index >= low) & (index < high)] - low)
                  for part, low, high in zip(self.parts, self.offsets[:-1], self.offsets[1:])]
        return None if pieces[0] is None else np.concatenate(pieces)


def _written_rows(path: Path) -> CacheRows | None:
    """What is written at ``path``: the finished cache, the finished chunks of the extraction
    writing it, or None."""
    if path.is_file():
        return _FileRows(path)
    partial = _PartialCache(path)
    rows = _PartialRows(partial) if partial.readable() else None
    return _FileRows(path) if path.is_file() else rows  # see _rows_in_progress


def _rows_in_progress(out: Path) -> CacheRows | None:
    """The finished rows of the extraction writing ``out``, alone or by torchrun; None if none
    is, or if it finished while we looked (its chunks are gone)."""
    from featgender.distributed import shards_in_progress

    partial = _PartialCache(out)
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
            ids=[image_id for image_id, kept in zip(self.ids, keep) if kept],
            splits=self.splits[keep],
            attributes=None if self.attributes is None else self.attributes[keep],
            attribute_names=self.attribute_names,
            attribute_categories=self.attribute_categories,
            metadata=self.metadata,
        )


def read_cache(path: str | Path, split: str | None = None, *, dtype: type = np.float32,
               include_failed: bool = False, in_progress: bool = False) -> CacheData:
    """Read a cache (optionally one split) into memory.

    Rows whose image failed to decode are left out unless ``include_failed``.
    ``in_progress``: read the finished rows of a cache still being extracted (:func:`open_rows`).
    """
    if split is not None and split not in SPLITS:
        raise FeatgenderError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    rows = open_rows(path, in_progress=in_progress)
    wanted = rows.finished if include_failed else rows.valid
    if split is not None:
        wanted = wanted & (rows.splits == SPLITS.index(split))
    index = np.flatnonzero(wanted)
    return CacheData(
        features=rows.read("features", index).astype(dtype, copy=False),
        labels=rows.labels[index],
        ids=rows.read("ids", index).tolist(),
        splits=rows.splits[index],
        attributes=rows.read("attributes", index),
        attribute_names=rows.attribute_names,
        attribute_categories=rows.attribute_categories,
        metadata=rows.metadata,
    )


def read_caches(paths: list[str | Path] | str | Path, split: str | None = None, *,
                dtype: type = np.float32, include_failed: bool = False, in_progress: bool = False) -> CacheData:
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
    parts = [read_cache(path, split, dtype=dtype, include_failed=len(paths) > 1 or include_failed,
                        in_progress=in_progress) for path in paths]
    if in_progress and len(parts) > 1:  # extractions still running have finished different rows
        common = set.intersection(*(set(part.ids) for part in parts))
        parts = [part.take(np.array([image_id in common for image_id in part.ids], dtype=bool)) for part in parts]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
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


def iter_cache_chunks(cache: str | Path | CacheRows, split: str | None = None, rows: int = 16384,
                      dtype: type = np.float32, shuffle: np.random.Generator | int | None = None,
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
    wanted = cache.valid if split is None else cache.valid & (cache.splits == SPLITS.index(split))
    block = rows if shuffle is None else min(rows, SHUFFLE_BLOCK_ROWS)
    starts = np.arange(0, len(wanted), block)
    if shuffle is not None:
        starts = np.random.default_rng(shuffle).permutation(starts)
    per_chunk = rows // block
    for first in range(0, len(starts), per_chunk):
        index = [np.flatnonzero(wanted[start:start + block]) + start for start in starts[first:first + per_chunk]]
        index = [part for part in index if len(part)]
        if index:  # no name here holds a chunk while the next one is read
            yield _read_blocks(cache, index, dtype), cache.labels[np.concatenate(index)]


def _read_blocks(cache: CacheRows, index: list[np.ndarray], dtype: type) -> np.ndarray:
    """The features of rows ``index`` (sorted blocks, in this order) as one ``dtype`` array."""
    if len(index) == 1:
        return cache.read("features", index[0]).astype(dtype, copy=False)
    features = np.empty((sum(map(len, index)), int(cache.metadata["feature_dim"])), dtype)
    filled = 0
    for part in index:  # filled in place: one chunk in memory, not two
        features[filled:filled + len(part)] = cache.read("features", part)
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
        name: {"images": int((rows.splits == code).sum()), "male": int(((rows.splits == code) & (rows.labels == 1)).sum())}
        for code, name in enumerate(SPLITS)
    }
    return metadata


def extract_to_cache(
    data: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str = "default",
    layer: str | None = None,
    out: str | Path | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    format: str = "auto",
    limit: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    face_box: str | tuple = "auto",
    faces: str = "crop",
    **options,
) -> CacheResult:
    """Read a dataset, build a backbone and embed the dataset into a cache: ``featgender extract``.

    ``face_box`` matters to face-aligning backbones (dlib_resnet) only: 'auto' finds where
    the face sits in the dataset's aligned crops (:func:`featgender.faces.calibrate_face_box`)
    and skips detection when it sits still, 'detect' detects in every image, or a relative
    (left, top, right, bottom) box. ``options`` go to :func:`build_cache` (batch_size,
    device, workers, dtype, overwrite, ...). ``faces='photo'``: the images are photos; each
    goes through the face step (largest face found and cut), and one without a face is
    recorded as failed ('no face found') and left out of training and metrics.

    Examples
    --------
    >>> result = extract_to_cache("../shared/faces/utkface", limit=200)  # doctest: +SKIP
    >>> result.path  # doctest: +SKIP
    PosixPath('cache/utkface-efficientnet_lite0-limit200.h5')
    """
    from featgender.backbones import build_backbone
    from featgender.data import load_dataset

    dataset = load_dataset(data, format=format, limit=limit, seed=seed,
                           image_column=image_column, label_column=label_column)
    if faces not in ("crop", "photo"):
        raise FeatgenderError(f"--faces {faces!r}: choose crop or photo")
    if faces == "photo":
        built = build_backbone(backbone, weights=weights, layer=layer, find_faces=True)
    else:
        built = build_backbone(backbone, weights=weights, layer=layer,
                               face_box=_resolve_face_box(face_box, backbone, dataset))
    if out is None:
        out = default_cache_path(dataset, backbone, limit, cache_dir, options.get("flip", False))
    from featgender.distributed import current_rank, extract_sharded

    rank = current_rank()
    if rank is not None:  # under torchrun: this rank's shard, then the joined cache
        return extract_sharded(dataset, built, Path(out), rank, limit=limit, seed=seed, **options)
    return build_cache(dataset, built, Path(out), limit=limit, seed=seed, **options)


def _resolve_face_box(face_box: str | tuple, backbone: str, dataset: FaceDataset) -> tuple | None:
    """The ``face_box`` for :func:`build_backbone`: None for detection (or a backbone that does
    not align faces), the given box, or the dataset's calibrated one."""
    from featgender.backbones import get_config

    if face_box == "detect":
        return None
    if isinstance(face_box, str) and face_box != "auto":
        try:
            face_box = tuple(float(value) for value in face_box.split(","))
        except ValueError:
            raise FeatgenderError(f"--face-box {face_box!r}: want auto, detect or left,top,right,bottom") from None
    if face_box != "auto":
        return face_box
    if not get_config(backbone).alignment:
        return None
    from featgender.faces import calibrate_face_box

    box = calibrate_face_box(dataset.paths)
    logger.info("%s: %s", backbone, f"faces sit at {box} in {dataset.name}: no detection" if box else "faces move: detecting")
    return box
