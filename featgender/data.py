"""Dataset readers: CelebA (official and Kaggle layouts), class folders and CSV files.

Every reader returns a :class:`FaceDataset`: columns of image ids, paths, binary gender
labels (1 = male, 0 = female, as CelebA's ``Male`` attribute), a split per image and any
extra per-image attributes (CelebA's 40, or a CSV's age/race columns) for subgroup analysis.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from featgender.errors import FeatgenderError

logger = logging.getLogger(__name__)

LABEL_NAMES = ("female", "male")
SPLITS = ("train", "valid", "test")
FORMATS = ("celeba", "celeba-kaggle", "fairface", "folder", "csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_LABEL_WORDS = {
    "male": 1,
    "m": 1,
    "man": 1,
    "men": 1,
    "1": 1,
    "female": 0,
    "f": 0,
    "woman": 0,
    "women": 0,
    "0": 0,
    "-1": 0,
}
_SPLIT_WORDS = {"train": 0, "training": 0, "valid": 1, "val": 1, "validation": 1, "test": 2, "testing": 2}
_IMAGE_COLUMNS = ("image", "image_id", "path", "file", "filename", "img")
_LABEL_COLUMNS = ("gender", "label", "male", "sex")


class Sample(NamedTuple):
    """One image of a dataset, as the readers yield it."""

    image_id: str
    path: Path
    label: int
    split: str
    attributes: np.ndarray | None


@dataclass
class FaceDataset:
    """A labelled face dataset held as columns (cheap for 200k CelebA rows).

    Attributes
    ----------
    root : dataset folder (or the CSV file's folder).
    format : one of :data:`FORMATS`.
    image_ids : unique image names, relative to ``root``.
    paths : absolute image paths, in the same order.
    labels : int8, 1 = male, 0 = female.
    splits : int8 codes into :data:`SPLITS`.
    split_source : where the splits come from (the dataset's own, or the seeded split used).
    attributes : optional int32 matrix (N x K) of extra attributes; categorical columns are
        coded as indices into ``attribute_categories[name]``.
    """

    root: Path
    format: str
    image_ids: list[str]
    paths: list[Path]
    labels: np.ndarray
    splits: np.ndarray
    split_source: str
    attributes: np.ndarray | None = None
    attribute_names: list[str] = field(default_factory=list)
    attribute_categories: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield Sample(
                self.image_ids[i],
                self.paths[i],
                int(self.labels[i]),
                SPLITS[self.splits[i]],
                None if self.attributes is None else self.attributes[i],
            )

    @property
    def name(self) -> str:
        """A short name for cache files: the dataset folder's name."""
        return self.root.name or "dataset"

    def subset(self, indices: np.ndarray) -> FaceDataset:
        """The rows at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            image_ids=[self.image_ids[i] for i in indices],
            paths=[self.paths[i] for i in indices],
            labels=self.labels[indices],
            splits=self.splits[indices],
            attributes=None if self.attributes is None else self.attributes[indices],
        )

    def fingerprint(self) -> str:
        """sha256 of the image list, labels and splits: two caches of the same rows share it."""
        digest = hashlib.sha256()
        for image_id in self.image_ids:
            digest.update(image_id.encode("utf-8") + b"\0")
        digest.update(self.labels.astype(np.int8).tobytes())
        digest.update(self.splits.astype(np.int8).tobytes())
        return digest.hexdigest()


def split_code(split: str, option: str = "--split") -> int:
    """The code of a split's name in :data:`SPLITS` (how splits are stored), or a clear error
    naming ``option``."""
    if split not in SPLITS:
        raise FeatgenderError(f"{option} {split!r}: choose one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


def parse_label(value: str, where: str) -> int:
    """Map male/female, m/f, man/woman, 1/0 and 1/-1 to 1 (male) or 0 (female)."""
    label = _LABEL_WORDS.get(str(value).strip().lower())
    if label is None:
        raise FeatgenderError(f"{where}: label {value!r} is not one of male/female, m/f, 1/0, 1/-1")
    return label


def detect_format(path: Path) -> str:
    """Which layout ``path`` holds: 'celeba', 'celeba-kaggle', 'fairface', 'csv' or 'folder'."""
    path = Path(path)
    if not path.exists():
        raise FeatgenderError(f"--data {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise FeatgenderError(f"--data {path}: a file must be a .csv of image paths and labels")
    if (path / "list_attr_celeba.txt").is_file():
        return "celeba"
    if (path / "list_attr_celeba.csv").is_file():
        return "celeba-kaggle"
    if (path / "celeba" / "list_attr_celeba.txt").is_file():  # torchvision's download layout
        return "celeba"
    if any((path / name).is_file() for name in FAIRFACE_LABELS.values()):
        return "fairface"
    if len(list(path.glob("*.csv"))) == 1:
        return "csv"
    if _class_folders(path) or any(_class_folders(path / s) for s in _split_folders(path)):
        return "folder"
    raise FeatgenderError(
        f"--data {path}: not a recognised dataset (CelebA list_attr_celeba.txt/.csv, FairFace's "
        "fairface_label_train.csv and fairface_label_val.csv, <class>/ image folders, or one CSV of image paths "
        "and labels)"
    )


def load_dataset(
    path: str | Path,
    *,
    format: str = "auto",
    limit: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
) -> FaceDataset:
    """Read a dataset in any supported layout.

    Parameters
    ----------
    path : dataset folder, or a CSV file.
    format : 'auto' (detect) or one of :data:`FORMATS`.
    limit : keep a seeded subset of this many images, stratified by split and label.
    seed : seed of the subset, of the 80/10/10 split of datasets that have none, and of
        FairFace's valid carve-out.
    image_column, label_column : CSV columns, when not recognised by name.

    Examples
    --------
    >>> ds = load_dataset("../shared/faces/utkface", limit=1000)  # doctest: +SKIP
    >>> ds.labels.mean()  # doctest: +SKIP
    0.5
    """
    path = Path(path).expanduser()
    if format == "auto":
        format = detect_format(path)
    readers = {
        "celeba": _read_celeba,
        "celeba-kaggle": _read_celeba_kaggle,
        "fairface": lambda p: _read_fairface(p, seed),
        "folder": _read_folder,
        "csv": lambda p: _read_csv(p, image_column, label_column),
    }
    if format not in readers:
        raise FeatgenderError(f"--format {format!r}: choose auto or one of {', '.join(FORMATS)}")
    dataset = readers[format](path)
    if len(dataset) == 0:
        raise FeatgenderError(f"--data {path}: no labelled images found")
    if dataset.splits.min() < 0:
        dataset = _with_seeded_split(dataset, seed)
    if limit is not None:
        dataset = stratified_limit(dataset, limit, seed)
    return dataset


def stratified_limit(dataset: FaceDataset, limit: int, seed: int = 0) -> FaceDataset:
    """A seeded subset of ``limit`` images with the split x label proportions of the whole."""
    if limit <= 0:
        raise FeatgenderError(f"--limit {limit}: must be a positive number of images")
    if limit >= len(dataset):
        return dataset
    from sklearn.model_selection import train_test_split

    strata = dataset.splits.astype(np.int64) * 2 + dataset.labels
    _, counts = np.unique(strata, return_counts=True)
    stratify = strata if limit >= len(counts) and counts.min() >= 2 else None
    chosen, _ = train_test_split(np.arange(len(dataset)), train_size=limit, stratify=stratify, random_state=seed)
    return dataset.subset(np.sort(chosen))


def _with_seeded_split(dataset: FaceDataset, seed: int) -> FaceDataset:
    """Assign a stratified 80/10/10 train/valid/test split, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    splits = np.zeros(len(dataset), dtype=np.int8)
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(dataset.labels == label))
        held_out = round(0.1 * len(members))
        splits[members[len(members) - 2 * held_out : len(members) - held_out]] = 1
        splits[members[len(members) - held_out :]] = 2
    return replace(dataset, splits=splits, split_source=f"seeded stratified 80/10/10 split, seed={seed}")


def _make(root, format, image_ids, paths, labels, splits, split_source, **attributes) -> FaceDataset:
    return FaceDataset(
        root=root,
        format=format,
        image_ids=image_ids,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int8),
        splits=np.asarray(splits, dtype=np.int8),
        split_source=split_source,
        **attributes,
    )


