"""dlib_resnet: the face network in torch against dlib's own one-image-at-a-time loop, one run.

The naive loop is what the face_recognition package does per image: decode, 5 landmarks
in the face box, the aligned chip (``get_face_chip``), dlib's ``compute_face_descriptor``,
one image at a time in one process. featgender's path is ``featgender extract --backbone
dlib_resnet`` (face box calibrated, alignment on the loader workers, the network batched in
torch). Both embed the same images, the same way (landmarks in the same calibrated box),
after a warm-up; then featgender's time per stage and images/s per loader-worker count.

    python benchmarks/face_resnet.py [--images 1000] [--all-images 8000] [--workers 1,2]
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

from featgender.backbones import build_backbone
from featgender.data import load_dataset
from featgender.extract import extract_to_cache
from featgender.faces import calibrate_face_box, dlib_model_file
from featgender.images import decode_image, load_image

SHARED_UTKFACE = Path(__file__).resolve().parents[2] / "shared" / "faces" / "utkface"


def naive_loop(paths, box, out_dir: Path) -> float:
    """Seconds for decode -> landmarks -> chip -> dlib descriptor -> np.save, image by image."""
    import dlib

    landmarks = dlib.shape_predictor(str(dlib_model_file("landmarks")))
    network = dlib.face_recognition_model_v1(str(dlib_model_file("recognition")))
    start = time.perf_counter()
    for index, path in enumerate(paths):
        pixels = decode_image(path)
        height, width = pixels.shape[:2]
        rect = dlib.rectangle(int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height))
        chip = dlib.get_face_chip(pixels, landmarks(pixels, rect), size=150, padding=0.25)
        np.save(out_dir / f"{index}.npy", np.asarray(network.compute_face_descriptor(chip), dtype=np.float32))
    return time.perf_counter() - start


def featgender_seconds(data: Path, limit: int, out: Path, **options) -> float:
    start = time.perf_counter()
    extract_to_cache(data, backbone="dlib_resnet", limit=limit, out=out, progress=False, **options)
    return time.perf_counter() - start


def stage_ms(paths, box) -> dict:
    """Milliseconds per image of each stage, one core for decode and alignment."""
    backbone = build_backbone("dlib_resnet", face_box=box)
    started = time.perf_counter()
    images = [load_image(path, backbone.config.resize_size) for path in paths]
    decode = time.perf_counter() - started
    started = time.perf_counter()
    chips = torch.stack([backbone.transform.loader_step(image) for image in images])
    align = time.perf_counter() - started
    model = backbone.model.to(memory_format=torch.channels_last)
    batches = [backbone.transform(chips[i : i + 8]) for i in range(0, len(chips), 8)]
    with torch.inference_mode():
        model(batches[0])
        started = time.perf_counter()
        for batch in batches:
            model(batch)
        network = time.perf_counter() - started
    count = len(paths)
    return {
        "decode_ms": round(1000 * decode / count, 2),
        "landmarks_and_chip_ms": round(1000 * align / count, 2),
        "network_ms_per_chip": round(1000 * network / count, 2),
        "network_chips_per_s": round(count / network, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_UTKFACE)
    parser.add_argument("--images", type=int, default=1000, help="images of the naive-loop comparison")
    parser.add_argument("--all-images", type=int, default=8000, help="images of the whole-dataset run")
    parser.add_argument("--workers", default="1,2", help="loader-worker counts to time")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    dataset = load_dataset(args.data, limit=args.images)
    box = calibrate_face_box(dataset.paths)
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "face_box": box,
        "stages": stage_ms(dataset.paths[:256], box),
    }
    print(json.dumps(results), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        naive_loop(dataset.paths[:16], box, tmp)  # warm-ups
        featgender_seconds(args.data, 16, tmp / "warmup.h5")
        naive = naive_loop(dataset.paths, box, tmp)
        ours = featgender_seconds(args.data, args.images, tmp / "same.h5")
        results["versus_naive"] = {
            "images": len(dataset),
            "naive_images_per_s": round(len(dataset) / naive, 1),
            "featgender_images_per_s": round(len(dataset) / ours, 1),
            "speedup": round(naive / ours, 2),
        }
        print(json.dumps(results["versus_naive"]), flush=True)
        results["whole_dataset"] = []
        for workers in map(int, args.workers.split(",")):
            seconds = featgender_seconds(args.data, args.all_images, tmp / f"all-{workers}.h5", workers=workers)
            row = {
                "images": args.all_images,
                "workers": workers,
                "seconds": round(seconds, 1),
                "images_per_s": round(args.all_images / seconds, 1),
            }
            results["whole_dataset"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
