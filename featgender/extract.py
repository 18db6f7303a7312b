"""``featgender extract``: dataset → backbone → face box → one process or torchrun → cache.

The stage above :mod:`featgender.embed` (images in, arrays out, no files) and
:mod:`featgender.cache.write` (rows in, files out): :func:`extract_to_cache` is ``featgender
extract``; :func:`build_cache` embeds a dataset with a built backbone in this process and
hands the rows to the resumable writer; under torchrun each rank builds its shard that way
and rank 0 joins them (:mod:`featgender.distributed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featgender.backbones import Backbone, build_backbone, get_config, with_face_box
from featgender.cache import (
    DEFAULT_CACHE_DIR,
    CacheWriter,
    cache_metadata,
    default_cache_path,
    identity_mismatch,
    join_shards,
    read_metadata,
    shard_path,
)
from featgender.data import FaceDataset, load_dataset
from featgender.defaults import DEFAULT_BACKBONE
from featgender.distributed import Rank, current_rank, process_group, shard_rows
from featgender.embed import default_batch_size, iter_features, resolve_device, resolve_precision
from featgender.errors import FeatgenderError
from featgender.files import exclusive

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


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
    device: str | torch.device = "auto",
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
    :mod:`featgender.embed`); ``flip`` averages each embedding with the mirrored image's.
    Progress is saved every ``chunk_rows`` images (rounded up to
    whole batches, so that a resumed run feeds the network the very same batches).
    Unreadable images are recorded in the cache (``failed/``) and skipped; with ``strict``
    the first one stops the extraction (resumable once the file is fixed or removed).
    A second extraction of the same ``out`` while this one runs is refused.
    """
    out = Path(out)
    device = resolve_device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    precision = resolve_precision(precision, device)
    metadata = cache_metadata(dataset, backbone, precision, dtype, limit, seed, flip)
    whole_batches = batch_size * -(-chunk_rows // max(batch_size, 1))
    with CacheWriter(out, dataset, metadata, chunk_rows=whole_batches, overwrite=overwrite) as writer:
        if writer.up_to_date:
            found = read_metadata(out)
            return CacheResult(out, "up to date", int(found["num_images"]), int(found.get("failed_count", 0)))
        batches = iter_features(
            backbone,
            dataset.paths,
            start=writer.start,
            batch_size=batch_size,
            device=device,
            workers=workers,
            dtype=dtype,
            precision=precision,
            flip=flip,
            progress=progress,
        )
        writer.write(_stop_at_first_error(batches, dataset.paths) if strict else batches)
        num_failed = writer.finish()
    return CacheResult(out, "resumed" if writer.start else "created", len(dataset), num_failed, writer.start)


def _stop_at_first_error(batches: Iterable, paths: Sequence[Path]) -> Iterable:
    for indices, features, errors in batches:
        for index, error in zip(indices, errors, strict=True):
            if error:
                raise FeatgenderError(f"{paths[index]}: {error} (--strict: unreadable images are fatal)")
        yield indices, features, errors


def extract_to_cache(
    data: str | Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
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
    dataset = load_dataset(
        data, format=format, limit=limit, seed=seed, image_column=image_column, label_column=label_column
    )
    if faces not in ("crop", "photo"):
        raise FeatgenderError(f"--faces {faces!r}: choose crop or photo")
    if faces == "photo":
        built = build_backbone(backbone, weights=weights, layer=layer, find_faces=True)
    else:
        built = build_backbone(
            backbone,
            weights=weights,
            layer=layer,
            face_box=resolve_face_box(face_box, backbone, dataset.paths, dataset.name),
        )
    if out is None:
        out = default_cache_path(dataset, backbone, limit, cache_dir, options.get("flip", False))
    rank = current_rank()
    if rank is not None:  # under torchrun: this rank's shard, then the joined cache
        return _extract_sharded(dataset, built, Path(out), rank, limit=limit, seed=seed, **options)
    return build_cache(dataset, built, Path(out), limit=limit, seed=seed, **options)


def parse_face_box(face_box: str | tuple) -> str | tuple | None:
    """``--face-box`` as a value: 'auto', None ('detect') or a (left, top, right, bottom) tuple."""
    if face_box in ("auto", "detect"):
        return None if face_box == "detect" else face_box
    if isinstance(face_box, str):
        try:
            face_box = tuple(float(value) for value in face_box.split(","))
        except ValueError:
            raise FeatgenderError(f"--face-box {face_box!r}: want auto, detect or left,top,right,bottom") from None
    return face_box


def resolve_face_box(
    face_box: str | tuple, backbone: str, sources: Sequence, where: str = "the images"
) -> tuple | None:
    """The ``face_box`` for :func:`build_backbone` from ``--face-box`` ('auto', 'detect' or
    'L,T,R,B'): None for detection (or a backbone that does not align faces), the given box,
    or where faces sit in ``sources``, image paths or PIL images
    (:func:`featgender.faces.calibrate_face_box`)."""
    parsed = parse_face_box(face_box)
    if not isinstance(parsed, str):  # None or a box; the one string left is 'auto'
        return parsed
    if not get_config(backbone).alignment:
        return None
    from featgender.faces import calibrate_face_box  # dlib, an optional extra

    box = calibrate_face_box(sources)
    logger.info("%s: %s", backbone, f"faces sit at {box} in {where}: no detection" if box else "faces move: detecting")
    return box


def finding_faces_in(
    dataset: FaceDataset, backbone: Backbone, face_box: str | tuple = "auto"
) -> tuple[Backbone, tuple | None]:
    """``backbone`` finding faces in ``dataset``'s images per ``face_box`` (:func:`resolve_face_box`),
    and the box: one network, each dataset of several aligned where its faces sit."""
    box = resolve_face_box(face_box, backbone.config.name, dataset.paths, dataset.name)
    return (with_face_box(backbone, box) if backbone.config.alignment else backbone), box


def _extract_sharded(
    dataset: FaceDataset,
    backbone: Backbone,
    out: Path,
    rank: Rank,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    dtype: str = "float16",
    flip: bool = False,
    limit: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> CacheResult:
    """This rank's part of a torchrun extraction: its shard, then (rank 0) the joined cache.

    Arguments are :func:`build_cache`'s. Returns the :class:`CacheResult` of the joined cache
    (``status`` is this rank's shard's).
    """
    import torch
    import torch.distributed as dist

    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{rank.local_rank}"
    device = resolve_device(device)
    metadata = cache_metadata(dataset, backbone, resolve_precision(precision, device), dtype, limit, seed, flip)
    if out.exists() and not overwrite and identity_mismatch(read_metadata(out, check_shards=False), metadata):
        raise FeatgenderError(
            f"{out}: holds a different cache; pass --overwrite to replace it or --out to write elsewhere"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    with process_group(device):
        rows = shard_rows(len(dataset), rank.rank, rank.world_size)
        shard = shard_path(out, rank.rank, rank.world_size)
        shard.parent.mkdir(parents=True, exist_ok=True)
        result = build_cache(
            dataset.subset(np.arange(rows.start, rows.stop)),
            backbone,
            shard,
            device=device,
            precision=precision,
            dtype=dtype,
            flip=flip,
            limit=limit,
            seed=seed,
            overwrite=overwrite,
            progress=progress and rank.rank == 0,
            **options,
        )
        dist.barrier()
        if rank.rank == 0:
            with exclusive(out):
                join_shards(
                    out, dataset, [shard_path(out, r, rank.world_size) for r in range(rank.world_size)], metadata
                )
        dist.barrier()
    summary = read_metadata(out)
    return CacheResult(
        out, result.status, int(summary["num_images"]), int(summary.get("failed_count", 0)), result.resumed_from
    )


__all__ = ["CacheResult", "build_cache", "extract_to_cache", "parse_face_box", "resolve_face_box"]
