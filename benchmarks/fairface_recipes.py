"""Recipes for faces in the wild side by side, one row each, from their caches (issue #34's table).

A recipe is the five sets' caches: one backbone, or several joined by image id (``+``), each
path with ``{set}`` where the set's name goes. A logistic head (``--heads``: others with a C, a
row each) is fitted on the train splits,
balanced by dataset x gender as the quick start's, at the C that FairFace's valid carve-out
prefers (never its val; ``--choose pooled``: the C with the fewest errors on the five sets'
valid splits together, the quick start's rule), then scored on each test split from the cache rows (each face as
extract cut it, the crop way): FairFace val with its under-20s apart and its worst race x gender
cell, celeba_15k, and utkface_more with its worst race x gender cell and its Black women. Every
worst cell comes with its 95% Wilson interval; every recipe after the first is set against the
first on FairFace val face by face (the faces only one of the two gets right, and the exact
McNemar p-value: whether the difference is beyond chance). ``--fairface-train 0.25,0.5`` adds a
row per share of FairFace's training faces the head sees (seeded, each gender cut alike; the
others marked failed in copies of its caches): the learning curve over FairFace's train
size. ``--cells`` adds a second table: each row's errors in every FairFace race x gender cell,
to see which cells a recipe (or more training faces) moves. Prints markdown tables::

    python benchmarks/fairface_recipes.py \\
        --recipe "quick start=cache/demo-dlib_resnet-ft/{set}-dlib_resnet.h5" \\
        --recipe "joined=cache/demo-dlib_resnet-ft/{set}-dlib_resnet.h5+cache/{set}-efficientnet_lite0.h5"
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from featgender.cache import read_caches
from featgender.evaluate import evaluate_datasets
from featgender.heads import HeadModel
from featgender.metrics import mcnemar_exact
from featgender.training import train_head

SETS = ("celeba_10k", "celeba_15k", "utkface", "utkface_more", "fairface")
UNDER_20 = ("0-2", "3-9", "10-19")  # FairFace's age groups of children and teenagers


def _recipe(text: str, sets: list[str]) -> tuple[str, list[list[str]]]:
    """'name=a/{set}.h5+b/{set}.h5' as its name and each set's list of caches."""
    name, _, patterns = text.partition("=")
    if not patterns or "{set}" not in patterns:
        raise SystemExit(f"--recipe {text!r}: give NAME=PATH with {{set}} in it (several joined by +)")
    return name, [[pattern.format(set=each) for pattern in patterns.split("+")] for each in sets]


def cell_text(table: dict, group: str | None = None, gender: str | None = None) -> str:
    """The worst cell of a group x gender table (or the one asked for, the group's name in any
    case: FairFace writes 'Black', UTKFace 'black'; '-' where it has under 10 faces) as
    'who k of n (CI)'."""
    cells = [cell for cell in table["cells"] if cell["n"] >= 10]
    if group is None:
        cell = max(cells, key=lambda cell: cell["error_rate"])
    else:
        asked = [cell for cell in cells if cell["group"].lower() == group.lower() and cell["gender"] == gender]
        if not asked:
            return "-"
        cell = asked[0]
    low, high = (100 * value for value in cell["ci95"])
    who = f"{cell['group']} {cell['gender']} " if group is None else ""
    return f"{who}{cell['errors']} of {cell['n']} ({low:.1f}-{high:.1f})"


def _under_20(table: dict) -> str:
    cells = [cell for cell in table["cells"] if cell["group"] in UNDER_20]
    right = 1 - sum(cell["errors"] for cell in cells) / sum(cell["n"] for cell in cells)
    return f"{right:.4f}"


def fairface_right(model: HeadModel, caches: list[str]) -> dict[str, bool]:
    """Whether the model is right on each FairFace val face (its cache rows), by image id."""
    rows = read_caches(caches, "test")
    right = (model.predict_proba(rows.features) >= 0.5).astype(int) == rows.labels
    return dict(zip(rows.ids, right.tolist(), strict=True))


def paired(reference: dict[str, bool], right: dict[str, bool]) -> str:
    """'only the reference / only this one right (McNemar p)' on the faces both scored."""
    faces = reference.keys() & right.keys()
    only_reference = sum(reference[face] and not right[face] for face in faces)
    only_this = sum(right[face] and not reference[face] for face in faces)
    return f"{only_reference} / {only_this} (p {mcnemar_exact(only_reference, only_this):.2g})"


def _valid_score(valid: dict, fairface: int, choose: str) -> float:
    """What C is chosen by: FairFace's valid accuracy, or minus the five sets' valid errors."""
    if choose == "pooled":
        return -round((1 - valid["accuracy"]) * valid["n"])
    return list(valid["datasets"].values())[fairface]["accuracy"]


