"""Fit time of every head on a CelebA-sized train split (162,770 x 2048 float32), from an HDF5 cache.

Without a real CelebA cache at hand (``--cache``), features are generated and written with
featgender's own cache writer: 64 latent factors through a random projection and a ReLU
(pooled-CNN-like: non-negative, correlated), with the label a noisy function of two factors.
Prints one JSON line per head: seconds to read the train split and to fit, predict ms/image,
held-out accuracy.

    python benchmarks/heads_speed.py [--rows 162770] [--dim 2048] [--heads logreg,svm,gbm,svm-rbf]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from featgender.cache import read_caches, write_cache
from featgender.data import FaceDataset
from featgender.heads import fit_head


def generated_cache(path: Path, rows: int, dim: int, test_rows: int = 20_000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    total = rows + test_rows
    projection = rng.standard_normal((64, dim), dtype=np.float32) / 8
    factors = rng.standard_normal((total, 64), dtype=np.float32)
    labels = (factors[:, 0] + 0.5 * factors[:, 1] + 0.5 * rng.standard_normal(total) > 0).astype(np.int8)
    dataset = FaceDataset(
        root=path.parent,
        format="generated",
        image_ids=[f"{i:06d}.jpg" for i in range(total)],
        paths=[],
        labels=labels,
        splits=np.r_[np.zeros(rows, np.int8), np.full(test_rows, 2, np.int8)],
        split_source="generated",
    )

    def chunks(block: int = 8192):
        for start in range(0, total, block):
            part = factors[start : start + block] @ projection
            part += 0.3 * rng.standard_normal(part.shape, dtype=np.float32)
            yield np.maximum(part, 0), [""] * len(part)

    write_cache(path, dataset, chunks(), {"backbone": "generated", "feature_dim": dim, "dtype": "float32"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, help="a real cache (default: generate one)")
    parser.add_argument("--rows", type=int, default=162_770)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", default="logreg,svm,gbm,svm-rbf")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache
        if cache is None:
            cache = Path(tmp) / "generated.h5"
            generated_cache(cache, args.rows, args.dim)
        test = read_caches(cache, "test")
        for head in args.heads.split(","):
            # As `featgender fit` does: read the split, then fit in place on what was read.
            started = time.perf_counter()
            train = read_caches(cache, "train")
            read_seconds = time.perf_counter() - started
            started = time.perf_counter()
            pipeline, _ = fit_head(train.features, train.labels, head, overwrite_features=True)
            fit_seconds = time.perf_counter() - started
            del train
            started = time.perf_counter()
            predicted = pipeline.predict(test.features)
            predict_ms = (time.perf_counter() - started) / len(test.labels) * 1000
            print(
                json.dumps(
                    {
                        "head": head,
                        "read_seconds": round(read_seconds, 2),
                        "fit_seconds": round(fit_seconds, 2),
                        "predict_ms_per_image": round(predict_ms, 4),
                        "test_accuracy": round(float((predicted == test.labels).mean()), 4),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
