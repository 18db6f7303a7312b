"""Re-check a head's defaults on a cache's valid split: C, row normalisation and PCA.

Each combination is fitted on the train split and scored on the valid split only (the test
split stays for reporting); prints a markdown table, best first.

    python benchmarks/tune_on_valid.py --cache cache/celeba_10k-dlib_resnet.h5 --head logreg
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from featgender.cache import read_caches
from featgender.heads import fit_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="a cache, or a.h5+b.h5 joined")
    parser.add_argument("--head", default="logreg")
    parser.add_argument("--C", default="0.001,0.005,0.02,0.1,1", help="values of C to try")
    parser.add_argument("--normalize", default="power,l2,none")
    parser.add_argument("--pca", default="0,64")
    args = parser.parse_args()
    caches = str(args.cache).split("+")
    train, valid = read_caches(caches, "train"), read_caches(caches, "valid")
    rows = []
    for C, normalize, pca in itertools.product(
        map(float, args.C.split(",")), args.normalize.split(","), map(int, args.pca.split(","))
    ):
        pipeline = fit_head(train.features, train.labels, args.head, C=C, normalize=normalize, pca=pca)[0]
        accuracy = float((pipeline.predict(valid.features) == valid.labels).mean())
        rows.append((accuracy, C, normalize, pca))
    print(
        f"{args.head} on {' + '.join(Path(c).name for c in caches)}: train {len(train.labels)}, "
        f"valid {len(valid.labels)}"
    )
    print("| valid accuracy | C | normalize | pca |\n|---|---|---|---|")
    for accuracy, C, normalize, pca in sorted(rows, key=lambda row: -row[0]):
        print(f"| {accuracy:.4f} | {C:g} | {normalize} | {pca} |")


if __name__ == "__main__":
    main()
