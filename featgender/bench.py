"""Benchmarks of every stage on the user's own hardware: ``featgender bench``.

Times image decoding, preprocessing, the forward pass and the end-to-end cache write
(images/s), each head's fit (s) and prediction (ms/image) with its test accuracy, and
optionally the fine-tune path (s/epoch); each after a warm-up run, repeated, reported as
median with min-max spread, with peak memory and the machine's description. Writes
results.json, results.md and an accuracy-vs-cost plot.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from featgender.backbones import build_backbone
from featgender.cache import library_versions
from featgender.data import FaceDataset, load_dataset
from featgender.defaults import DEFAULT_BACKBONE
from featgender.embed import default_batch_size, resolve_device, uses_bfloat16
from featgender.extract import build_cache, finding_faces_in
from featgender.files import check_writable_folder
from featgender.heads import fit_head
from featgender.images import load_image
from featgender.metrics import classification_metrics, group_gender_errors
from featgender.mixing import balance_weights, read_datasets, stack_rows


def machine_info() -> dict:
    """CPU, cores, GPU and library versions, recorded with every result."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        **library_versions(),
    }


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (and peak CUDA memory) so far, in MiB."""
    peak = {"cpu_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def timed(function: Callable[[], object], repeats: int) -> dict:
    """Seconds of ``function``: one warm-up run (not counted), then median and spread of ``repeats``."""
    function()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        runs.append(time.perf_counter() - started)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs": len(runs)}


def _per_second(timing: dict, count: int) -> dict:
    return {
        "images_per_s": round(count / timing["median_s"], 1),
        "spread_images_per_s": [round(count / timing["max_s"], 1), round(count / timing["min_s"], 1)],
    }


def bench_backbone(
    datasets: Sequence[FaceDataset],
    name: str,
    *,
    weights: str,
    device: str | torch.device,
    repeats: int,
    sample: int,
    caches: Sequence[Path],
) -> dict:
    """Stage timings of one backbone on ``sample`` images of the first dataset, then each whole
    dataset into its cache (each with faces found where they sit in its images)."""
    backbone, _ = finding_faces_in(datasets[0], build_backbone(name, weights=weights))
    device = resolve_device(device)
    paths = datasets[0].paths[:sample]
    images = [load_image(path, backbone.config.resize_size) for path in paths]
    batch = default_batch_size(device)
    transform = backbone.transform.to(device)
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    stages = {
        "decode": _per_second(
            timed(lambda: [load_image(p, backbone.config.resize_size) for p in paths], repeats), len(paths)
        )
    }
    step = transform.loader_step
    if step is not None:  # per image on the loader workers (face alignment)
        stages["align"] = _per_second(timed(lambda: [step(image) for image in images], repeats), len(paths))
        images = [step(image) for image in images]

    def preprocess():
        return [transform([image.to(device) for image in images[i : i + batch]]) for i in range(0, len(images), batch)]

    prepared = preprocess()
    autocast = uses_bfloat16("auto", device)  # as extraction runs it

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            outputs = [model(pixels) for pixels in prepared]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return outputs

    stages["preprocess"] = _per_second(timed(preprocess, repeats), len(paths))
    stages["forward"] = _per_second(timed(forward, repeats), len(paths))
    started = time.perf_counter()
    for dataset, cache in zip(datasets, caches, strict=True):
        own = backbone if dataset is datasets[0] else finding_faces_in(dataset, backbone)[0]
        build_cache(dataset, own, cache, device=str(device), overwrite=True, progress=False)
    images_total = sum(len(dataset) for dataset in datasets)
    stages["extract_to_cache"] = {
        "images_per_s": round(images_total / (time.perf_counter() - started), 1),
        "images": images_total,
    }
    return {"backbone": name, "weights": backbone.weights.name, "stages": stages, **peak_memory_mb()}


def bench_head(caches: Sequence[Path], head: str, repeats: int, balance: str | None = None) -> dict:
    """Fit time, prediction time and test accuracy of one head trained on the train splits of
    ``caches`` (one per dataset, stacked, weighted per ``balance``); with several datasets, each
    one's test accuracy too. The worst group x gender cell of each attribute, per dataset."""
    train = read_datasets(caches, "train")
    test = read_datasets(caches, "test")
    features, labels = stack_rows(train)
    weights = balance_weights(train, balance)
    test_features, test_labels = stack_rows(test)
    fitted = {}

    def fit():
        fitted["pipeline"] = fit_head(features, labels, head, sample_weight=weights)[0]

    fit_timing = timed(fit, repeats)
    predict_timing = timed(lambda: fitted["pipeline"].predict_proba(test_features), repeats)
    scores = fitted["pipeline"].predict_proba(test_features)[:, 1]
    predicted = (scores >= 0.5).astype(int)
    metrics = classification_metrics(test_labels, predicted, scores)
    bounds = np.cumsum([0] + [len(part.rows.labels) for part in test])
    own = {part.name: predicted[start:stop] for part, start, stop in zip(test, bounds[:-1], bounds[1:], strict=True)}
    worst = {
        part.name: {
            attribute: table["worst"] for attribute, table in group_gender_errors(part.rows, own[part.name]).items()
        }
        for part in test
    }
    row = {
        "head": head,
        "fit_s": round(fit_timing["median_s"], 3),
        "fit_spread_s": [round(fit_timing["min_s"], 3), round(fit_timing["max_s"], 3)],
        "predict_ms_per_image": round(predict_timing["median_s"] / max(len(test_labels), 1) * 1000, 4),
        "test_accuracy": metrics["accuracy"],
        "test_images": metrics["n"],
        "worst_group_gender": worst[test[0].name] if len(test) == 1 else worst,
        **peak_memory_mb(),
    }
    if len(test) > 1:
        row["datasets_test_accuracy"] = {part.name: float((own[part.name] == part.rows.labels).mean()) for part in test}
    return row


