"""Predict gender on raw images with a saved head: rebuild its backbone(s), embed, classify;
or with a fine-tuned network. :func:`evaluate_images` scores either on a dataset's images.

>>> predictor = featgender.load("models/logreg.joblib")  # doctest: +SKIP
>>> predictor.predict(["face.jpg"])[0].label  # doctest: +SKIP
'female'
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featgender.backbones import Backbone, build_backbone, with_face_box
from featgender.data import IMAGE_SUFFIXES, LABEL_NAMES
from featgender.embed import extract_features
from featgender.errors import FeatgenderError
from featgender.extract import parse_face_box, resolve_face_box
from featgender.faces import BOX_IN_FACE_CROP
from featgender.files import atomic_write
from featgender.heads import FINETUNED_SUFFIXES, HeadModel, load_model
from featgender.images import load_image


@dataclass
class Prediction:
    """One image's (or face's) result: label 'male'/'female' and P(male), or the error that
    stopped it; ``box`` (left, top, right, bottom) when the face was found in a photo."""

    image: str
    label: str | None
    probability: float | None
    error: str = ""
    box: tuple[int, int, int, int] | None = None


FACE_MODES = ("auto", "crop", "photo")
NO_FACE = "no face found"


def _name(image, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"


def _prediction(name: str, probability: float, error: str, box=None) -> Prediction:
    if error:
        return Prediction(name, None, None, error, box)
    return Prediction(name, LABEL_NAMES[int(probability >= 0.5)], float(probability), "", box)


def _weights_option(entry: dict) -> str:
    """The ``weights=`` value that rebuilds the weights a model's features came from."""
    name = str(entry.get("weights", ""))
    if name.startswith("none"):
        return "none"
    if name.startswith("file:"):
        return entry["weights_path"]
    return "default"


def rebuild_backbone(entry: dict, *, face_crops: bool = False) -> Backbone:
    """Build the backbone described by one of a model's ``backbones`` entries; check its weights.

    ``face_crops``: the images will be faces cut from photos by the face step, which a model
    trained on a photo cache must not run again (where to align them: :meth:`ImagePredictor.aligned_for`).
    """
    preprocessing = json.loads(entry.get("preprocessing") or "{}")
    backbone = build_backbone(
        entry["backbone"],
        weights=_weights_option(entry),
        layer=entry["layer"],
        face_box=preprocessing.get("face_box"),
        find_faces=bool(preprocessing.get("face_step")) and not face_crops,
    )
    if (backbone.weights.sha256 or "") != (entry.get("weights_sha256") or ""):
        raise FeatgenderError(
            f"{entry['backbone']}: weights here ({backbone.weights.name}, sha256 {str(backbone.weights.sha256)[:12]}) "
            f"are not the ones the model was trained on (sha256 {str(entry.get('weights_sha256'))[:12]})"
        )
    return backbone


class ImagePredictor:
    """What every predictor does with raw images; subclasses give ``probabilities``.

    ``face_box``: where a face-aligning backbone (dlib_resnet) finds the face in face crops,
    as ``featgender extract --face-box``: 'auto' (where faces sit in the images given, as
    extract finds it for a dataset; detection where they move), 'detect', or a relative
    (left, top, right, bottom) box. Never the training dataset's box by default: crops framed
    otherwise would be aligned in the wrong place.
    """

    input_kind = "face crop"

    def __init__(
        self,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        face_box: str | tuple = "auto",
    ):
        parse_face_box(face_box)  # a bad value fails now, not at the first images
        self.face_box = face_box
        self.options = {"device": device, "batch_size": batch_size, "workers": workers, "dtype": "float32"}

    def aligned_for(self, backbone: Backbone, images: list, face_crops: bool = False) -> Backbone:
        """``backbone`` finding the faces of ``images`` (face crops) per ``face_box``; in
        crops the face step cut (``face_crops``), where it put them."""
        if not backbone.config.alignment or backbone.config.face_step:
            return backbone
        if face_crops:
            return with_face_box(backbone, BOX_IN_FACE_CROP)
        return with_face_box(backbone, resolve_face_box(self.face_box, backbone.config.name, images))

    def probabilities(self, images: list, progress: bool, face_crops: bool = False) -> tuple[np.ndarray, list[str]]:
        """P(male) per image (NaN where it failed) and the errors ('' where it worked);
        ``face_crops``: the images are faces cut from photos by the face step."""
        raise NotImplementedError

    def predict(
        self, images: Sequence, *, faces: str = "auto", all_faces: bool = False, progress: bool = False
    ) -> list[Prediction]:
        """Predictions for image paths or PIL images; a broken file gets an error, the rest run.

        ``faces``: 'crop' classifies each image whole, as the training face crops were;
        'photo' finds the faces first and classifies the largest (every one with
        ``all_faces``), each with its box; an image without a face gets the error
        'no face found' and no label. 'auto' is 'photo' with ``all_faces`` or when the model's
        backbone finds faces itself (``input_kind`` 'photo'), else 'crop'.
        """
        if faces not in FACE_MODES:
            raise FeatgenderError(f"--faces {faces!r}: choose one of {', '.join(FACE_MODES)}")
        images = list(images)
        if faces == "crop" or (faces == "auto" and not all_faces and self.input_kind != "photo"):
            probabilities, errors = self.probabilities(images, progress)
            return [
                _prediction(_name(image, i), p, error)
                for i, (image, p, error) in enumerate(zip(images, probabilities, errors, strict=True))
            ]
        return self._predict_faces(images, all_faces, progress)

    def _predict_faces(self, images: list, all_faces: bool, progress: bool) -> list[Prediction]:
        from featgender.faces import cut_faces, default_detector

        detector = default_detector()
        found: list[str | list] = []  # per image: an error, or [(box, crop), ...]
        for image in images:
            try:
                picture = Image.fromarray(load_image(image).permute(1, 2, 0).numpy())
            except Exception as error:  # the same reasons extraction reports
                found.append(f"{type(error).__name__}: {error}")
                continue
            found.append(cut_faces(picture, detector, all_faces) or NO_FACE)
        crops = [crop for faces in found if isinstance(faces, list) for _, crop in faces]
        probabilities, errors = self.probabilities(crops, progress, face_crops=True) if crops else (np.empty(0), [])
        results, next_crop = [], 0
        for index, (image, faces) in enumerate(zip(images, found, strict=True)):
            if isinstance(faces, str):
                results.append(Prediction(_name(image, index), None, None, faces))
                continue
            for box, _ in faces:
                results.append(_prediction(_name(image, index), probabilities[next_crop], errors[next_crop], box))
                next_crop += 1
        return results


