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
write-to-temp + fsync + rename, so a kill at any moment loses at most the chunk in flight;
rerunning resumes at the first missing chunk. The HDF5 file is assembled from the chunks
into a temporary file that atomically replaces ``out`` at the end, so an existing cache is
never half-overwritten.
"""

from __future__ import annotations

import json
import logging
import os
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


def _fsync_replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)


class _PartialCache:
    """The ``<out>.partial/`` folder: metadata plus one ``.npz`` file per finished chunk."""

    def __init__(self, out: Path):
        self.folder = out.with_name(out.name + ".partial")

    def chunk_path(self, start: int) -> Path:
        return self.folder / f"rows-{start:010d}.npz"

    def read_meta(self) -> dict | None:
        meta_file = self.folder / "meta.json"
        return json.loads(meta_file.read_text()) if meta_file.is_file() else None

    def start(self, meta: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        _fsync_replace(tmp, self.folder / "meta.json")

    def done_rows(self, chunk_rows: int, total: int) -> int:
        """Rows covered by the unbroken run of finished chunks from row 0."""
        start = 0
        while start < total and self.chunk_path(start).is_file():
            start += chunk_rows
        return min(start, total)

    def write_chunk(self, start: int, features: np.ndarray, errors: list[str]) -> None:
        tmp = self.folder / f"rows-{start:010d}.tmp.npz"
        np.savez(tmp, features=features, errors=np.array(errors, dtype=str))
        _fsync_replace(tmp, self.chunk_path(start))

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
    """
    from featgender.extract import default_batch_size, iter_features, resolve_device, resolve_precision

    out = Path(out)
    device = resolve_device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    precision = resolve_precision(precision, device)
    meta = cache_metadata(dataset, backbone, precision, dtype, limit, seed, flip)
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
    if previous is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.start({**meta, "chunk_rows": chunk_rows})
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
    tmp = out.with_name(out.name + ".tmp")
    total = len(dataset)
    errors = []
    with h5py.File(tmp, "w") as h5:
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
    _fsync_replace(tmp, out)
    return failed_count


def write_rows(h5: h5py.File, dataset: FaceDataset, errors: Sequence[str], metadata: dict) -> int:
    """Everything of the schema but ``features``: the dataset's rows, which failed and why
    (``errors``, one per row, '' where the image was embedded), and the root attributes.
    Marks the file complete; returns the number of failed rows."""
    valid = np.array([not error for error in errors], dtype=bool)
    failed = np.flatnonzero(~valid)
    h5.create_dataset("labels", data=dataset.labels.astype(np.int8))
    split = h5.create_dataset("split", data=dataset.splits.astype(np.int8))
    split.attrs["names"] = list(SPLITS)
    h5.create_dataset("ids", data=dataset.image_ids, dtype=h5py.string_dtype())
    h5.create_dataset("valid", data=valid)
    if dataset.attributes is not None:
        attributes = h5.create_dataset("attributes", data=dataset.attributes.astype(np.int32))
        attributes.attrs["names"] = dataset.attribute_names
        attributes.attrs["categories"] = json.dumps(dataset.attribute_categories)
    if len(failed):
        h5.create_dataset("failed/ids", data=[dataset.image_ids[row] for row in failed], dtype=h5py.string_dtype())
        h5.create_dataset("failed/reasons", data=[errors[row] for row in failed], dtype=h5py.string_dtype())
    h5.attrs.update({"format_version": FORMAT_VERSION, "num_images": len(dataset), **metadata})
    h5.attrs["failed_count"] = len(failed)
    h5.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    h5.attrs["complete"] = True
    return len(failed)


# --- reading ---------------------------------------------------------------------------


def read_metadata(path: str | Path, *, check_shards: bool = True) -> dict:
    """Root attributes of a cache, as plain Python values.

    A cache joined from torchrun shards is refused when a shard is missing, unless not
    ``check_shards``."""
    path = Path(path)
    if not path.is_file():
        raise FeatgenderError(f"{path}: no such cache file")
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


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


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


