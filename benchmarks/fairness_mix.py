"""Which training mix errs as rarely for darker-skinned women as for anyone: one run, every mix.

Each ``--mix LABEL=NAME[+NAME...][:BALANCE][@HEAD]`` trains one head (default logreg) on the
train splits of the named datasets' caches (``fit --cache A --stack B``), weighted by BALANCE
(``fit --balance``; default none), and scores it on the test split of every ``--data``
dataset. Printed per mix: each dataset's test accuracy (95% CI), and on the UTKFace test
splits pooled, the error per race x gender with its worst cell and the black women's error
(95% Wilson interval): our proxy for the held-out portrait benchmark (skin type x gender).

``--finetuned LABEL=MODEL.pt`` adds the row of a fine-tuned network (``featgender finetune
--data A --data B ...``), scored from the images of each dataset's test split (the dataset a
cache was extracted from), as ``featgender evaluate --data`` scores it.

    python benchmarks/fairness_mix.py --data utkface=cache/utkface-dlib_resnet.h5 \\
        --data celeba_10k=cache/celeba_10k-dlib_resnet.h5 \\
        --mix celeba=celeba_10k --mix both=celeba_10k+utkface:dataset,gender
"""

from __future__ import annotations

import argparse
import time

import torch

from featgender.cache import read_metadata
from featgender.evaluate import evaluate_datasets, evaluate_images
from featgender.metrics import wilson_interval
from featgender.training import train_head


def pooled_cells(evaluations: list[dict], attribute: str = "race") -> dict[tuple[str, str], list[int]]:
    """(group, gender) -> [errors, n] summed over the evaluations that have ``attribute``."""
    cells: dict[tuple[str, str], list[int]] = {}
    for evaluation in evaluations:
        for cell in evaluation.get("group_gender", {}).get(attribute, {}).get("cells", []):
            total = cells.setdefault((cell["group"], cell["gender"]), [0, 0])
            total[0] += cell["errors"]
            total[1] += cell["n"]
    return cells


def rate(errors: int, n: int) -> str:
    low, high = wilson_interval(errors, n)
    return f"{errors / n:.1%} ({low:.1%}–{high:.1%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True, help="NAME=CACHE")
    parser.add_argument("--mix", action="append", default=[], help="LABEL=NAME[+NAME...][:BALANCE][@HEAD]")
    parser.add_argument("--finetuned", action="append", help="LABEL=MODEL.pt, fine-tuned on several datasets")
    parser.add_argument("--utk", default="utkface,utkface_more", help="datasets whose race x gender cells are pooled")
    args = parser.parse_args()
    caches = dict(entry.split("=", 1) for entry in args.data)
    utk = [name for name in args.utk.split(",") if name in caches]
    header = (
        ["mix", "balance", "head", "fit s"]
        + [f"{name} acc" for name in caches]
        + ["UTK worst cell", "UTK black women", "UTK black men", "UTK white women"]
    )
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for entry in args.mix:
        label, spec = entry.split("=", 1)
        spec, _, head = spec.partition("@")
        names, _, balance = spec.partition(":")
        names = names.split("+")
        started = time.perf_counter()
        model, _ = train_head(
            caches[names[0]],
            head or "logreg",
            stack=[caches[name] for name in names[1:]],
            balance=balance or None,
            eval_split=None,
        )
        seconds = time.perf_counter() - started
        results = {name: evaluate_datasets(model, [path], "test") for name, path in caches.items()}
        print(
            row([label, balance or "none", head or "logreg", f"{seconds:.1f}"], results, list(caches), utk), flush=True
        )
    for entry in args.finetuned or []:
        label, path = entry.split("=", 1)
        settings = torch.load(path, map_location="cpu", weights_only=True)
        started = time.perf_counter()
        results = {
            name: evaluate_images(path, read_metadata(cache)["dataset_root"], split="test", progress=False)
            for name, cache in caches.items()
        }
        seconds = time.perf_counter() - started
        how = f"fine-tuned (last {settings['config']['unfreeze_last']} blocks, best epoch {settings['best_epoch']})"
        balance = ",".join(settings["config"].get("balance") or []) or "none"
        print(row([label, balance, how, f"{seconds:.0f} (test)"], results, list(caches), utk), flush=True)


def row(first: list[str], results: dict[str, dict], names: list[str], utk: list[str]) -> str:
    """One table row: ``first`` cells, each dataset's test accuracy (95% CI), the UTK cells."""
    accuracies = [
        f"{results[name]['accuracy']:.4f} ({results[name]['ci95']['accuracy'][0]:.4f}–"
        f"{results[name]['ci95']['accuracy'][1]:.4f})"
        if name in results
        else "–"
        for name in names
    ]
    cells = pooled_cells([results[name] for name in utk if name in results])
    sized = {key: value for key, value in cells.items() if value[1] >= 20}
    worst = max(sized, key=lambda key: sized[key][0] / sized[key][1]) if sized else None
    fairness = [f"{worst[0]} {worst[1]} {rate(*sized[worst])}" if worst else "–"] + [
        rate(*cells[key]) if key in cells else "–" for key in (("black", "women"), ("black", "men"), ("white", "women"))
    ]
    return "| " + " | ".join([*first, *accuracies, *fairness]) + " |"


if __name__ == "__main__":
    main()
