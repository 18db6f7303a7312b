"""Fixtures: tiny generated datasets in every layout, and the real faces in ../shared when present."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "faces"
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def face_image(label: int, rng: np.random.Generator, size=(44, 54)) -> Image.Image:
    """A small image whose colour depends on the label, so that heads can learn it."""
    base = np.array([200, 80, 60] if label else [60, 90, 200], dtype=np.float64)
    pixels = base + rng.normal(0, 25, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_images(folder: Path, names: list[str], labels: list[int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, label in zip(names, labels, strict=True):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        face_image(label, rng).save(path, quality=90)


def photo_dataset(folder: Path, faces: list, labels, *, size=(640, 480), step=(15, 10), empty: int = 1) -> Path:
    """photos.csv (image,gender) beside photos: each face crop pasted on its own coloured
    canvas of ``size``, a ``step`` further right and down than the last, then ``empty``
    photos without a face (labelled female)."""
    rows = []
    for i, (path, label) in enumerate(zip(faces, labels, strict=True)):
        photo = Image.new("RGB", size, (70 + 5 * i, 110, 90))
        photo.paste(Image.open(path).convert("RGB"), (40 + step[0] * i, 30 + step[1] * i))
        photo.save(folder / f"photo{i}.jpg", quality=95)
        rows.append((f"photo{i}.jpg", "male" if label else "female"))
    for i in range(empty):
        Image.new("RGB", size, (200, 190, 180 - 40 * i)).save(folder / f"empty{i}.jpg")
        rows.append((f"empty{i}.jpg", "female"))
    with open(folder / "photos.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "gender"), *rows])
    return folder / "photos.csv"


def celeba_rows(count: int) -> tuple[list[str], np.ndarray, list[int]]:
    """Image names, a -1/1 attribute matrix (Male alternating) and partitions 0/1/2."""
    rng = np.random.default_rng(1)
    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    values = rng.choice([-1, 1], size=(count, len(CELEBA_ATTRIBUTES)))
    values[:, CELEBA_ATTRIBUTES.index("Male")] = [1 if i % 2 else -1 for i in range(count)]
    partitions = [0 if i < count * 0.6 else 1 if i < count * 0.8 else 2 for i in range(count)]
    return names, values, partitions


@pytest.fixture
def celeba_official(tmp_path) -> Path:
    """CelebA's official layout, CRLF line ends, 30 images."""
    root = tmp_path / "celeba"
    names, values, partitions = celeba_rows(30)
    male = values[:, CELEBA_ATTRIBUTES.index("Male")]
    write_images(root / "img_align_celeba", names, list((male > 0).astype(int)))
    lines = [str(len(names)), " ".join(CELEBA_ATTRIBUTES) + " "]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values, strict=True)]
    (root / "list_attr_celeba.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions, strict=True)))
    return root


@pytest.fixture
def celeba_kaggle(tmp_path) -> Path:
    """CelebA's Kaggle layout with the same rows as ``celeba_official``."""
    root = tmp_path / "kaggle"
    names, values, partitions = celeba_rows(30)
    male = values[:, CELEBA_ATTRIBUTES.index("Male")]
    write_images(root / "img_align_celeba" / "img_align_celeba", names, list((male > 0).astype(int)))
    with open(root / "list_attr_celeba.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", *CELEBA_ATTRIBUTES])
        writer.writerows([[name, *row] for name, row in zip(names, values, strict=True)])
    with open(root / "list_eval_partition.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "partition"])
        writer.writerows(zip(names, partitions, strict=True))
    return root


@pytest.fixture
def folder_dataset(tmp_path) -> Path:
    """ROOT/Man/*.jpg and ROOT/Woman/*.jpg, 20 each."""
    root = tmp_path / "folders"
    write_images(root, [f"Man/m{i:02d}.jpg" for i in range(20)], [1] * 20, seed=2)
    write_images(root, [f"Woman/w{i:02d}.jpg" for i in range(20)], [0] * 20, seed=3)
    return root


@pytest.fixture
def csv_dataset(tmp_path) -> Path:
    """labels.csv (image,gender,age,race) beside images/: 40 images, half male."""
    root = tmp_path / "csvset"
    names = [f"images/{i:03d}.jpg" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    write_images(root, names, labels, seed=4)
    races = ["white", "black", "asian", "indian"]
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "gender", "age", "race"])
        for i, (name, label) in enumerate(zip(names, labels, strict=True)):
            writer.writerow([name, "male" if label else "female", 20 + i, races[i % 4]])
    return root


