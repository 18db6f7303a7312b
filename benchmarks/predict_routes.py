"""`featgender predict` with its default options against `featgender extract` of the same
images, per kind of folder, with accuracy beside each (issue #29).

Folders are made from ../shared/faces/utkface_more and celeba_15k (people the model below
never saw: it trains on utkface's own faces), in class folders (female/, male/):

- aligned: UTKFace's own 200 x 200 crops;
- tight: the central 55-75 % of those, shifted a little and resized to 96-260 px (faces that
  fill the frame, as FairFace's 0.25-margin crops; HOG misses most of them);
- celeba_tight: CelebA's faces cut to 130 px and resized to 200;
- portrait: a crop pasted at a third to half of a 480-800 px blurred scene;
- group: 3-5 faces on a 1024 x 640 canvas (accuracy of the largest face).

Each command runs as a whole process (start-up included), all in one run, one after another::

    python benchmarks/predict_routes.py --model models/demo-dlib_resnet-logreg.joblib [--images 400]
    PYTHONPATH=/path/to/old/checkout python benchmarks/predict_routes.py ...   # the code before
"""

from __future__ import annotations

import argparse
import csv
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageFilter

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "faces"


def _utk_rows(count: int, offset: int) -> list[dict]:
    rows = list(csv.DictReader(open(SHARED / "utkface_more" / "labels.csv")))
    random.Random(0).shuffle(rows)
    return rows[offset : offset + count]


def _save(image: Image.Image, folder: Path, gender: str, index: int) -> None:
    (folder / gender).mkdir(parents=True, exist_ok=True)
    image.save(folder / gender / f"{index:05d}.jpg", quality=90)


def make_folders(root: Path, images: int) -> dict[str, Path]:
    """The five folders under ``root``, ``images`` faces each (a tenth as many group photos)."""
    rng = random.Random(0)
    folders = {kind: root / kind for kind in ("aligned", "tight", "celeba_tight", "portrait", "group")}
    for index, row in enumerate(_utk_rows(images, 0)):
        face = Image.open(SHARED / "utkface_more" / row["image"]).convert("RGB")
        _save(face, folders["aligned"], row["gender"], index)
        side, x, y = 200 * rng.uniform(0.55, 0.75), 100 + rng.uniform(-8, 8), 100 + rng.uniform(-8, 8)
        tight = face.crop(tuple(round(v) for v in (x - side / 2, y - side / 2, x + side / 2, y + side / 2)))
        size = rng.randint(96, 260)
        _save(tight.resize((size, size)), folders["tight"], row["gender"], index)
    lines = (SHARED / "celeba_15k" / "list_attr_celeba.txt").read_text().splitlines()
    male = lines[1].split().index("Male")
    celeba = [line.split() for line in lines[2:] if line.strip()]
    rng.shuffle(celeba)
    for index, fields in enumerate(celeba[:images]):
        face = Image.open(SHARED / "celeba_15k" / "img_align_celeba" / fields[0]).convert("RGB")
        gender = "male" if fields[1 + male] == "1" else "female"
        _save(face.crop((24, 50, 154, 180)).resize((200, 200)), folders["celeba_tight"], gender, index)
    for index, row in enumerate(_utk_rows(images, images)):
        face = Image.open(SHARED / "utkface_more" / row["image"]).convert("RGB")
        width, height = rng.choice([(480, 640), (640, 480), (600, 800)])
        scene = face.resize((width, height)).filter(ImageFilter.GaussianBlur(30))
        side = int(min(width, height) * rng.uniform(0.3, 0.5))
        scene.paste(face.resize((side, side)), (rng.randint(0, width - side), rng.randint(0, height - side)))
        _save(scene, folders["portrait"], row["gender"], index)
    for index in range(max(images // 10, 1)):
        rows = _utk_rows(5, 2 * images + 5 * index)[: rng.randint(3, 5)]
        canvas = Image.new("RGB", (1024, 640), (90, 100, 110))
        sides = [rng.randint(110, 150) for _ in rows]
        sides[0] = 180  # the largest face, whose label is the photo's
        for position, (row, side) in enumerate(zip(rows, sides, strict=True)):
            face = Image.open(SHARED / "utkface_more" / row["image"]).convert("RGB").resize((side, side))
            canvas.paste(face, (20 + position * 200, rng.randint(20, 640 - side - 20)))
        _save(canvas, folders["group"], rows[0]["gender"], index)
    return folders


def _timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout


def _accuracy(stdout: str) -> tuple[float, int, dict[str, int]]:
    """Accuracy over the folder's images (unclassified ones count as wrong), their count, routes."""
    lines = [line.split("\t") for line in stdout.splitlines() if "\t" in line]
    right = sum(Path(fields[0]).parent.name == fields[1] for fields in lines)
    routes: dict[str, int] = {}
    for fields in lines:
        route = fields[3] if len(fields) > 3 and not fields[3].startswith("box=") else "-"
        routes[route] = routes.get(route, 0) + 1
    return right, len(lines), routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--kinds", default="aligned,tight,celeba_tight,portrait,group")
    args = parser.parse_args()
    featgender = [sys.executable, "-m", "featgender"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_folders(Path(tmp), args.images)
        columns = ("folder", "images", "extract", "predict (defaults)", "routes", "accuracy", "predict --faces crop")
        print("| " + " | ".join(columns) + " | accuracy |")
        print("|---" * (len(columns) + 1) + "|")
        for kind in args.kinds.split(","):
            folder = folders[kind]
            count = sum(1 for _ in folder.rglob("*.jpg"))
            extract_options = ["-b", "dlib_resnet", "--data", str(folder), "-o", f"{tmp}/{kind}.h5"]
            if kind == "group":
                extract_options += ["--faces", "photo"]
            extract, _ = _timed(featgender + ["extract", *extract_options])
            predicted, stdout = _timed(featgender + ["predict", "--model", args.model, str(folder)])
            right, _, routes = _accuracy(stdout)
            crop, crop_stdout = _timed(featgender + ["predict", "--model", args.model, "--faces", "crop", str(folder)])
            crop_right, _, _ = _accuracy(crop_stdout)
            print(
                f"| {kind} | {count} | {extract:.1f} s | {predicted:.1f} s ({predicted / extract:.2f}x) | "
                f"{', '.join(f'{k} {v}' for k, v in sorted(routes.items()))} | {right / count:.4f} | "
                f"{crop:.1f} s | {crop_right / count:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
