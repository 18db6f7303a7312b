"""``featgender extract``: dataset → backbone → face box → one process or torchrun → cache.

The stage above :mod:`featgender.embed` (images in, arrays out, no files) and
:mod:`featgender.cache.write` (rows in, files out): :func:`extract_to_cache` is ``featgender
extract``; :func:`build_cache` embeds a dataset with a built backbone in this process and
hands the rows to the resumable writer; under torchrun each rank builds its shard that way
and rank 0 joins them (:mod:`featgender.distributed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
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
from featgender.embed import default_batch_size, iter_layer_features, resolve_device, resolve_precision
from featgender.errors import FeatgenderError
from featgender.faces import parse_face_box, resolve_face_box
from featgender.files import CACHE, check_writable, exclusive

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


def build_cache(dataset: FaceDataset, backbone: Backbone, out: str | Path, **options) -> CacheResult:
    """Embed every image of ``dataset`` once into the HDF5 cache ``out``; resume if interrupted.

    A finished cache with the same identity (backbone, weights, preprocessing, dtype, dataset
    rows) is left as it is; one with another identity is refused unless ``overwrite``.
    Options are :func:`build_layer_caches`'.
    """
    return build_layer_caches(dataset, backbone, {backbone.config.layer: out}, **options)[0]


def build_layer_caches(
    dataset: FaceDataset,
    backbone: Backbone,
    outs: Mapping[str, str | Path],
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
) -> list[CacheResult]:
    """Embed every image of ``dataset`` once, at each layer the backbone was built for, into one
    cache per layer (``outs``: layer -> path), all from one forward pass per batch; resumable.

    Each cache is what a single-layer extraction writes, bit for bit (the same batches through
    the same graph). ``batch_size``, ``workers`` and ``precision`` default to what suits the
    device (see :mod:`featgender.embed`); ``flip`` averages each embedding with the mirrored
    image's. Progress is saved every ``chunk_rows`` images (rounded up to whole batches, so
    that a resumed run feeds the network the very same batches); a rerun resumes at the first
    row some layer lacks. Unreadable images are recorded in the cache (``failed/``) and
    skipped; with ``strict`` the first one stops the extraction (resumable once the file is
    fixed or removed). A second extraction of the same cache while this one runs is refused.
    """
    device = resolve_device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    precision = resolve_precision(precision, device)
    whole_batches = batch_size * -(-chunk_rows // max(batch_size, 1))
    with ExitStack() as held:
        writers = {
            layer: held.enter_context(
                CacheWriter(
                    out,
                    dataset,
                    cache_metadata(dataset, backbone.at(layer), precision, dtype, limit, seed, flip),
                    chunk_rows=whole_batches,
                    overwrite=overwrite,
                )
            )
            for layer, out in outs.items()
        }
        todo = {layer: writer for layer, writer in writers.items() if not writer.up_to_date}
        if todo:
            batches = iter_layer_features(
                backbone,
                dataset.paths,
                start=min(writer.start for writer in todo.values()),
                batch_size=batch_size,
                device=device,
                workers=workers,
                dtype=dtype,
                precision=precision,
                flip=flip,
                progress=progress,
            )
            with ExitStack() as appending:
                appends = {layer: appending.enter_context(writer.appending()) for layer, writer in todo.items()}
                for indices, features, errors in _stop_at_first_error(batches, dataset.paths) if strict else batches:
                    for layer, append in appends.items():
                        append(indices, features[layer], errors)
        return [_result(writer, writer.finish() if layer in todo else None) for layer, writer in writers.items()]


def _result(writer: CacheWriter, num_failed: int | None) -> CacheResult:
    """What became of one cache: finished now (``num_failed``), or up to date already (None)."""
    if num_failed is None:
        found = read_metadata(writer.out)
        return CacheResult(writer.out, "up to date", int(found["num_images"]), int(found.get("failed_count", 0)))
    status = "resumed" if writer.start else "created"
    return CacheResult(writer.out, status, len(writer.dataset), num_failed, writer.start)


def _stop_at_first_error(batches: Iterable, paths: Sequence[Path]) -> Iterable:
    for indices, features, errors in batches:
        for index, error in zip(indices, errors, strict=True):
            if error:
                raise FeatgenderError(f"{paths[index]}: {error} (--strict: unreadable images are fatal)")
        yield indices, features, errors


def extract_to_cache(data: str | Path, *, layer: str | None = None, **options) -> CacheResult:
    """Read a dataset, build a backbone and embed the dataset into a cache: ``featgender extract``.

    ``layer``: the node to embed from (default: the backbone's; its cache is then named
    ``cache/<dataset>-<backbone>@<layer>.h5``). Options are :func:`extract_layers`'.

    Examples
    --------
    >>> result = extract_to_cache("../shared/faces/utkface", limit=200)  # doctest: +SKIP
    >>> result.path  # doctest: +SKIP
    PosixPath('cache/utkface-efficientnet_lite0-limit200.h5')
    """
    return extract_layers(data, layers=None if layer is None else [layer], **options)[0]


def extract_layers(
    data: str | Path,
    *,
    layers: Sequence[str] | None = None,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "default",
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
) -> list[CacheResult]:
    """Embed a dataset at each of ``layers`` (default: the backbone's one) in one forward pass
    per batch, one cache per layer: ``featgender extract --layer A --layer B ...``.

    ``out`` names each cache with ``{layer}`` in it when there are several; by default
    ``cache/<dataset>-<backbone>@<layer>.h5`` (no ``@<layer>`` for the backbone's default).

    ``face_box`` matters to face-aligning backbones (dlib_resnet) only: 'auto' finds where
    the face sits in the dataset's aligned crops (:func:`featgender.faces.calibrate_face_box`)
    and skips detection when it sits still, 'detect' detects in every image, or a relative
    (left, top, right, bottom) box. ``options`` go to :func:`build_cache` (batch_size,
    device, workers, dtype, overwrite, ...). ``faces='photo'``: the images are photos; each
    goes through the face step (largest face found and cut), and one without a face is
    recorded as failed ('no face found') and left out of training and metrics.

    """
    dataset = load_dataset(
        data, format=format, limit=limit, seed=seed, image_column=image_column, label_column=label_column
    )
    if faces not in ("crop", "photo"):
        raise FeatgenderError(f"--faces {faces!r}: choose crop or photo")
    if faces == "photo":
        built = build_backbone(backbone, weights=weights, layer=layers, find_faces=True)
    else:
        built = build_backbone(
            backbone,
            weights=weights,
            layer=layers,
            face_box=face_box_for(backbone, face_box, dataset.paths, dataset.name),
        )
    outs = _layer_paths(dataset, built, out, cache_dir, limit, options.get("flip", False))
    rank = current_rank()
    if rank is not None:  # under torchrun: this rank's shard, then the joined cache
        return _extract_sharded(dataset, built, outs, rank, limit=limit, seed=seed, **options)
    return build_layer_caches(dataset, built, outs, limit=limit, seed=seed, **options)


def _layer_paths(
    dataset: FaceDataset,
    built: Backbone,
    out: str | Path | None,
    cache_dir: str | Path,
    limit: int | None,
    flip: bool,
) -> dict[str, Path]:
    """Each layer's cache: ``out`` (with ``{layer}`` filled in, needed for several), or the
    default path, which names the layer unless it is the backbone's default one."""
    if out is not None and len(built.layers) > 1 and "{layer}" not in str(out):
        raise FeatgenderError(f"--out {out}: with several --layer, put {{layer}} in the path (or leave --out out)")
    default = get_config(built.config.name).layer
    return {
        name: Path(str(out).replace("{layer}", name))
        if out is not None
        else default_cache_path(dataset, built.config.name, limit, cache_dir, flip, None if name == default else name)
        for name in built.layers
    }


def face_box_for(backbone: str, face_box: str | tuple, sources: Sequence, where: str = "the images") -> tuple | None:
    """The ``face_box`` for :func:`build_backbone` from ``--face-box`` ('auto', 'detect' or
    'L,T,R,B'): None for a backbone that does not align faces, else
    :func:`featgender.faces.resolve_face_box` (detection, the given box, or where faces sit in
    ``sources``)."""
    if parse_face_box(face_box) == "auto" and not get_config(backbone).alignment:
        return None
    return resolve_face_box(face_box, sources, f"{backbone}: {where}")


def finding_faces_in(
    dataset: FaceDataset, backbone: Backbone, face_box: str | tuple = "auto"
) -> tuple[Backbone, tuple | None]:
    """``backbone`` finding faces in ``dataset``'s images per ``face_box`` (:func:`face_box_for`),
    and the box: one network, each dataset of several aligned where its faces sit."""
    box = face_box_for(backbone.config.name, face_box, dataset.paths, dataset.name)
    return (with_face_box(backbone, box) if backbone.config.alignment else backbone), box


def _extract_sharded(
    dataset: FaceDataset,
    backbone: Backbone,
    outs: dict[str, Path],
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
) -> list[CacheResult]:
    """This rank's part of a torchrun extraction: its shard of each layer's cache, then (rank 0)
    the joined caches.

    Arguments are :func:`build_layer_caches`'. Returns the :class:`CacheResult` of each joined
    cache (``status`` is this rank's shard's).
    """
    import torch
    import torch.distributed as dist

    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{rank.local_rank}"
    device = resolve_device(device)
    metadata = {
        layer: cache_metadata(
            dataset, backbone.at(layer), resolve_precision(precision, device), dtype, limit, seed, flip
        )
        for layer in outs
    }
    for layer, out in outs.items():
        check_writable(out, CACHE)
        if (
            out.exists()
            and not overwrite
            and identity_mismatch(read_metadata(out, check_shards=False), metadata[layer])
        ):
            raise FeatgenderError(
                f"{out}: holds a different cache; pass --overwrite to replace it or --out to write elsewhere"
            )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    with process_group(device):
        rows = shard_rows(len(dataset), rank.rank, rank.world_size)
        shards = {layer: shard_path(out, rank.rank, rank.world_size) for layer, out in outs.items()}
        for shard in shards.values():
            shard.parent.mkdir(parents=True, exist_ok=True)
        results = build_layer_caches(
            dataset.subset(np.arange(rows.start, rows.stop)),
            backbone,
            shards,
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
            for layer, out in outs.items():
                with exclusive(out):
                    every_rank = [shard_path(out, r, rank.world_size) for r in range(rank.world_size)]
                    join_shards(out, dataset, every_rank, metadata[layer])
        dist.barrier()
    joined = []
    for out, result in zip(outs.values(), results, strict=True):
        summary = read_metadata(out)
        joined.append(
            CacheResult(
                out, result.status, int(summary["num_images"]), int(summary.get("failed_count", 0)), result.resumed_from
            )
        )
    return joined


__all__ = [
    "CacheResult",
    "build_cache",
    "build_layer_caches",
    "extract_layers",
    "extract_to_cache",
    "face_box_for",
]
