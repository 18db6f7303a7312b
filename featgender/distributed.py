"""Extraction across the ranks of a torch.distributed job (torchrun), one cache shard per rank.

Under ``torchrun --nproc-per-node N [--nnodes M ...] -m featgender extract ...`` each rank
embeds one contiguous block of the dataset's rows (rank r of W: rows r*N/W to (r+1)*N/W)
into its own cache file, ``<out>.shards/rank-RRRRR-of-WWWWW.h5``, with the ordinary
crash-safe, resumable writer: a rank that dies leaves a resumable shard, and rerunning the
job redoes only what is missing. When every rank is done, rank 0 writes ``<out>``: the
labels, ids and splits of all rows, and ``features`` as an HDF5 virtual dataset over the
shards' features (no copy), in the original image order. Readers see one ordinary cache;
they refuse it when a shard file is missing.

The process group is only used to wait for each other: gloo on CPU, NCCL on GPUs. Shards
and the joined file must be on a file system every node sees.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from featgender.errors import FeatgenderError
from featgender.files import atomic_write, exclusive

# Ranks wait for the slowest one at the end of extraction, which may take hours.
BARRIER_TIMEOUT = timedelta(hours=48)


class Rank(NamedTuple):
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int


def current_rank() -> Rank | None:
    """The torchrun rank of this process (from RANK, WORLD_SIZE, LOCAL_RANK), or None alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    return Rank(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def shard_rows(num_rows: int, rank: int, world_size: int) -> range:
    """The contiguous block of rows rank ``rank`` of ``world_size`` embeds."""
    return range(rank * num_rows // world_size, (rank + 1) * num_rows // world_size)


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    """``<out>.shards/rank-RRRRR-of-WWWWW.h5``."""
    out = Path(out)
    return out.with_name(out.name + ".shards") / f"rank-{rank:05d}-of-{world_size:05d}.h5"


def shards_in_progress(out: str | Path) -> list[Path]:
    """The shard paths of the torchrun job writing ``out``, one per rank (finished or not), from
    the names in ``<out>.shards/``; [] when there is none."""
    folder = shard_path(out, 0, 1).parent
    sizes = {int(name.split("-of-")[1][:5]) for name in os.listdir(folder) if "-of-" in name} if folder.is_dir() else set()
    if len(sizes) > 1:
        raise FeatgenderError(f"{folder}: shards of jobs with {sorted(sizes)} ranks; remove the ones of the old job")
    return [shard_path(out, rank, size) for size in sizes for rank in range(size)]


def join_shards(out: str | Path, dataset, shards: list[Path], metadata: dict) -> None:
    """Write ``out`` for ``dataset`` from its complete shard caches, in order: features as a
    virtual dataset over the shards', the rest as any cache (:func:`featgender.cache.write_rows`).
    Atomic, like every cache write."""
    from featgender.cache import row_table_bytes, write_rows

    out = Path(out)
    dim = metadata["feature_dim"]
    layout = h5py.VirtualLayout(shape=(len(dataset), dim), dtype=metadata["dtype"])
    errors = []
    for path in shards:
        with h5py.File(path, "r") as shard:
            ids = shard["ids"].asstr()[:].tolist()
            first, rows = len(errors), len(ids)
            if ids != dataset.image_ids[first:first + rows]:  # each rank listed the dataset itself
                raise FeatgenderError(f"{path}: holds other images than rows {first}-{first + rows - 1} of the dataset "
                                      "(did it change while the job ran?); remove the shards and rerun")
            reasons = dict(zip(shard["failed/ids"].asstr()[:], shard["failed/reasons"].asstr()[:])) \
                if "failed" in shard else {}
            errors += [reasons.get(image_id, "") for image_id in ids]
        # relative to the joined file: the pair can be moved together
        layout[len(errors) - rows:len(errors)] = h5py.VirtualSource(os.path.relpath(path, out.parent), "features",
                                                                    shape=(rows, dim))
    if len(errors) != len(dataset):
        raise FeatgenderError(f"{out}: the shards hold {len(errors)} rows for {len(dataset)} images")
    with atomic_write(out, size=row_table_bytes(dataset) + 1024 * len(shards)) as tmp, \
            h5py.File(tmp, "w", libver="latest") as h5:
        h5.create_virtual_dataset("features", layout, fillvalue=np.nan)
        write_rows(h5, dataset, errors, {**metadata, "shards": json.dumps([os.path.relpath(path, out.parent)
                                                                             for path in shards])})


def missing_shards(path: Path, metadata: dict) -> list[Path]:
    """Shard files a joined cache refers to that are not there."""
    return [path.parent / name for name in json.loads(metadata.get("shards") or "[]")
            if not (path.parent / name).is_file()]


def extract_sharded(dataset, backbone, out: str | Path, rank: Rank, *, device: str = "auto",
                    precision: str = "auto", dtype: str = "float16", flip: bool = False, limit: int | None = None,
                    seed: int = 0, overwrite: bool = False, progress: bool = True, **options):
    """This rank's part of a torchrun extraction: its shard, then (rank 0) the joined cache.

    Arguments are :func:`featgender.cache.build_cache`'s. Returns the :class:`CacheResult`
    of the joined cache (``status`` is this rank's shard's).
    """
    import torch
    import torch.distributed as dist

    from featgender.cache import CacheResult, _identity_mismatch, build_cache, cache_metadata, read_metadata
    from featgender.extract import resolve_device, resolve_precision

    out = Path(out)
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{rank.local_rank}"
    device = resolve_device(device)
    metadata = cache_metadata(dataset, backbone, resolve_precision(precision, device), dtype, limit, seed, flip)
    if out.exists() and not overwrite and _identity_mismatch(read_metadata(out, check_shards=False), metadata):
        raise FeatgenderError(f"{out}: holds a different cache; pass --overwrite to replace it or --out to write elsewhere")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    started_here = not dist.is_initialized()
    if started_here:  # NCCL's barriers run on this rank's GPU, bound here rather than guessed from the rank
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=BARRIER_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    try:
        rows = shard_rows(len(dataset), rank.rank, rank.world_size)
        shard = shard_path(out, rank.rank, rank.world_size)
        shard.parent.mkdir(parents=True, exist_ok=True)
        result = build_cache(dataset.subset(np.arange(rows.start, rows.stop)), backbone, shard, device=device,
                             precision=precision, dtype=dtype, flip=flip, limit=limit, seed=seed, overwrite=overwrite,
                             progress=progress and rank.rank == 0, **options)
        dist.barrier()
        if rank.rank == 0:
            with exclusive(out):
                join_shards(out, dataset, [shard_path(out, r, rank.world_size) for r in range(rank.world_size)],
                            metadata)
        dist.barrier()
    finally:
        if started_here:
            dist.destroy_process_group()
    summary = read_metadata(out)
    return CacheResult(out, result.status, int(summary["num_images"]), int(summary.get("failed_count", 0)),
                       result.resumed_from)


__all__ = ["Rank", "current_rank", "extract_sharded", "join_shards", "missing_shards", "shard_path", "shard_rows",
           "shards_in_progress"]
