"""torch.distributed for extraction (torchrun): which rows a rank embeds, and waiting for the
other ranks (the shards are joined by :func:`featgender.cache.join_shards`).

Under ``torchrun --nproc-per-node N [--nnodes M ...] -m featgender extract ...`` each rank
embeds one contiguous block of the dataset's rows (rank r of W: rows r*N/W to (r+1)*N/W,
:func:`shard_rows`) into its own cache file, ``<out>.shards/rank-RRRRR-of-WWWWW.h5``, with the
ordinary crash-safe, resumable writer (:mod:`featgender.extract` runs it). When every
rank is done, rank 0 writes ``<out>`` (:func:`featgender.cache.join_shards`): the labels, ids and splits of all
rows, and ``features`` as an HDF5 virtual dataset over the shards' features (no copy), in the
original image order. Readers see one ordinary cache; they refuse it when a shard file is
missing.

The process group is only used to wait for each other: gloo on CPU, NCCL on GPUs. Shards
and the joined file must be on a file system every node sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import NamedTuple

import torch

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


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The job's process group for the block, started here unless the caller runs one: NCCL
    on GPUs, its barriers bound to this rank's GPU rather than guessed from the rank; gloo
    on CPU."""
    import torch.distributed as dist

    started_here = not dist.is_initialized()
    if started_here:
        on_cuda = device.type == "cuda"
        dist.init_process_group(
            "nccl" if on_cuda else "gloo", timeout=BARRIER_TIMEOUT, device_id=device if on_cuda else None
        )
    try:
        yield
    finally:
        if started_here:
            dist.destroy_process_group()


__all__ = ["BARRIER_TIMEOUT", "Rank", "current_rank", "process_group", "shard_rows"]
