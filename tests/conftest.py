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
    for name, label in zip(names, labels):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        face_image(label, rng).save(path, quality=90)


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
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (root / "list_attr_celeba.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
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
        writer.writerows([[name, *row] for name, row in zip(names, values)])
    with open(root / "list_eval_partition.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "partition"])
        writer.writerows(zip(names, partitions))
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
        for i, (name, label) in enumerate(zip(names, labels)):
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
