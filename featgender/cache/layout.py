"""Where a cache's files lie while it is written: ``<out>.partial/`` during an extraction
(:class:`PartialFolder`: ``meta.json``, ``rows.h5`` with the dataset's rows, one ``.npz`` per
finished chunk of features), and ``<out>.shards/rank-RRRRR-of-WWWWW.h5`` for a torchrun job
(:func:`shard_path`), whose joined ``<out>`` refers to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from featgender.errors import FeatgenderError


class PartialFolder:
    """Where the files of an extraction in progress lie: ``<out>.partial/`` holds ``meta.json``
    (what is being written), ``rows.h5`` (the dataset's rows: the schema less ``features``,
    for readers) and one ``rows-<first row>.npz`` per finished chunk of rows."""

    def __init__(self, out: Path):
        self.out = out
        self.folder = out.with_name(out.name + ".partial")
        self.rows_path = self.folder / "rows.h5"
        self.meta_path = self.folder / "meta.json"

    def chunk_path(self, start: int) -> Path:
        return self.folder / f"rows-{start:010d}.npz"

    def chunk_starts(self) -> list[int]:
        """First rows of the finished chunks, sorted."""
        return sorted(int(path.stem[len("rows-") :]) for path in self.folder.glob("rows-" + "[0-9]" * 10 + ".npz"))

    def read_meta(self) -> dict | None:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None

    def readable(self) -> bool:
        """Whether readers can see this extraction's finished rows (it has started)."""
        return self.rows_path.is_file() and self.meta_path.is_file()

    def read_chunk(self, start: int, column: str) -> np.ndarray:
        """'features' or 'errors' (one message per row, '' where embedded) of a finished chunk."""
        with np.load(self.chunk_path(start), allow_pickle=False) as chunk:
            return chunk[column]


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    """``<out>.shards/rank-RRRRR-of-WWWWW.h5``: the cache rank ``rank`` of a torchrun job writes."""
    out = Path(out)
    return out.with_name(out.name + ".shards") / f"rank-{rank:05d}-of-{world_size:05d}.h5"


def shards_in_progress(out: str | Path) -> list[Path]:
    """The shard paths of the torchrun job writing ``out``, one per rank (finished or not), from
    the names in ``<out>.shards/``; [] when there is none."""
    folder = shard_path(out, 0, 1).parent
    sizes = (
        {int(name.split("-of-")[1][:5]) for name in os.listdir(folder) if "-of-" in name} if folder.is_dir() else set()
    )
    if len(sizes) > 1:
        raise FeatgenderError(f"{folder}: shards of jobs with {sorted(sizes)} ranks; remove the ones of the old job")
    return [shard_path(out, rank, size) for size in sizes for rank in range(size)]


def missing_shards(path: Path, metadata: dict) -> list[Path]:
    """Shard files a joined cache refers to that are not there."""
    return [
        path.parent / name for name in json.loads(metadata.get("shards") or "[]") if not (path.parent / name).is_file()
    ]
