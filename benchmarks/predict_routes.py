"""`featgender predict` with its default options against `featgender extract` of the same
images, per kind of folder, with accuracy beside each (issue #29).

Folders are made from ../shared/faces/utkface_more and celeba_15k, in class folders (female/,
male/). The quick start trains on both sets, so most of these faces are training faces for it
(portrait_framed's are not): the folders compare routes, and models, on the same pictures;
held-out accuracy is the test splits' (``featgender evaluate --data``).

- aligned: UTKFace's own 200 x 200 crops;
- tight: the central 55-75 % of those, shifted a little and resized to 96-260 px (faces that
  fill the frame, as FairFace's 0.25-margin crops; HOG misses most of them);
- celeba_tight: CelebA's faces cut to 130 px and resized to 200;
- portrait: a crop pasted at a third to half of a 480-800 px blurred scene;
- portrait_framed: portraits of at most 512 px (160-384 wide, 3:4), the face at 30-60 % of
  the width, framed mostly one way (two thirds: the face at 45 %, centred high) and otherwise
  another (smaller and higher, or larger and lower), with jitter: a folder where a box is
  calibrated that is wrong for a third of it (issue #33). Faces from celeba_15k's test split
  and FairFace's valid carve-out (never its val);
- group: 3-5 faces on a 1024 x 640 canvas (accuracy of the largest face);
- mix: every other folder's images together.

Each command runs as a whole process (start-up included), all in one run, one after another::

    python benchmarks/predict_routes.py \\
        --model models/demo-arcface_mbf+arcface_mbf@neck.1-svm-rbf.joblib [--images 400]
    cd /path/to/old/checkout && python /path/to/benchmarks/predict_routes.py --model ABSOLUTE/PATH ...

The second line times the code before: ``python -m featgender`` runs the checkout it starts in
(the working folder comes first on its path; PYTHONPATH does not beat an editable install).
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
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


# framings of portrait_framed: (share, face width / picture width, face centre x, y)
FRAMINGS = ((0.65, 0.45, 0.5, 0.40), (0.17, 0.32, 0.5, 0.32), (0.18, 0.56, 0.5, 0.5))
FACE_IN_SOURCE = {"celeba_15k": 0.48, "fairface": 0.75}  # a source crop's face width / its width


def _framed_sources(images: int, rng: random.Random) -> list[tuple[str, Path, str]]:
    """(source, image, gender) of celeba_15k's test split and FairFace's valid carve-out, half each."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from featgender.data import LABEL_NAMES, load_dataset

    picks = []
    for name, split in (("celeba_15k", 2), ("fairface", 1)):
        dataset = load_dataset(SHARED / name)
        rows = [int(i) for i in (dataset.splits == split).nonzero()[0]]
        for i in rng.sample(rows, images // 2 if name == "celeba_15k" else images - images // 2):
            picks.append((name, dataset.paths[i], LABEL_NAMES[int(dataset.labels[i])]))
    rng.shuffle(picks)
    return picks


def _framed_portrait(source: str, path: Path, rng: random.Random) -> Image.Image:
    face = Image.open(path).convert("RGB")
    width = rng.randint(160, 384)
    height = round(width * 4 / 3)  # at most 512: crop-sized, as most official portraits are
    draw = rng.random()
    shares = [sum(framing[0] for framing in FRAMINGS[: i + 1]) for i in range(len(FRAMINGS))]
    _, fraction, x, y = FRAMINGS[min(i for i, share in enumerate(shares) if draw < share or i == len(shares) - 1)]
    fraction *= rng.uniform(0.9, 1.1)
    x, y = x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.03, 0.03)
    scale = fraction * width / (FACE_IN_SOURCE[source] * face.width)
    size = (round(face.width * scale), round(face.height * scale))
    scene = face.resize((width, height)).filter(ImageFilter.GaussianBlur(20))
    scene.paste(face.resize(size), (round(x * width - size[0] / 2), round(y * height - size[1] / 2)))
    return scene


def make_folders(root: Path, images: int) -> dict[str, Path]:
    """The folders under ``root``, ``images`` faces each (a tenth as many group photos; mix: all)."""
    rng = random.Random(0)
    kinds = ("aligned", "tight", "celeba_tight", "portrait", "portrait_framed", "group", "mix")
    folders = {kind: root / kind for kind in kinds}
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
    for index, (source, path, gender) in enumerate(_framed_sources(images, rng)):
        _save(_framed_portrait(source, path, rng), folders["portrait_framed"], gender, index)
    for kind in kinds[:-1]:
        for image in folders[kind].rglob("*.jpg"):
            (folders["mix"] / image.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, folders["mix"] / image.parent.name / f"{kind}-{image.name}")
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
    parser.add_argument("--kinds", default="aligned,tight,celeba_tight,portrait,portrait_framed,group,mix")
    args = parser.parse_args()
    featgender = [sys.executable, "-m", "featgender"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_folders(Path(tmp), args.images)
        columns = ("folder", "images", "extract", "predict (defaults)", "routes", "accuracy")
        print("| " + " | ".join(columns) + " | --faces crop | accuracy | --faces photo | accuracy |")
        print("|---" * (len(columns) + 4) + "|")
        for kind in args.kinds.split(","):
            folder = folders[kind]
            count = sum(1 for _ in folder.rglob("*.jpg"))
            extract_options = ["-b", "dlib_resnet", "--data", str(folder), "-o", f"{tmp}/{kind}.h5"]
            if kind == "group":
                extract_options += ["--faces", "photo"]
            extract, _ = _timed(featgender + ["extract", *extract_options])
            cells = []
            for faces in ("auto", "crop", "photo"):
                seconds, stdout = _timed(featgender + ["predict", "--model", args.model, "--faces", faces, str(folder)])
                right, _, routes = _accuracy(stdout)
                cells.append((seconds, right / count, routes))
            (auto, auto_accuracy, routes), (crop, crop_accuracy, _), (photo, photo_accuracy, _) = cells
            print(
                f"| {kind} | {count} | {extract:.1f} s | {auto:.1f} s ({auto / extract:.2f}x) | "
                f"{', '.join(f'{k} {v}' for k, v in sorted(routes.items()))} | {auto_accuracy:.4f} | "
                f"{crop:.1f} s | {crop_accuracy:.4f} | {photo:.1f} s | {photo_accuracy:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