class Predictor(ImagePredictor):
    """A head artifact with its backbone(s) rebuilt, ready for raw images."""

    def __init__(
        self,
        model: HeadModel,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        face_box: str | tuple = "auto",
    ):
        super().__init__(device=device, batch_size=batch_size, workers=workers, face_box=face_box)
        self.model = model
        self.backbones = {False: [rebuild_backbone(entry) for entry in model.backbones]}
        kinds = {backbone.config.input_kind for backbone in self.backbones[False]}
        self.input_kind = "photo" if kinds == {"photo"} else "face crop"

    def probabilities(self, images: list, progress: bool, face_crops: bool = False) -> tuple[np.ndarray, list[str]]:
        if face_crops not in self.backbones:
            self.backbones[face_crops] = [rebuild_backbone(entry, face_crops=True) for entry in self.model.backbones]
        blocks, errors = [], [""] * len(images)
        backbones = [self.aligned_for(backbone, images, face_crops) for backbone in self.backbones[face_crops]]
        for backbone, entry in zip(backbones, self.model.backbones, strict=True):
            features, block_errors = extract_features(
                backbone, images, progress=progress, flip=bool(entry.get("flip")), **self.options
            )
            blocks.append(features)
            errors = [first or second for first, second in zip(errors, block_errors, strict=True)]
        ok = np.array([not error for error in errors], dtype=bool)
        probabilities = np.full(len(images), np.nan)
        if ok.any():
            probabilities[ok] = self.model.predict_proba(np.hstack(blocks)[ok])
        return probabilities, errors


class FinetunedPredictor(ImagePredictor):
    """A fine-tuned network (``featgender finetune``), with the same ``predict`` as :class:`Predictor`."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        face_box: str | tuple = "auto",
    ):
        from dataclasses import replace

        from torch import nn

        from featgender.finetune import load_finetuned

        super().__init__(device=device, batch_size=batch_size, workers=workers, face_box=face_box)
        net, backbone, self.checkpoint = load_finetuned(path, device=device)
        probability = nn.Sequential(net, nn.Sigmoid(), nn.Unflatten(0, (-1, 1)))
        self.backbone = backbone._replace(model=probability, config=replace(backbone.config, feature_dim=1))
        self.input_kind = backbone.config.input_kind  # a fine-tuned face network finds faces in photos too

    def probabilities(self, images: list, progress: bool, face_crops: bool = False) -> tuple[np.ndarray, list[str]]:
        backbone = self.aligned_for(self.backbone, images, face_crops)
        probabilities, errors = extract_features(backbone, images, progress=progress, **self.options)
        return probabilities[:, 0], errors


def load(path: str | Path, *, trusted: bool = False, **options) -> Predictor | FinetunedPredictor:
    """Load a head artifact (``.joblib``) or a fine-tuned checkpoint (``.pt``), ready for images.

    ``featgender.load(path).predict(images)``. Loading a head artifact runs a pickle: only
    artifacts written by featgender on this machine open, unless ``trusted`` (see
    :func:`featgender.heads.load_model`); fine-tuned checkpoints load with ``weights_only=True``.
    """
    if Path(path).suffix in FINETUNED_SUFFIXES:
        return FinetunedPredictor(path, **options)
    return Predictor(load_model(path, trusted=trusted), **options)


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
    """Kaggle submission style: ``id,label`` (male/female) for every image that was classified.

    Faces found in photos add a ``box`` column (left top right bottom).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with_boxes = any(p.box is not None for p in predictions)
    rows = [
        (Path(p.image).name, p.label) + ((" ".join(map(str, p.box or ())),) if with_boxes else ())
        for p in predictions
        if p.label is not None
    ]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "box"] if with_boxes else ["id", "label"])
        writer.writerows(rows)
    return len(rows)