# --- FairFace -----------------------------------------------------------------------

FAIRFACE_LABELS = {"train": "fairface_label_train.csv", "val": "fairface_label_val.csv"}
FAIRFACE_COLUMNS = ("file", "age", "gender", "race")
FAIRFACE_AGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
FAIRFACE_VALID_FRACTION = 0.1


def _read_fairface(root: Path, seed: int) -> FaceDataset:
    """FairFace's own layout (Karkkainen & Joo 2021): ``fairface_label_train.csv`` and
    ``fairface_label_val.csv`` (file,age,gender,race[,service_test]; ``file`` like
    ``train/12.jpg``, relative to ``root``), either margin's download, whole or a subset.

    Splits as the literature reports FairFace: test = FairFace's val, never trained or tuned
    on; train = FairFace's train less a seeded valid carve-out (a tenth, stratified by race x
    gender). Rows whose image is not here are left out (a subset of the images with the full
    label files). Attributes: age (FairFace's bins, in age order), race, service_test.
    """
    rows: list[tuple[str, dict]] = []
    for part, name in FAIRFACE_LABELS.items():
        label_file = root / name
        if not label_file.is_file():
            raise FeatgenderError(
                f"{label_file}: missing (FairFace layout: both {' and '.join(FAIRFACE_LABELS.values())})"
            )
        with open(label_file, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in FAIRFACE_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise FeatgenderError(
                    f"{label_file}: no column {missing[0]!r} (FairFace's are {','.join(FAIRFACE_COLUMNS)})"
                )
            rows += [(part, row) for row in reader]
    rows = [(part, row) for part, row in rows if (root / row["file"]).is_file()]
    if not rows:
        raise FeatgenderError(f"--data {root}: FairFace label files, but none of their images (train/, val/) are here")
    image_ids = [row["file"] for _, row in rows]
    _refuse_duplicates(image_ids, root / FAIRFACE_LABELS["train"], 2)
    labels = [parse_label(row["gender"], f"{root}: {row['file']}") for _, row in rows]
    ages = [row["age"].strip() for _, row in rows]
    unknown = sorted(set(ages) - set(FAIRFACE_AGES))
    if unknown:
        raise FeatgenderError(f"{root}: age {unknown[0]!r} is not one of FairFace's bins ({', '.join(FAIRFACE_AGES)})")
    races = sorted({row["race"].strip() for _, row in rows})
    columns = [
        [FAIRFACE_AGES.index(age) for age in ages],
        [races.index(row["race"].strip()) for _, row in rows],
        [int(row.get("service_test", "").strip().lower() == "true") for _, row in rows],
    ]
    splits = np.array([2 if part == "val" else 0 for part, _ in rows], dtype=np.int8)
    rng = np.random.default_rng(seed)
    for stratum in set(zip(labels, columns[1], strict=True)):
        members = [i for i, key in enumerate(zip(labels, columns[1], strict=True)) if key == stratum and splits[i] == 0]
        carved = rng.permutation(members)[: round(FAIRFACE_VALID_FRACTION * len(members))]
        splits[carved] = 1
    return _make(
        root,
        "fairface",
        image_ids,
        [root / image_id for image_id in image_ids],
        labels,
        splits,
        f"FairFace val as test; valid: a seeded tenth of FairFace train by race x gender, seed={seed}",
        attributes=np.array(columns, dtype=np.int32).T,
        attribute_names=["age", "race", "service_test"],
        attribute_categories={"age": list(FAIRFACE_AGES), "race": races},
    )


# --- CelebA -------------------------------------------------------------------------


def _read_celeba(root: Path) -> FaceDataset:
    if not (root / "list_attr_celeba.txt").is_file():
        root = root / "celeba"
    attr_file = root / "list_attr_celeba.txt"
    if not attr_file.is_file():
        raise FeatgenderError(f"{attr_file}: missing (CelebA official layout)")
    lines = [line for line in attr_file.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise FeatgenderError(f"{attr_file}: expected a count line and an attribute-name line")
    names = lines[1].split()
    rows = [line.split() for line in lines[2:]]
    for number, row in enumerate(rows, start=3):
        if len(row) != len(names) + 1:
            raise FeatgenderError(f"{attr_file}:{number}: expected {len(names) + 1} fields, got {len(row)}")
    image_ids = [row[0] for row in rows]
    values = _attribute_values([row[1:] for row in rows], attr_file, 3)
    partition_file = root / "list_eval_partition.txt"
    partitions = _read_partitions(partition_file, _whitespace_rows(partition_file)) if partition_file.is_file() else {}
    return _celeba_dataset(
        root, "celeba", image_folder(root, "celeba"), image_ids, names, values, partitions, attr_file, 3
    )


def _read_celeba_kaggle(root: Path) -> FaceDataset:
    attr_file = root / "list_attr_celeba.csv"
    with open(attr_file, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [row for row in reader if row]
    names = [name.strip() for name in header[1:]]
    image_ids = [row[0] for row in rows]
    values = _attribute_values([row[1:] for row in rows], attr_file, 2)
    partition_file = root / "list_eval_partition.csv"
    partitions = {}
    if partition_file.is_file():
        with open(partition_file, newline="") as handle:
            partition_rows = list(csv.reader(handle))[1:]
        partitions = _read_partitions(partition_file, partition_rows)
    return _celeba_dataset(
        root, "celeba-kaggle", image_folder(root, "celeba-kaggle"), image_ids, names, values, partitions, attr_file, 2
    )


def read_identities(root: str | Path, format: str) -> dict[str, str] | None:
    """Each image's person, from CelebA's ``identity_CelebA.txt`` (``<image> <identity>``
    lines) in the dataset folder; None for other layouts or where the file is absent.

    All images of one person should carry the same gender label: this is how label errors
    are told from model errors (:func:`featgender.evaluate.label_audit`)."""
    path = Path(root) / "identity_CelebA.txt"
    if format not in ("celeba", "celeba-kaggle") or not path.is_file():
        return None
    identities = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise FeatgenderError(f"{path}:{number}: expected '<image> <identity>', got {line.strip()!r}")
        identities[fields[0]] = fields[1]
    return identities


def image_folder(root: str | Path, format: str) -> Path:
    """The folder that a dataset's image ids are relative to: CelebA's image folder, else its
    root. With a cache's ``dataset_root`` and ``dataset_format``, this finds its images."""
    root = Path(root)
    if format == "celeba":
        return root / "img_align_celeba"
    if format == "celeba-kaggle":
        nested = root / "img_align_celeba" / "img_align_celeba"
        return nested if nested.is_dir() else root / "img_align_celeba"
    return root


def _refuse_duplicates(image_ids: list[str], source: Path, first_line: int) -> None:
    """Each image once: a repeated id would give one image two rows, maybe with two labels."""
    seen: dict[str, int] = {}
    for line, image_id in enumerate(image_ids, start=first_line):
        if image_id in seen:
            raise FeatgenderError(
                f"{source}:{line}: image {image_id!r} is listed again (first at line {seen[image_id]})"
            )
        seen[image_id] = line


def _attribute_values(rows: list[list[str]], attr_file: Path, first_line: int) -> np.ndarray:
    try:
        return np.array(rows, dtype=np.int32)
    except ValueError:
        bad = next(n for n, row in enumerate(rows) if not all(v.strip().lstrip("-").isdigit() for v in row))
        raise FeatgenderError(f"{attr_file}:{bad + first_line}: attribute values must be -1 or 1") from None


def _whitespace_rows(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def _read_partitions(path: Path, rows: list[list[str]]) -> dict[str, int]:
    try:
        return {row[0]: int(row[1]) for row in rows}
    except (IndexError, ValueError):
        raise FeatgenderError(f"{path}: expected rows of '<image> <0|1|2>'") from None


def _celeba_dataset(
    root, format, image_dir, image_ids, names, values, partitions, attr_file, first_line: int
) -> FaceDataset:
    """``first_line``: the attribute file's line of the first image row (for error messages)."""
    if "Male" not in names:
        raise FeatgenderError(f"{attr_file}: no 'Male' attribute column")
    _refuse_duplicates(image_ids, attr_file, first_line)
    male = values[:, names.index("Male")] if len(values) else values
    bad = np.flatnonzero(~np.isin(male, (-1, 1)))
    if len(bad):
        raise FeatgenderError(f"{attr_file}:{bad[0] + first_line}: Male is {male[bad[0]]}, not -1 (female) or 1 (male)")
    attributes = (values > 0).astype(np.int32)  # CelebA stores -1/1
    splits = [partitions.get(image_id, -1) for image_id in image_ids]
    has_splits = bool(partitions) and min(splits) >= 0
    return _make(
        root,
        format,
        image_ids,
        [image_dir / image_id for image_id in image_ids],
        attributes[:, names.index("Male")],
        splits if has_splits else [-1] * len(image_ids),
        "CelebA list_eval_partition" if has_splits else "",
        attributes=attributes,
        attribute_names=names,
    )


# --- class folders -------------------------------------------------------------------


def _class_folders(path: Path) -> dict[Path, int]:
    """Sub-folders of ``path`` whose names are gender words, with their labels."""
    if not path.is_dir():
        return {}
    return {
        child: _LABEL_WORDS[child.name.lower()]
        for child in sorted(path.iterdir())
        if child.is_dir() and child.name.lower() in _LABEL_WORDS and not child.name.lstrip("-").isdigit()
    }


def _split_folders(path: Path) -> dict[Path, int]:
    return {
        child: _SPLIT_WORDS[child.name.lower()]
        for child in sorted(path.iterdir())
        if child.is_dir() and child.name.lower() in _SPLIT_WORDS
    }


def _read_folder(root: Path) -> FaceDataset:
    split_dirs = _split_folders(root)
    groups = [(split_dir, split) for split_dir, split in split_dirs.items()] if split_dirs else [(root, -1)]
    image_ids, paths, labels, splits = [], [], [], []
    for group_dir, split in groups:
        classes = _class_folders(group_dir)
        if not classes:
            raise FeatgenderError(f"{group_dir}: no male/female (man/woman, m/f) class folders")
        for class_dir, label in classes.items():
            for image in sorted(class_dir.rglob("*")):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    image_ids.append(image.relative_to(root).as_posix())
                    paths.append(image)
                    labels.append(label)
                    splits.append(split)
    source = "split folders" if split_dirs else ""
    return _make(root, "folder", image_ids, paths, labels, splits, source)


# --- CSV -----------------------------------------------------------------------------


def _find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.csv"))
    if len(found) != 1:
        raise FeatgenderError(f"--data {path}: expected one CSV file in the folder, found {len(found)}")
    return found[0]


def _pick_column(
    header: Sequence[str], given: str | None, candidates: tuple[str, ...], what: str, csv_file: Path
) -> str:
    if given is not None:
        if given not in header:
            raise FeatgenderError(f"{csv_file}: no column {given!r} (columns: {', '.join(header)})")
        return given
    lowered = {name.lower(): name for name in header}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    raise FeatgenderError(f"{csv_file}: no {what} column among {', '.join(header)}; name it with --{what}-column")


def _read_csv(path: Path, image_column: str | None, label_column: str | None) -> FaceDataset:
    csv_file = _find_csv(path)
    with open(csv_file, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        rows = list(reader)
    image_column = _pick_column(header, image_column, _IMAGE_COLUMNS, "image", csv_file)
    label_column = _pick_column(header, label_column, _LABEL_COLUMNS, "label", csv_file)
    base = csv_file.parent
    image_ids = [row[image_column] for row in rows]
    _refuse_duplicates(image_ids, csv_file, 2)
    labels = [parse_label(row[label_column], f"{csv_file}:{n}") for n, row in enumerate(rows, start=2)]
    split_column = next((name for name in header if name.lower() in ("split", "partition")), None)
    splits = [-1] * len(rows)
    if split_column is not None:
        splits = [_parse_split(row[split_column], f"{csv_file}:{n}") for n, row in enumerate(rows, start=2)]
    extra = [name for name in header if name not in (image_column, label_column, split_column)]
    attributes, categories = _encode_columns(rows, extra)
    return _make(
        base,
        "csv",
        image_ids,
        [base / image_id for image_id in image_ids],
        labels,
        splits,
        f"{csv_file.name} column {split_column!r}" if split_column else "",
        attributes=attributes,
        attribute_names=extra,
        attribute_categories=categories,
    )


def _parse_split(value: str, where: str) -> int:
    value = value.strip().lower()
    if value in _SPLIT_WORDS:
        return _SPLIT_WORDS[value]
    if value in ("0", "1", "2"):
        return int(value)
    raise FeatgenderError(f"{where}: split {value!r} is not train/valid/test or 0/1/2")


def _encode_columns(rows: list[dict], names: list[str]) -> tuple[np.ndarray | None, dict[str, list[str]]]:
    """Integer columns as they are; other columns as codes into a sorted category list."""
    if not names:
        return None, {}
    columns, categories = [], {}
    for name in names:
        values = [row[name].strip() for row in rows]
        try:
            columns.append(np.array([int(value) for value in values], dtype=np.int32))
        except ValueError:
            levels = sorted(set(values))
            lookup = {level: code for code, level in enumerate(levels)}
            columns.append(np.array([lookup[value] for value in values], dtype=np.int32))
            categories[name] = levels
    return np.stack(columns, axis=1), categories


CELEBA_FILES = (
    "img_align_celeba.zip",
    "list_attr_celeba.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
    "list_eval_partition.txt",
)


def download_celeba(root: str | Path) -> Path:
    """Download CelebA with torchvision's downloader into ``root/celeba`` and return that folder.

    On failure (no network, Google Drive quota) the error lists the files to fetch by hand.
    """
    from torchvision.datasets import CelebA

    target = Path(root).expanduser() / "celeba"
    try:
        CelebA(str(Path(root).expanduser()), split="all", target_type="attr", download=True)
    except Exception as error:  # URLError, Drive quota (RuntimeError), bad checksum, ...
        files = "\n".join(f"  {target / name}" for name in CELEBA_FILES)
        raise FeatgenderError(
            f"CelebA download failed ({type(error).__name__}: {error}).\n"
            "Fetch these files by hand from the CelebA page (Align&Cropped images and Anno/Eval "
            f"folders; mmlab.ie.cuhk.edu.hk/projects/CelebA.html) and place them as:\n{files}\n"
            f"then unzip img_align_celeba.zip in {target} and run: featgender extract --data {target}"
        ) from None
    return target
