"""Writing caches: the one writer of the schema, the crash-safe, resumable chunk writer, and
the join of a torchrun job's shards.

An extraction writes through :class:`CacheWriter`: every chunk of rows is saved to its own
file in ``<out>.partial/`` with write-to-temp + fsync + rename (:mod:`featgender.files`), so
a kill at any moment loses at most the chunk in flight; rerunning resumes at the first
missing chunk. The HDF5 file is assembled from the chunks into a temporary file that
atomically replaces ``out`` at the end (:func:`write_cache`), so an existing cache is never
half-overwritten. One writer per cache: a second one is refused while the first runs.
:func:`join_shards` writes a torchrun job's ``<out>``: ``features`` as a virtual dataset over
the shards' (no copy), the rest as any cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from featgender.cache.layout import PartialFolder
from featgender.cache.read import read_metadata
from featgender.cache.schema import FORMAT_VERSION, identity_mismatch
from featgender.data import SPLITS, FaceDataset
from featgender.errors import FeatgenderError
from featgender.files import CACHE, atomic_write, check_writable, exclusive

logger = logging.getLogger(__name__)


class CacheWriter:
    """The resumable writer of the cache ``out`` for ``dataset``, described by ``metadata``.

    Used as a context manager, it holds ``out`` for itself (a second writer is refused) and
    finds where to start: ``start`` is the first row not yet written by an earlier,
    interrupted run of the same extraction, ``up_to_date`` says that ``out`` is finished
    already. A cache (finished or partial) of another identity is refused unless
    ``overwrite``. Then :meth:`write` saves (indices, features, errors) batches chunk by
    chunk, and :meth:`finish` assembles the HDF5 file.

    ``chunk_rows`` is the rows per chunk of a new extraction; a resumed one keeps its own.
    """

    def __init__(
        self, out: str | Path, dataset: FaceDataset, metadata: dict, *, chunk_rows: int, overwrite: bool = False
    ):
        self.out = Path(out)
        self.dataset = dataset
        self.metadata = metadata
        self.chunk_rows = chunk_rows
        self.overwrite = overwrite
        self.partial = PartialFolder(self.out)
        self.start = 0
        self.up_to_date = False
        self._held = ExitStack()

    def __enter__(self) -> CacheWriter:
        check_writable(self.out, CACHE)  # even --overwrite replaces a cache, not a model
        self._held.enter_context(exclusive(self.out))  # a second writer would write over this one's files
        try:
            self._open()
        except BaseException:
            self._held.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._held.close()

    def _open(self) -> None:
        if self.out.exists() and not self.overwrite:
            found = read_metadata(self.out)
            mismatch = identity_mismatch(found, self.metadata)
            if mismatch:
                raise FeatgenderError(
                    f"{self.out}: holds a different cache ({', '.join(mismatch)} differ); "
                    "pass --overwrite to replace it or --out to write elsewhere"
                )
            if found.get("complete"):
                self.up_to_date = True
                return
        previous = self.partial.read_meta()
        if previous is not None and identity_mismatch(previous, self.metadata):
            if not self.overwrite:
                raise FeatgenderError(
                    f"{self.partial.folder}: an unfinished extraction of a different cache "
                    f"({', '.join(identity_mismatch(previous, self.metadata))} differ); pass --overwrite to discard it"
                )
            shutil.rmtree(self.partial.folder, ignore_errors=True)
            previous = None
        if previous:
            self.chunk_rows = previous["chunk_rows"]
        self._start_partial()
        self.start = self._done_rows()
        if self.start:
            logger.info("%s: resuming at image %d of %d", self.out, self.start, len(self.dataset))

    def _start_partial(self) -> None:
        """Record the dataset's rows and what is being written, unless a resumed run did."""
        self.partial.folder.mkdir(parents=True, exist_ok=True)
        if not self.partial.rows_path.is_file():
            with (
                atomic_write(self.partial.rows_path, size=row_table_bytes(self.dataset)) as tmp,
                h5py.File(tmp, "w") as h5,
            ):
                write_row_table(h5, self.dataset)
        if self.partial.read_meta() is None:
            with atomic_write(self.partial.meta_path) as tmp:
                tmp.write_text(json.dumps({**self.metadata, "chunk_rows": self.chunk_rows}, indent=1))

    def _done_rows(self) -> int:
        """Rows covered by the unbroken run of finished chunks from row 0."""
        start, total = 0, len(self.dataset)
        while start < total and self.partial.chunk_path(start).is_file():
            start += self.chunk_rows
        return min(start, total)

    def write(self, batches: Iterable[tuple[np.ndarray, np.ndarray, list[str]]]) -> None:
        """Save the rows from ``start`` on, given in order as (indices, features, errors)
        batches, in chunks of ``chunk_rows``, each on a writer thread while the next computes
        (see :meth:`appending`)."""
        with self.appending() as append:
            for indices, features, errors in batches:
                append(indices, features, errors)

    @contextmanager
    def appending(self) -> Iterator[Callable[[np.ndarray, np.ndarray, list[str]], None]]:
        """A function that takes the next (indices, features, errors) batch, in row order: rows
        before ``start`` (written by an earlier run) are skipped, the rest saved in chunks of
        ``chunk_rows`` on a writer thread while the next batch computes. Several writers fed
        by one loop write the layers of one forward pass (``extract --layer A --layer B``).

        At most one chunk is in flight: a slow disk holds the extraction back rather than piling
        chunks up in memory, and a write error (e.g. disk full) stops it at the next chunk."""
        pending = _Pending(self.start)
        total = len(self.dataset)
        in_flight: list[Future] = []

        def append(indices: np.ndarray, features: np.ndarray, errors: list[str]) -> None:
            keep = np.asarray(indices) >= self.start
            if not keep.all():
                features, errors = features[keep], [error for error, kept in zip(errors, keep, strict=True) if kept]
            pending.add(features, errors)
            while pending.rows >= self.chunk_rows or (pending.rows and pending.start + pending.rows == total):
                start, block, block_errors = pending.take(self.chunk_rows)
                if in_flight:
                    in_flight.pop().result()
                in_flight.append(thread.submit(self._write_chunk, start, block, block_errors))

        with ThreadPoolExecutor(max_workers=1) as thread:
            yield append
            if in_flight:
                in_flight.pop().result()

    def _write_chunk(self, start: int, features: np.ndarray, errors: list[str]) -> None:
        with atomic_write(self.partial.chunk_path(start)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, features=features, errors=np.array(errors, dtype=str))

    def finish(self) -> int:
        """Write the finished HDF5 file from the chunks, then remove them; returns the number
        of failed rows."""
        chunks = (
            (self.partial.read_chunk(start, "features"), self.partial.read_chunk(start, "errors"))
            for start in range(0, len(self.dataset), self.chunk_rows)
        )
        failed = write_cache(self.out, self.dataset, chunks, self.metadata)
        shutil.rmtree(self.partial.folder, ignore_errors=True)
        return failed


