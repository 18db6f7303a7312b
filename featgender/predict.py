"""Predict gender on raw images with a saved head: rebuild its backbone(s), embed, classify.

>>> predictor = featgender.load("models/logreg.joblib")  # doctest: +SKIP
>>> predictor.predict(["face.jpg"])[0].label  # doctest: +SKIP
'female'
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from featgender.backbones import Backbone, build_backbone
from featgender.data import IMAGE_SUFFIXES, LABEL_NAMES
from featgender.errors import FeatgenderError
from featgender.extract import extract_features
from featgender.heads import HeadModel, load_model


@dataclass
class Prediction:
    """One image's result: label 'male'/'female' and P(male), or the error that stopped it."""

    image: str
    label: str | None
    probability: float | None
    error: str = ""


def _predictions(images: list, probabilities: np.ndarray, errors: list[str]) -> list[Prediction]:
    """One :class:`Prediction` per image from P(male), or its error."""
    names = [str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}" for i, image in enumerate(images)]
    return [
        Prediction(name, LABEL_NAMES[int(p >= 0.5)], float(p), "") if not error else Prediction(name, None, None, error)
        for name, p, error in zip(names, probabilities, errors)
    ]


def _weights_option(entry: dict) -> str:
    """The ``weights=`` value that rebuilds the weights a model's features came from."""
    name = str(entry.get("weights", ""))
    if name.startswith("none"):
        return "none"
    if name.startswith("file:"):
        return entry["weights_path"]
    return "default"


def rebuild_backbone(entry: dict) -> Backbone:
    """Build the backbone described by one of a model's ``backbones`` entries; check its weights."""
    backbone = build_backbone(entry["backbone"], weights=_weights_option(entry), layer=entry["layer"])
    if (backbone.weights.sha256 or "") != (entry.get("weights_sha256") or ""):
        raise FeatgenderError(
            f"{entry['backbone']}: weights here ({backbone.weights.name}, sha256 {str(backbone.weights.sha256)[:12]}) "
            f"are not the ones the model was trained on (sha256 {str(entry.get('weights_sha256'))[:12]})"
        )
    return backbone


class Predictor:
    """A head artifact with its backbone(s) rebuilt, ready for raw images."""

    def __init__(self, model: HeadModel, *, device: str = "auto", batch_size: int | None = None,
                 workers: int | None = None):
        self.model = model
        self.backbones = [rebuild_backbone(entry) for entry in model.backbones]
        self.options = {"device": device, "batch_size": batch_size, "workers": workers, "dtype": "float32"}

    def predict(self, images: Sequence, *, progress: bool = False) -> list[Prediction]:
        """Predictions for image paths or PIL images; a broken file gets an error, the rest run."""
        images = list(images)
        blocks, errors = [], [""] * len(images)
        for backbone, entry in zip(self.backbones, self.model.backbones):
            features, block_errors = extract_features(backbone, images, progress=progress,
                                                      flip=bool(entry.get("flip")), **self.options)
            blocks.append(features)
            errors = [first or second for first, second in zip(errors, block_errors)]
        ok = np.array([not error for error in errors], dtype=bool)
        probabilities = np.full(len(images), np.nan)
        if ok.any():
            probabilities[ok] = self.model.predict_proba(np.hstack(blocks)[ok])
        return _predictions(images, probabilities, errors)


class FinetunedPredictor:
    """A fine-tuned network (``featgender finetune``), with the same ``predict`` as :class:`Predictor`."""

    def __init__(self, path: str | Path, *, device: str = "auto", batch_size: int | None = None,
                 workers: int | None = None):
        from dataclasses import replace

        from torch import nn

        from featgender.finetune import load_finetuned

        net, backbone, self.checkpoint = load_finetuned(path, device=device)
        probability = nn.Sequential(net, nn.Sigmoid(), nn.Unflatten(0, (-1, 1)))
        self.backbone = backbone._replace(model=probability, config=replace(backbone.config, feature_dim=1))
        self.options = {"device": device, "batch_size": batch_size, "workers": workers, "dtype": "float32"}

    def predict(self, images: Sequence, *, progress: bool = False) -> list[Prediction]:
        images = list(images)
        probabilities, errors = extract_features(self.backbone, images, progress=progress, **self.options)
        return _predictions(images, probabilities[:, 0], errors)


FINETUNED_SUFFIXES = (".pt", ".pth")


def load(path: str | Path, **options) -> Predictor | FinetunedPredictor:
    """Load a head artifact (``.joblib``) or a fine-tuned checkpoint (``.pt``), ready for images.

    ``featgender.load(path).predict(images)``. Loading a head artifact runs a pickle: only
    load artifacts you made or trust (fine-tuned checkpoints load with ``weights_only=True``).
    """
    if Path(path).suffix in FINETUNED_SUFFIXES:
        return FinetunedPredictor(path, **options)
    return Predictor(load_model(path), **options)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files under each folder (recursively, following symlinks)."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = [Path(root) / name for root, _, names in os.walk(item, followlinks=True) for name in names]
            files += sorted(path for path in found if path.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            files.append(item)
        else:
            raise FeatgenderError(f"{item}: no such file or folder")
    return files


def write_predictions_csv(predictions: list[Prediction], path: str | Path) -> int:
    """Kaggle submission style: ``id,label`` (male/female) for every image that was classified."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        rows = [(Path(p.image).name, p.label) for p in predictions if p.label is not None]
        writer.writerows(rows)
    os.replace(tmp, path)
    return len(rows)
