"""An exported model on onnxruntime against the same model in torch, same cores, same images. One run.

For each backbone: a logreg head fitted on ``--train-limit`` images of ``--data`` (its cache
built here), exported with ``featgender export``; then

1. End to end, what ``featgender predict`` does over ``--images`` held-out faces (decoding,
   the face step or the crop, the network, the head), with ``--faces auto`` (for dlib_resnet:
   photo mode, each face found by dlib's detectors first) and ``--faces crop``: torch at its default precision (bfloat16
   where the CPU computes it natively, as ``predict`` runs) and in float32, then onnxruntime
   (float32). Images per second, best of ``--repeats`` after a warm-up.
2. Network alone (with the head: the exported graph against the torch modules it holds), on
   one prepared batch of ``--batch`` inputs: images per second.

Prints one JSON object; the ratios are onnxruntime's speed over torch's.

    python benchmarks/onnx_runtime.py --data ../shared/faces/utkface --backbones dlib_resnet,efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featgender.data import load_dataset
from featgender.export import export_onnx, exported_module
from featgender.extract import extract_to_cache
from featgender.models import load
from featgender.training import train_head


def best_rate(run, images: int, repeats: int) -> float:
    """Images per second of the fastest of ``repeats`` runs, after one warm-up run."""
    run()
    return images / min(_seconds(run) for _ in range(repeats))


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def end_to_end(model: Path, exported: Path, images: list, faces: str, repeats: int) -> dict:
    """Images per second of ``predict --faces FACES`` in torch and on onnxruntime."""
    rates = {}
    for precision in ("auto", "float32"):
        predictor = load(model, precision=precision)
        rates[f"torch_{precision}"] = best_rate(
            lambda p=predictor: p.predict(images, faces=faces), len(images), repeats
        )
    onnx = load(exported)
    rates["onnxruntime"] = best_rate(lambda: onnx.predict(images, faces=faces), len(images), repeats)
    return rates


def network_alone(model: Path, exported: Path, batch: int, repeats: int) -> dict:
    """Images per second of the network and head on one prepared uint8 batch."""
    network, inputs, _ = exported_module(model)
    network = network.to(memory_format=torch.channels_last)  # as featgender's forward pass runs it
    pixels = torch.randint(0, 256, (batch, 3, inputs[0]["size"], inputs[0]["size"]), dtype=torch.uint8)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    rates = {}
    for precision, autocast in (("auto", True), ("float32", False)):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            rates[f"torch_{precision}"] = best_rate(lambda: network(pixels), batch, repeats)
    session = load(exported).session  # type: ignore[attr-defined]
    feeds = {inputs[0]["name"]: np.ascontiguousarray(pixels.numpy())}
    rates["onnxruntime"] = best_rate(lambda: session.run(None, feeds), batch, repeats)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/faces/utkface")
    parser.add_argument("--backbones", default="dlib_resnet,efficientnet_lite0")
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    # faces the heads were not fitted on (the test split, then the valid split): speed only
    test = [str(path) for path in np.asarray(dataset.paths)[np.argsort(-dataset.splits, kind="stable")][: args.images]]
    results: dict = {"images": len(test), "batch": args.batch, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as folder:
        for backbone in args.backbones.split(","):
            cache, model = Path(folder) / f"{backbone}.h5", Path(folder) / f"{backbone}.joblib"
            extract_to_cache(args.data, backbone=backbone, limit=args.train_limit, out=cache, progress=False)
            train_head(cache, "logreg", eval_split=None, out=model)
            exported = export_onnx(model)
            timings = {
                f"predict_faces_{faces}": end_to_end(model, exported, test, faces, args.repeats)
                for faces in (("auto", "crop") if load(exported).input_kind == "photo" else ("crop",))
            }
            timings["network_and_head"] = network_alone(model, exported, args.batch, args.repeats)
            results[backbone] = {
                stage: {
                    **{key: round(value, 1) for key, value in rates.items()},
                    **{
                        f"ratio_vs_{key}": round(rates["onnxruntime"] / value, 2)
                        for key, value in rates.items()
                        if key != "onnxruntime"
                    },
                }
                for stage, rates in timings.items()
            }
            results[backbone]["onnx_mb"] = round(exported.stat().st_size / 1e6, 1)
            print(json.dumps({backbone: results[backbone]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
