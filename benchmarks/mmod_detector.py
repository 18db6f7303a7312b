"""dlib's CNN face detector in torch (featgender.faces.mmod) against dlib's own, on the same
pictures, in one run (issue #29): pictures per second, and whether the boxes agree.

Pictures from ../shared/faces: CelebA's 178 x 218 faces, UTKFace crops cut tight and resized to
224 (faces filling the frame, where HOG misses and the CNN runs), and 640 x 480 portraits
(a UTKFace face pasted into a blurred scene). Each detector runs at upsample 0 on every
picture; dlib on one thread per core (``DLIB_NUM_THREADS=0``, as featgender runs it), torch
one picture at a time on one thread per core, and batched (pictures of one size) on all
cores::

    python benchmarks/mmod_detector.py [--pictures 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from featgender.defaults import cores
from featgender.faces import dlib_model_file
from featgender.faces.mmod import MMODDetector

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "faces"


def pictures(kind: str, count: int) -> list[np.ndarray]:
    if kind == "celeba 178x218":
        paths = sorted((SHARED / "celeba_15k" / "img_align_celeba").glob("*.jpg"))[:count]
        return [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    faces = [Image.open(path).convert("RGB") for path in sorted((SHARED / "utkface" / "images").glob("*.jpg"))[:count]]
    if kind == "tight crops 224":
        return [np.asarray(face.crop((40, 40, 160, 160)).resize((224, 224))) for face in faces]
    scenes = []
    for face in faces:
        scene = face.resize((640, 480)).filter(ImageFilter.GaussianBlur(30))
        scene.paste(face.resize((200, 200)), (220, 140))
        scenes.append(np.asarray(scene))
    return scenes


def per_second(detect, images: list[np.ndarray], threads: int) -> tuple[float, list]:
    detect(images[0])  # load, warm up
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(detect, images))
    return len(images) / (time.perf_counter() - start), found


def within_a_pixel(boxes: list, other: list) -> bool:
    return len(boxes) == len(other) and all(
        max(abs(a - b) for a, b in zip(box, other_box, strict=True)) <= 1
        for box, other_box in zip(boxes, other, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("DLIB_NUM_THREADS", "0")
    import dlib

    net = dlib.cnn_face_detection_model_v1(str(dlib_model_file("cnn_detector")))
    ours = MMODDetector(device=args.device)
    threads = cores()

    def dlib_boxes(image):
        return sorted((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in net(image, 0))

    def torch_boxes(image):
        torch.set_num_threads(1)  # one picture per thread, as the face step runs it
        return sorted(ours(image))

    print(f"{threads} cores, torch {torch.__version__}, dlib {dlib.__version__}, device {args.device}")
    print("| pictures | dlib (img/s) | torch, a picture per thread | torch, batched | speed-up | boxes within 1 px |")
    print("|---|---|---|---|---|---|")
    for kind in ("celeba 178x218", "tight crops 224", "portraits 640x480"):
        images = [np.ascontiguousarray(image) for image in pictures(kind, args.pictures)]
        dlib_rate, dlib_found = per_second(dlib_boxes, images, threads)
        torch_rate, torch_found = per_second(torch_boxes, images, threads)
        torch.set_num_threads(threads)
        ours.detect(images[:2])
        start = time.perf_counter()
        ours.detect(images)
        batched_rate = len(images) / (time.perf_counter() - start)
        agree = sum(map(within_a_pixel, dlib_found, torch_found))
        best = max(torch_rate, batched_rate)
        print(
            f"| {kind} | {dlib_rate:.1f} | {torch_rate:.1f} | {batched_rate:.1f} | {best / dlib_rate:.1f}x "
            f"| {agree}/{len(images)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