def read_cache(path: str | Path, split: str | None = None, *, dtype: type = np.float32,
               include_failed: bool = False) -> CacheData:
    """Read a finished cache (optionally one split) into memory.

    Rows whose image failed to decode are left out unless ``include_failed``.
    """
    path = Path(path)
    metadata = read_metadata(path)
    if metadata.get("format_version") != FORMAT_VERSION or not metadata.get("complete"):
        raise FeatgenderError(f"{path}: not a complete featgender cache (format {FORMAT_VERSION})")
    if split is not None and split not in SPLITS:
        raise FeatgenderError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    with h5py.File(path, "r") as h5:
        splits = h5["split"][:]
        rows = np.ones(len(splits), dtype=bool) if split is None else splits == SPLITS.index(split)
        if not include_failed:
            rows &= h5["valid"][:]
        index = np.flatnonzero(rows)
        features = _read_rows(h5["features"], index)
        attributes = None
        names, categories = [], {}
        if "attributes" in h5:
            attributes = h5["attributes"][:][index]
            names = [str(name) for name in h5["attributes"].attrs["names"]]
            categories = json.loads(h5["attributes"].attrs["categories"])
        ids = h5["ids"].asstr()[:]
        return CacheData(
            features=features.astype(dtype, copy=False),
            labels=h5["labels"][:][index],
            ids=[ids[i] for i in index],
            splits=splits[index],
            attributes=attributes,
            attribute_names=names,
            attribute_categories=categories,
            metadata=metadata,
        )


def read_caches(paths: list[str | Path] | str | Path, split: str | None = None, *,
                dtype: type = np.float32, include_failed: bool = False) -> CacheData:
    """Read one cache, or several caches of the same images side by side.

    Several caches (e.g. two backbones) are joined by image id into one feature matrix; they
    must hold the same images with the same labels and splits. Rows whose image failed in
    any of them are left out unless ``include_failed`` (their features are NaN).
    ``metadata['sources']`` lists each cache's metadata.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise FeatgenderError("--cache: give at least one cache file")
    parts = [read_cache(path, split, dtype=dtype, include_failed=len(paths) > 1 or include_failed) for path in paths]
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
    features = np.hstack([part.features for part in parts]) if len(parts) > 1 else first.features
    keep = np.ones(len(features), dtype=bool) if include_failed else np.isfinite(features).all(axis=1)
    first.metadata["sources"] = [part.metadata for part in parts]
    return CacheData(
        features=features[keep],
        labels=first.labels[keep],
        ids=[image_id for image_id, kept in zip(first.ids, keep) if kept],
        splits=first.splits[keep],
        attributes=None if first.attributes is None else first.attributes[keep],
        attribute_names=first.attribute_names,
        attribute_categories=first.attribute_categories,
        metadata=first.metadata,
    )


def iter_cache_chunks(path: str | Path, split: str | None = None, rows: int = 16384,
                      dtype: type = np.float32) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of a split, ``rows`` at a time, without loading the whole cache.

    Memory stays within about ``rows`` x D x 4 bytes, plus one int8 and one bool per image.
    """
    path = Path(path)
    read_metadata(path)
    with h5py.File(path, "r") as h5:
        wanted = h5["valid"][:]
        if split is not None:
            wanted &= h5["split"][:] == SPLITS.index(split)
        for start in range(0, len(wanted), rows):
            mask = wanted[start:start + rows]
            if mask.any():
                features = h5["features"][start:start + len(mask)][mask].astype(dtype, copy=False)
                yield features, h5["labels"][start:start + len(mask)][mask]


def _read_rows(dataset: h5py.Dataset, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` (sorted) of an HDF5 dataset; one slice read when they are contiguous."""
    if len(index) and index[-1] - index[0] + 1 == len(index):
        return dataset[index[0]:index[-1] + 1]
    return dataset[:][index]


def cache_summary(path: str | Path) -> dict:
    """Metadata plus row counts per split and label: what ``featgender info`` prints."""
    metadata = read_metadata(path)
    with h5py.File(path, "r") as h5:
        splits = h5["split"][:]
        labels = h5["labels"][:]
        counts = {
            name: {"images": int((splits == code).sum()), "male": int(((splits == code) & (labels == 1)).sum())}
            for code, name in enumerate(SPLITS)
        }
        metadata["features_shape"] = list(h5["features"].shape)
        if "attributes" in h5:
            metadata["attributes"] = [str(name) for name in h5["attributes"].attrs["names"]]
    metadata["splits"] = counts
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
