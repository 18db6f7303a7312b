"""Which layer carries the signal: one backbone's layers probed with heads, and what embedding
several layers in one pass saves. One run.

1. Cost (on ``--cost-limit`` images): ``extract --layer A --layer B ...`` (one pass) against one
   extraction per layer, wall-clock, same process, same images; the ratio is the sum of the
   single-layer times over the one-pass time (k layers: k at best).
2. Probe (the whole dataset, one pass for every layer): each layer x head fitted on the train
   split, test accuracy with its bootstrap 95% CI, fit time, feature width; a plot of accuracy
   against depth (``--out``).

    python benchmarks/layer_probe.py --data ../shared/faces/celeba_15k --backbone dlib_resnet \\
        --layers blocks.3,blocks.7,blocks.10,blocks.13,descriptor --heads logreg --out bench/probe-dlib
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from featgender.evaluate import evaluate_model
from featgender.extract import extract_layers, extract_to_cache
from featgender.layers import list_layers
from featgender.training import train_head


def one_pass_against_separate(data: str, backbone: str, layers: list[str], limit: int, folder: Path) -> dict:
    """Seconds of one multi-layer extraction and of one extraction per layer, on ``limit`` images,
    after a warm-up extraction (not counted: the images enter the page cache, the weights load)."""
    extract_to_cache(data, backbone=backbone, limit=limit, out=folder / "warm-up.h5", progress=False)
    started = time.perf_counter()
    extract_layers(data, backbone=backbone, layers=layers, limit=limit, out=folder / "one@{layer}.h5", progress=False)
    together = time.perf_counter() - started
    separate = {}
    for layer in layers:
        started = time.perf_counter()
        extract_to_cache(
            data, backbone=backbone, layer=layer, limit=limit, out=folder / f"alone@{layer}.h5", progress=False
        )
        separate[layer] = time.perf_counter() - started
    return {
        "images": limit,
        "one_pass_s": round(together, 1),
        "separate_s": {k: round(v, 1) for k, v in separate.items()},
        "ratio": round(sum(separate.values()) / together, 2),
        "layers": len(layers),
    }


def probe(data: str, backbone: str, layers: list[str], heads: list[str], folder: Path) -> list[dict]:
    """Each layer x head: test accuracy (95% CI), fit seconds, width; the layers from one pass."""
    started = time.perf_counter()
    caches = extract_layers(data, backbone=backbone, layers=layers, out=folder / "probe@{layer}.h5")
    extraction = time.perf_counter() - started
    depth = {layer.name: index for index, layer in enumerate(list_layers(backbone))}
    rows = []
    for layer, cache in zip(layers, caches, strict=True):
        for head in heads:
            model, _ = train_head(cache.path, head, eval_split=None)
            test = evaluate_model(model, cache.path, split="test")
            rows.append(
                {
                    "layer": layer,
                    "depth": depth.get(layer),
                    "head": head,
                    "dim": model.feature_dim,
                    "fit_s": model.training["fit_seconds"],
                    "accuracy": test["accuracy"],
                    "ci95": test["ci95"]["accuracy"],
                    "test_images": test["n"],
                    "extraction_s_all_layers": round(extraction, 1),
                }
            )
    return rows


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    for head in sorted({row["head"] for row in results["probe"]}):
        rows = [row for row in results["probe"] if row["head"] == head]
        axes.errorbar(
            range(len(rows)),
            [row["accuracy"] for row in rows],
            yerr=[
                [row["accuracy"] - row["ci95"][0] for row in rows],
                [row["ci95"][1] - row["accuracy"] for row in rows],
            ],
            marker="o",
            capsize=3,
            label=head,
        )
        axes.set_xticks(range(len(rows)), [row["layer"] for row in rows], rotation=30, ha="right", fontsize=8)
    axes.set(
        ylabel="test accuracy (95% CI)",
        title=f"{results['backbone']} on {Path(results['data']).name}: accuracy by layer (input to output)",
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "accuracy_by_layer.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--layers", required=True, help="comma-separated, input to output")
    parser.add_argument("--heads", default="logreg")
    parser.add_argument("--cost-limit", type=int, default=2000, help="images for the one-pass cost (0: skip)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cost-only", action="store_true", help="measure the cost, not the probe table")
    args = parser.parse_args()
    layers, heads = args.layers.split(","), args.heads.split(",")
    results = {"data": args.data, "backbone": args.backbone, "layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        if args.cost_limit:
            results["cost"] = one_pass_against_separate(args.data, args.backbone, layers, args.cost_limit, Path(tmp))
            print(json.dumps(results["cost"]), flush=True)
        if args.cost_only:
            print(json.dumps(results), flush=True)
            return
        results["probe"] = probe(args.data, args.backbone, layers, heads, Path(tmp))
    for row in results["probe"]:
        low, high = row["ci95"]
        print(
            f"| {row['layer']} | {row['head']} | {row['dim']} | {row['accuracy']:.4f} ({low:.4f}–{high:.4f}) | "
            f"{row['fit_s']:.2f} |",
            flush=True,
        )
    write(results, args.out)


if __name__ == "__main__":
    main()