@pytest.fixture(scope="session", autouse=True)
def featgender_home(tmp_path_factory):
    """Models written by tests are recorded in a trust list of their own, not the user's."""
    import os

    os.environ["FEATGENDER_HOME"] = str(tmp_path_factory.mktemp("featgender_home"))
    return Path(os.environ["FEATGENDER_HOME"])


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    """../shared/faces, or skip where this checkout has none beside it."""
    if not (SHARED_FACES / "utkface" / "labels.csv").is_file():
        pytest.skip("../shared/faces is not beside this checkout")
    return SHARED_FACES


@pytest.fixture(scope="session")
def dlib_model(shared_faces, tmp_path_factory):
    """A logreg head on dlib_resnet features of 300 UTKFace faces: (model file, the test
    split's image paths, their labels)."""
    pytest.importorskip("dlib")
    from featgender.data import load_dataset
    from featgender.extract import extract_to_cache
    from featgender.training import train_head

    folder = tmp_path_factory.mktemp("dlib_model")
    dataset = load_dataset(shared_faces / "utkface", limit=300)
    extract_to_cache(shared_faces / "utkface", backbone="dlib_resnet", limit=300, out=folder / "utk.h5", progress=False)
    train_head(folder / "utk.h5", "logreg", eval_split=None, out=folder / "logreg.joblib")
    test = dataset.subset(np.flatnonzero(dataset.splits == 2))
    return folder / "logreg.joblib", [Path(path) for path in test.paths], test.labels


@pytest.fixture(scope="session")
def group_photo(dlib_model, tmp_path_factory) -> Path:
    """A 720 x 400 photo of two test faces side by side: a man on the left, a woman on the right."""
    _, paths, labels = dlib_model
    man, woman = paths[list(labels).index(1)], paths[list(labels).index(0)]
    photo = Image.new("RGB", (720, 400), (90, 120, 90))
    photo.paste(Image.open(man).convert("RGB").resize((200, 200)), (60, 100))
    photo.paste(Image.open(woman).convert("RGB").resize((200, 200)), (440, 100))
    path = tmp_path_factory.mktemp("photos") / "group.jpg"
    photo.save(path, quality=95)
    return path


@pytest.fixture(scope="session")
def boxed_portraits(dlib_model, tmp_path_factory) -> tuple[list[Path], int]:
    """300 x 400 portraits of test faces: the first 26 framed alike (a 150 px face at one
    place, give or take 6 px), so a face box is calibrated for the folder; the last 4 framed
    otherwise (the face smaller or larger, elsewhere): (paths, 26). The scene around each is
    its face blurred upside down: no face a detector could take for the picture's (dlib's HOG
    found the blurred upright face, the largest, on an AVX2-only CPU)."""
    from PIL import ImageFilter

    _, paths, _ = dlib_model
    folder = tmp_path_factory.mktemp("portraits")
    framings = [(150, 75 + 3 * (i % 5) - 6, 80 + 4 * (i % 4) - 6) for i in range(26)]
    framings += [(110, 180, 280), (110, 10, 10), (230, 35, 160), (120, 5, 200)]
    portraits = []
    for index, (side, left, top) in enumerate(framings):
        face = Image.open(paths[index % len(paths)]).convert("RGB")
        scene = face.rotate(180).resize((300, 400)).filter(ImageFilter.GaussianBlur(20))
        scene.paste(face.resize((side, side)), (left, top))
        portraits.append(folder / f"{index:02d}.jpg")
        scene.save(portraits[-1], quality=95)
    return portraits, 26
