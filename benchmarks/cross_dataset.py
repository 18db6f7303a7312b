"""Train on one dataset, test on another: the matrix of test accuracies (95% CIs), one run.

Each ``--data NAME=CACHE[+CACHE]`` is one dataset's cache (or caches of several backbones,
joined by image id as ``fit --cache a --cache b`` does). Each head is fitted with its
defaults on every dataset's train split and scored on every dataset's test split. Each
``--finetuned NAME=CHECKPOINT`` (``featgender finetune`` on dataset NAME) is scored on every
dataset's test images too (``featgender evaluate --data``), each dataset's faces aligned
where they sit in its images, as extract aligns a dataset's cache. Domain shift is what
users meet first when they deploy.

    python benchmarks/cross_dataset.py --heads logreg,svm \\
        --data celeba_10k=cache/celeba_10k-dlib_resnet.h5 --data utkface=cache/utkface-dlib_resnet.h5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from featgender.cache import read_caches
from featgender.evaluate import evaluate_images
from featgender.heads import fit_head
from featgender.metrics import bootstrap_ci, classification_metrics


def accuracy_with_ci(labels: np.ndarray, scores: np.ndarray) -> str:
    predicted = (scores >= 0.5).astype(int)
    low, high = bootstrap_ci(labels, predicted)["accuracy"]
    return f"{classification_metrics(labels, predicted)['accuracy']:.4f} ({low:.4f}–{high:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True, help="NAME=CACHE[+CACHE...]")
    parser.add_argument("--heads", default="logreg")
    parser.add_argument("--finetuned", action="append", default=[], help="NAME=CHECKPOINT (trained on NAME)")
    args = parser.parse_args()
    caches = {name: path.split("+") for name, path in (entry.split("=", 1) for entry in args.data)}
    tests = {name: read_caches(paths, "test") for name, paths in caches.items()}
    print(
        "| trained on | model | "
        + " | ".join(f"test: {name} (n={len(data.labels)})" for name, data in tests.items())
        + " |"
    )
    print("|---|---|" + "---|" * len(tests))
    for trained_on, paths in caches.items():
        train = read_caches(paths, "train")
        for head in args.heads.split(","):
            pipeline = fit_head(train.features, train.labels, head)[0]
            cells = [
                accuracy_with_ci(data.labels, pipeline.predict_proba(data.features)[:, 1]) for data in tests.values()
            ]
            print(
                f"| {trained_on} ({len(train.labels)}) | {' + '.join(Path(p).stem for p in paths)}, {head} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )
    for entry in args.finetuned:
        trained_on, checkpoint = entry.split("=", 1)
        cells = []
        for data in tests.values():
            result = evaluate_images(
                checkpoint, data.metadata["dataset_root"], format=data.metadata["dataset_format"], progress=False
            )
            low, high = result["ci95"]["accuracy"]
            cells.append(f"{result['accuracy']:.4f} ({low:.4f}–{high:.4f})")
        print(f"| {trained_on} | {Path(checkpoint).name} (fine-tuned) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
