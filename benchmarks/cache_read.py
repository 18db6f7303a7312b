"""Reading a CelebA-sized cache (182,770 x 2048 float32) through featgender vs plain h5py.

The same generated cache as ``heads_speed.py``. For each read - the train split (162,770
rows), the test split (the last 20,000), and one streamed pass over the train split in
16,384-row chunks, in file order and in shuffled 256-row blocks (what ``fit --out-of-core``
does each epoch) - prints one JSON line with
featgender's seconds, the seconds of the plainest h5py code reading the same rows, and
their ratio. Best of ``--repeat`` runs.

    python benchmarks/cache_read.py [--rows 162770] [--dim 2048] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from heads_speed import generated_cache  # beside this file

from featgender.cache import iter_cache_chunks, read_caches
from featgender.data import SPLITS


def plain_read(path: Path, split: str) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        wanted = h5["valid"][:] & (h5["split"][:] == SPLITS.index(split))
        return h5["features"][:][wanted]


def plain_stream(path: Path, split: str, rows: int = 16384, shuffle: int | None = None) -> int:
    """Rows of one pass in chunks; shuffled: the chunks gather 256-row blocks in a random order."""
    seen = 0
    block = rows if shuffle is None else 256
    with h5py.File(path, "r") as h5:
        wanted = h5["valid"][:] & (h5["split"][:] == SPLITS.index(split))
        starts = np.arange(0, len(wanted), block)
        if shuffle is not None:
            starts = np.random.default_rng(shuffle).permutation(starts)
        for first in range(0, len(starts), rows // block):
            parts = [
                h5["features"][start : start + block][wanted[start : start + block]]
                for start in starts[first : first + rows // block]
            ]
            seen += len(np.concatenate(parts))
    return seen


def best_seconds(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def timings(cache: Path, repeat: int, read=read_caches, stream=iter_cache_chunks) -> list[dict]:
    """featgender's and plain h5py's seconds for each read; ``read``/``stream`` may be another
    implementation's (to compare versions in one run)."""
    cases = [
        ("read train split", lambda: read(cache, "train"), lambda: plain_read(cache, "train")),
        ("read test split", lambda: read(cache, "test"), lambda: plain_read(cache, "test")),
        (
            "stream train split",
            lambda: sum(len(f) for f, _ in stream(cache, "train")),
            lambda: plain_stream(cache, "train"),
        ),
        (
            "stream train split, shuffled",
            lambda: sum(len(f) for f, _ in stream(cache, "train", shuffle=0)),
            lambda: plain_stream(cache, "train", shuffle=0),
        ),
    ]
    lines = []
    for name, ours, plain in cases:
        ours_s, plain_s = best_seconds(ours, repeat), best_seconds(plain, repeat)
        lines.append(
            {
                "read": name,
                "featgender_s": round(ours_s, 3),
                "plain_h5py_s": round(plain_s, 3),
                "ratio": round(ours_s / plain_s, 2),
            }
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=162_770)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "generated.h5"
        generated_cache(cache, args.rows, args.dim)
        for line in timings(cache, args.repeat):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