class _Pending:
    """Rows waiting to fill a chunk: their features and errors, from row ``start`` on."""

    def __init__(self, start: int):
        self.start, self.rows = start, 0
        self.features: list[np.ndarray] = []
        self.errors: list[str] = []

    def add(self, features: np.ndarray, errors: list[str]) -> None:
        self.features.append(features)
        self.errors.extend(errors)
        self.rows += len(features)

    def take(self, count: int) -> tuple[int, np.ndarray, list[str]]:
        """The first ``count`` rows (or all there are) as (first row, features, errors)."""
        block = np.concatenate(self.features) if len(self.features) > 1 else self.features[0]
        take = min(count, self.rows)
        taken = (self.start, block[:take], self.errors[:take])
        self.features = [block[take:]] if self.rows > take else []
        self.errors, self.rows, self.start = self.errors[take:], self.rows - take, self.start + take
        return taken


def write_cache(
    out: str | Path,
    dataset: FaceDataset,
    chunks: Iterable[tuple[np.ndarray, Sequence[str] | np.ndarray]],
    metadata: dict,
) -> int:
    """Write a complete cache file from consecutive (features, errors) row blocks, atomically.

    The one writer of the schema: extraction uses it, and so can anyone with features of
    their own (benchmarks write generated features through it). ``metadata`` needs at least
    ``feature_dim`` and ``dtype``. Returns the number of failed rows (non-empty errors).
    """
    out = Path(out)
    total = len(dataset)
    errors: list[str] = []
    size = total * metadata["feature_dim"] * np.dtype(metadata["dtype"]).itemsize + row_table_bytes(dataset)
    with atomic_write(out, size=size, kind=CACHE) as tmp, h5py.File(tmp, "w") as h5:
        features = h5.create_dataset(
            "features",
            shape=(total, metadata["feature_dim"]),
            dtype=metadata["dtype"],
            chunks=(min(max(total, 1), 1024), metadata["feature_dim"]),
        )
        for chunk_features, chunk_errors in chunks:
            features[len(errors) : len(errors) + len(chunk_features)] = chunk_features
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
    failed = [int(row) for row in np.flatnonzero(~valid)]
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


def join_shards(out: str | Path, dataset, shards: list[Path], metadata: dict) -> None:
    """Write ``out`` for ``dataset`` from its complete shard caches, in order: features as a
    virtual dataset over the shards', the rest as any cache (:func:`featgender.cache_writer.write_rows`).
    Atomic, like every cache write."""
    out = Path(out)
    dim = metadata["feature_dim"]
    layout = h5py.VirtualLayout(shape=(len(dataset), dim), dtype=metadata["dtype"])
    errors: list[str] = []
    for path in shards:
        with h5py.File(path, "r") as shard:
            ids = shard["ids"].asstr()[:].tolist()
            first, rows = len(errors), len(ids)
            if ids != dataset.image_ids[first : first + rows]:  # each rank listed the dataset itself
                raise FeatgenderError(
                    f"{path}: holds other images than rows {first}-{first + rows - 1} of the dataset "
                    "(did it change while the job ran?); remove the shards and rerun"
                )
            reasons = (
                dict(zip(shard["failed/ids"].asstr()[:], shard["failed/reasons"].asstr()[:], strict=True))
                if "failed" in shard
                else {}
            )
            errors += [reasons.get(image_id, "") for image_id in ids]
        # relative to the joined file: the pair can be moved together
        layout[len(errors) - rows : len(errors)] = h5py.VirtualSource(
            os.path.relpath(path, out.parent), "features", shape=(rows, dim)
        )
    if len(errors) != len(dataset):
        raise FeatgenderError(f"{out}: the shards hold {len(errors)} rows for {len(dataset)} images")
    with (
        atomic_write(out, size=row_table_bytes(dataset) + 1024 * len(shards), kind=CACHE) as tmp,
        h5py.File(tmp, "w", libver="latest") as h5,
    ):
        h5.create_virtual_dataset("features", layout, fillvalue=np.nan)
        write_rows(
            h5,
            dataset,
            errors,
            {**metadata, "shards": json.dumps([os.path.relpath(path, out.parent) for path in shards])},
        )