def bench_finetune(
    data: Sequence[str | Path],
    backbone: str,
    *,
    weights: str,
    device: str,
    limit: int | None,
    balance: str | None = None,
    epochs: int = 1,
) -> dict:
    """Seconds per epoch and test accuracy of the fine-tune path (on every dataset of ``data``):
    the backbone's measured recipe where it has one (:func:`featgender.finetune.recipe`, the
    quick start's), else ``epochs`` at ``finetune``'s defaults."""
    from featgender.finetune import finetune, recipe

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = finetune(
            data,
            backbone=backbone,
            weights=weights,
            device=device,
            limit=limit,
            balance=balance,
            out=Path(tmp) / "ft.pt",
            progress=False,
            **{"epochs": epochs, **recipe(backbone, limit)},
        )
        seconds = time.perf_counter() - started
    row = {
        "backbone": backbone,
        "epochs": len(result.history),
        "s_per_epoch": round(seconds / len(result.history), 2),
        "test_accuracy": result.test.get("accuracy"),
        **peak_memory_mb(),
    }
    own = result.test.get("datasets", {"": result.test})
    worst = {name: _worst_per_attribute(evaluation) for name, evaluation in own.items()}
    row["worst_group_gender"] = worst[""] if "" in worst else worst
    if "" not in own:
        row["datasets_test_accuracy"] = {name: evaluation["accuracy"] for name, evaluation in own.items()}
    return row


def _worst_per_attribute(evaluation: dict) -> dict:
    """An evaluation's worst group x gender cell of each attribute."""
    return {attribute: table["worst"] for attribute, table in evaluation.get("group_gender", {}).items()}


