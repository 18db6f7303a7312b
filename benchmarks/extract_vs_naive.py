"""featgender's extraction against a naive per-image loop, on the same images and model, in one run.

The naive loop is what a first script does: PIL open -> torchvision Resize/CenterCrop/
ToTensor/Normalize -> float32 model on one image -> numpy -> np.save. featgender's path is
``build_cache`` (loader workers, device-side preprocessing, batches, channels_last, bf16
autocast where native, crash-safe chunks, HDF5). Both are warmed up first.

    python benchmarks/extract_vs_naive.py [--images 400] [--backbones efficientnet_lite0,resnet50]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from featgender.backbones import build_backbone, get_config, weights_available
from featgender.data import load_dataset
from featgender.extract import build_cache

SHARED_UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "faces" / "utkface"


def naive_loop(backbone, paths, out_dir: Path) -> float:
    """Seconds to embed ``paths`` one image at a time, saving one .npy per image."""
    config = backbone.config
    transform = transforms.Compose(
        [
            transforms.Resize(config.resize_size),
            transforms.CenterCrop(config.input_size),
            transforms.ToTensor(),
            transforms.Normalize(config.mean, config.std),
        ]
    )
    model = backbone.model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for index, path in enumerate(paths):
            image = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            np.save(out_dir / f"{index}.npy", model(image).numpy())
    return time.perf_counter() - start


def featgender_path(backbone, dataset, out: Path) -> float:
    start = time.perf_counter()
    build_cache(dataset, backbone, out, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_UTKFACE)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    dataset = load_dataset(args.data, limit=args.images)
    warmup = load_dataset(args.data, limit=16, seed=1)
    results = []
    for name in args.backbones.split(","):
        weights = "default" if weights_available(get_config(name)) else "none"  # same compute either way
        backbone = build_backbone(name, weights=weights)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            naive_loop(backbone, warmup.paths, tmp)
            featgender_path(backbone, warmup, tmp / "warmup.h5")
            naive_seconds = naive_loop(backbone, dataset.paths, tmp)
            fast_seconds = featgender_path(backbone, dataset, tmp / "cache.h5")
        row = {
            "backbone": name,
            "weights": weights,
            "images": len(dataset),
            "naive_images_per_s": round(len(dataset) / naive_seconds, 1),
            "featgender_images_per_s": round(len(dataset) / fast_seconds, 1),
            "speedup": round(naive_seconds / fast_seconds, 2),
        }
        results.append(row)
        print(json.dumps(row))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(json.dumps(machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