def recipe_row(
    name: str,
    datasets: list[list[str]],
    sets: list[str],
    grid: list[float],
    reference: dict[str, bool] | None,
    choose: str = "fairface",
    head: str = "logreg",
) -> tuple[str, dict[str, bool], dict]:
    """The table row of one recipe (C chosen on the valid splits as ``choose`` says, then every
    test split, then FairFace val against the ``reference`` recipe's), which FairFace val faces
    it gets right, and FairFace val's race x gender table."""
    fairface = sets.index("fairface")
    first, *stack = datasets
    fitted = {}
    for C in grid:
        model, valid = train_head(first, head, stack=stack, balance="dataset,gender", C=C)
        fitted[C] = (_valid_score(valid, fairface, choose), model, list(valid["datasets"].values())[fairface])
    C = max(grid, key=lambda value: (fitted[value][0], -value))  # the smaller C where valid ties
    _, model, fairface_valid = fitted[C]
    valid_accuracy = fairface_valid["accuracy"]
    tests = list(evaluate_datasets(model, datasets, "test", groups=["race", "age"])["datasets"].values())
    by_set = dict(zip(sets, tests, strict=True))
    ff, utk = by_set["fairface"], by_set["utkface_more"]
    right = fairface_right(model, datasets[fairface])
    row = (
        f"| {name} | {C:g} | {valid_accuracy:.4f} | **{ff['accuracy']:.4f}** "
        f"| {'-' if reference is None else paired(reference, right)} | {_under_20(ff['group_gender']['age'])} "
        f"| {cell_text(ff['group_gender']['race'])} | {by_set['celeba_15k']['accuracy']:.4f} | {utk['accuracy']:.4f} "
        f"| {cell_text(utk['group_gender']['race'])} | {cell_text(utk['group_gender']['race'], 'black', 'women')} |"
    )
    return row, right, ff["group_gender"]["race"]


def cells_table(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown lines: a recipe per row, its errors of n in every FairFace race x gender cell."""
    cells = rows[0][1]["cells"]
    lines = [
        "| recipe | " + " | ".join(f"{cell['group']} {cell['gender']}" for cell in cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for name, table in rows:
        lines.append(f"| {name} | " + " | ".join(f"{cell['errors']} of {cell['n']}" for cell in table["cells"]) + " |")
    return lines


def fairface_share(datasets: list[list[str]], sets: list[str], share: float, folder: str) -> list[list[str]]:
    """The recipe's caches with FairFace's copied into ``folder``, all but ``share`` of its
    training faces of each gender marked failed (the same faces in every joined cache)."""
    paths = datasets[sets.index("fairface")]
    with h5py.File(paths[0], "r") as cache:
        ids, labels, split = cache["ids"][:], cache["labels"][:], cache["split"][:]
    generator = np.random.default_rng(0)
    dropped = set()
    for label in (0, 1):
        train = np.flatnonzero((split == 0) & (labels == label))
        dropped |= set(ids[generator.permutation(train)[round(share * len(train)) :]].tolist())
    copies = []
    for index, path in enumerate(paths):
        copied = str(Path(folder) / f"{index}-{Path(path).name}")
        shutil.copyfile(path, copied)
        with h5py.File(copied, "r+") as cache:
            gone = np.isin(cache["ids"][:], list(dropped))
            features = cache["features"][:]
            features[gone] = np.nan  # how a joined read knows a face failed
            cache["features"][:], cache["valid"][:] = features, cache["valid"][:] & ~gone
        copies.append(copied)
    return [copies if each == "fairface" else caches for each, caches in zip(sets, datasets, strict=True)]


def _grids(texts: list[str], heads: list[str]) -> dict[str, list[float]]:
    """Each head's C values from ``--C`` items: 'VALUES' for every head, 'HEAD=VALUES' for one."""
    grids: dict[str, list[float]] = {}
    for text in texts:
        head, _, values = text.rpartition("=")
        for each in [head] if head else heads:
            grids[each] = [float(value) for value in values.split(",")]
    missing = [head for head in heads if head not in grids]
    if missing:
        raise SystemExit(f"--C: no values for --heads {','.join(missing)}")
    return grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", action="append", required=True, help="NAME=PATH{set}.h5[+PATH{set}.h5...]")
    parser.add_argument("--sets", default=",".join(SETS), help="the sets the head trains on (fairface among them)")
    parser.add_argument(
        "--C",
        action="append",
        help="the head's C values, chosen on the valid splits (default 0.002,0.005,0.01); HEAD=VALUES for one head",
    )
    parser.add_argument("--fairface-train", default="", help="shares of FairFace's training faces: a row for each")
    parser.add_argument("--heads", default="logreg", help="heads with a C (logreg, svm, svm-rbf): a row for each")
    parser.add_argument(
        "--choose",
        choices=("fairface", "pooled"),
        default="fairface",
        help="C by FairFace's valid accuracy, or by the fewest errors on every set's valid split",
    )
    parser.add_argument("--cells", action="store_true", help="then every FairFace race x gender cell, a row each")
    args = parser.parse_args()
    sets = args.sets.split(",")
    heads = args.heads.split(",")
    grids = _grids(args.C or ["0.002,0.005,0.01"], heads)
    print(
        "| recipe | C | FairFace valid | FairFace val | right only for the first row / this one (McNemar p) "
        "| under 20 | worst FairFace race x gender (95% CI) | celeba_15k | utkface_more | its worst race x gender "
        "| its Black women |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    reference = None
    cells = []
    shares = [float(value) for value in args.fairface_train.split(",") if value]
    with tempfile.TemporaryDirectory() as folder:
        for text in args.recipe:
            name, datasets = _recipe(text, sets)
            for head in heads:
                named = name if len(heads) == 1 else f"{name}, {head}"
                row, right, table = recipe_row(named, datasets, sets, grids[head], reference, args.choose, head)
                reference = right if reference is None else reference
                print(row, flush=True)
                cells.append((named, table))
                for share in shares:
                    cut = fairface_share(datasets, sets, share, folder)
                    shared = f"{named}, {share:g} of FairFace train"
                    row, _, table = recipe_row(shared, cut, sets, grids[head], reference, args.choose, head)
                    print(row, flush=True)
                    cells.append((shared, table))
    if args.cells:
        print("\n" + "\n".join(cells_table(cells)))


if __name__ == "__main__":
    main()
