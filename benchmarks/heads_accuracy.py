"""Every head's accuracy on real faces: test split of one cache, and faces of another dataset.

Each head is fitted with its defaults on the train split of ``--cache`` (and logreg once
more out of core, as ``fit --out-of-core`` does) and scored on its test split and, with
``--unseen``, on every image of a second cache (faces of another dataset the heads never
saw, e.g. CelebA images for heads trained on UTKFace). ``a.h5+b.h5`` joins two backbones'
caches of the same images, as ``fit --cache a.h5 --cache b.h5`` does. Prints a markdown
table with bootstrap 95% CIs.

    featgender extract --data ../shared/faces/utkface
    featgender extract --data ../shared/faces/celeba_mini
    python benchmarks/heads_accuracy.py --cache cache/utkface-efficientnet_lite0.h5 \\
        --unseen cache/celeba_mini-efficientnet_lite0.h5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from featgender.cache import iter_cache_chunks, read_caches
from featgender.heads import fit_head, fit_head_streaming, list_heads
from featgender.metrics import bootstrap_ci, classification_metrics


def scored(pipeline, data) -> str:
    scores = pipeline.predict_proba(data.features)[:, 1]
    predicted = (scores >= 0.5).astype(int)
    accuracy = classification_metrics(data.labels, predicted)["accuracy"]
    low, high = bootstrap_ci(data.labels, predicted)["accuracy"]
    return f"{accuracy:.4f} ({low:.4f}–{high:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a cache, or a.h5+b.h5 joined")
    parser.add_argument("--unseen", type=Path, help="a cache of another dataset (or a.h5+b.h5), scored whole")
    parser.add_argument("--heads", default=",".join(list_heads()))
    args = parser.parse_args()
    caches = str(args.cache).split("+")
    train, test = read_caches(caches, "train"), read_caches(caches, "test")
    unseen = read_caches(str(args.unseen).split("+")) if args.unseen else None
    print(
        f"train {len(train.labels)} / test {len(test.labels)} images of {args.cache.name}"
        + (f"; unseen: {len(unseen.labels)} images of {args.unseen.name}" if unseen else "")
    )
    print("| head | fit s | test accuracy (95% CI) |" + (" unseen accuracy (95% CI) |" if unseen else ""))
    print("|---|---|---|" + ("---|" if unseen else ""))
    order = np.random.default_rng(0)
    fits = {head: lambda head=head: fit_head(train.features, train.labels, head)[0] for head in args.heads.split(",")}
    if len(caches) == 1:  # streaming reads one cache
        fits["logreg, out of core"] = lambda: fit_head_streaming(
            lambda: iter_cache_chunks(args.cache, "train", shuffle=order), "logreg", overwrite_chunks=True
        )
    for name, fit in fits.items():
        started = time.perf_counter()
        pipeline = fit()
        seconds = time.perf_counter() - started
        row = f"| {name} | {seconds:.1f} | {scored(pipeline, test)} |"
        print(row + (f" {scored(pipeline, unseen)} |" if unseen else ""), flush=True)


if __name__ == "__main__":
    main()