def run_bench(
    data: str | Path | Sequence[str | Path],
    *,
    backbones: Sequence[str] = (DEFAULT_BACKBONE,),
    heads: Sequence[str] = ("logreg", "svm"),
    finetune: bool = False,
    balance: str | None = None,
    weights: str = "default",
    device: str = "auto",
    limit: int | None = None,
    repeats: int = 3,
    sample: int = 64,
    out: str | Path | None = None,
) -> dict:
    """Benchmark backbones × heads (and optionally fine-tuning) on ``data``, one dataset or
    several (heads and the fine-tuned network trained on all of them, weighted per ``balance``
    as ``fit --balance``); write a report to ``out``."""
    if out is not None:
        check_writable_folder(out, "--out")
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    datasets = [load_dataset(path, limit=limit) for path in paths]
    results: dict = {
        "machine": machine_info(),
        "data": ", ".join(map(str, paths)),
        "images": sum(len(dataset) for dataset in datasets),
        "balance": balance or "none",
        "backbones": [],
        "heads": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in backbones:
            caches = [Path(tmp) / f"{index}-{dataset.name}-{name}.h5" for index, dataset in enumerate(datasets)]
            results["backbones"].append(
                bench_backbone(
                    datasets,
                    name,
                    weights=weights,
                    device=device,
                    repeats=repeats,
                    sample=min(sample, len(datasets[0])),
                    caches=caches,
                )
            )
            for head in heads:
                results["heads"].append({"backbone": name, **bench_head(caches, head, repeats, balance)})
    if finetune:
        results["finetune"] = bench_finetune(
            paths, backbones[0], weights=weights, device=device, limit=limit, balance=balance
        )
    if out is not None:
        write_bench_report(results, out)
    return results


def write_bench_report(results: dict, folder: str | Path) -> list[Path]:
    """results.json, results.md and (with matplotlib) accuracy_vs_cost.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    speed = {row["backbone"]: row["stages"]["extract_to_cache"]["images_per_s"] for row in results["backbones"]}
    lines = [
        f"# featgender bench: {results['data']} ({results['images']} images; balance: "
        f"{results.get('balance', 'none')})",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} threads, "
        f"GPU {results['machine']['gpu'] or 'none'}, torch {results['machine']['torch']}.",
        "",
        "| backbone | head | test accuracy | worst group x gender (error) | fit (s) | predict (ms/image) | "
        "extraction (images/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["heads"]:
        accuracy = f"{row['test_accuracy']:.4f}" + "".join(
            f"; {name} {value:.4f}" for name, value in row.get("datasets_test_accuracy", {}).items()
        )
        lines.append(
            f"| {row['backbone']} | {row['head']} | {accuracy} | {_worst_cells(row)} | {row['fit_s']:.3f} | "
            f"{row['predict_ms_per_image']:.4f} | {speed[row['backbone']]} |"
        )
    if "finetune" in results:
        ft = results["finetune"]
        accuracy = f"{ft['test_accuracy']:.4f}" if ft["test_accuracy"] is not None else "–"
        accuracy += "".join(f"; {name} {value:.4f}" for name, value in ft.get("datasets_test_accuracy", {}).items())
        lines.append(
            f"| {ft['backbone']} | fine-tuned end to end | {accuracy} | {_worst_cells(ft)} | "
            f"{ft['s_per_epoch']} per epoch | – | – |"
        )
    lines += [
        "",
        "Stages (images/s, median of repeats after a warm-up):",
        "",
        "| backbone | stage | images/s |",
        "|---|---|---|",
    ]
    for row in results["backbones"]:
        for stage, values in row["stages"].items():
            lines.append(f"| {row['backbone']} | {stage} | {values['images_per_s']} |")
    written = [folder / "results.json", folder / "results.md"]
    written[1].write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    figure, axes = plt.subplots(figsize=(6, 4))
    for row in results["heads"]:
        cost = row["fit_s"] + results["images"] / speed[row["backbone"]]
        axes.scatter(cost, row["test_accuracy"])
        axes.annotate(f"{row['backbone']} + {row['head']}", (cost, row["test_accuracy"]), fontsize=7)
    if "finetune" in results and results["finetune"]["test_accuracy"] is not None:
        ft = results["finetune"]
        axes.scatter(ft["s_per_epoch"] * ft["epochs"], ft["test_accuracy"], marker="*", s=120)
        axes.annotate(
            f"{ft['backbone']} fine-tuned", (ft["s_per_epoch"] * ft["epochs"], ft["test_accuracy"]), fontsize=7
        )
    axes.set(xscale="log", xlabel="cost: extraction + fit (s)", ylabel="test accuracy", title="Accuracy vs cost")
    figure.tight_layout()
    figure.savefig(folder / "accuracy_vs_cost.png", dpi=120)
    plt.close(figure)
    return written + [folder / "accuracy_vs_cost.png"]


def _worst_cells(row: dict) -> str:
    """A head's worst group x gender cells (per dataset, with several) as one table cell."""
    worst = row.get("worst_group_gender", {})
    tables = worst.items() if "datasets_test_accuracy" in row else [("", worst)]
    return (
        "; ".join(
            f"{dataset + ' ' if dataset else ''}{attribute}: {cell['group']} {cell['gender']} "
            f"{cell['error_rate']:.1%} (n={cell['n']})"
            for dataset, table in tables
            for attribute, cell in table.items()
            if cell
        )
        or "–"
    )
