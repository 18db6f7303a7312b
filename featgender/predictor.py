"""What every predictor does with raw images, whatever runs the network (torch or onnxruntime):
the face step for photos, one :class:`Prediction` per image or face, errors per image, the
CSV. Torch-free: an exported model predicts with it on an install without torch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featgender.data import IMAGE_SUFFIXES, LABEL_NAMES
from featgender.errors import FeatgenderError
from featgender.faces import BOX_IN_FACE_CROP, parse_face_box, resolve_face_box
from featgender.faces.align import OFF_BOX
from featgender.faces.route import (
    CROP_FACE_FRACTION,
    face_in_crop_or_photo,
    faces_in_photo,
    is_photo_sized,
)
from featgender.files import atomic_write
from featgender.images import decode_image
from featgender.threads import map_in_threads


@dataclass
class Prediction:
    """One image's (or face's) result: label 'male'/'female' and P(male), or the error that
    stopped it; ``box`` (left, top, right, bottom) when the face was found in a photo;
    ``route``: how the image went, 'crop' (a face crop, classified whole) or 'photo' (its
    faces found first)."""

    image: str
    label: str | None
    probability: float | None
    error: str = ""
    box: tuple[int, int, int, int] | None = None
    route: str = "crop"


FACE_MODES = ("auto", "crop", "photo")
FACE_STEP_CHUNK = 1024  # images whose faces are found, cut and classified together


def _name(image, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"


def _prediction(name: str, probability: float, error: str, box=None, route: str = "crop") -> Prediction:
    if error:
        return Prediction(name, None, None, error, box, route)
    return Prediction(name, LABEL_NAMES[int(probability >= 0.5)], float(probability), "", box, route)


class ImagePredictor:
    """What every predictor does with raw images; subclasses give ``probabilities``.

    ``face_box``: where a face-aligning backbone (dlib_resnet) finds the face in face crops,
    as ``featgender extract --face-box``: 'auto' (where faces sit in the images given, as
    extract finds it for a dataset; detection where they move), 'detect', or a relative
    (left, top, right, bottom) box. Never the training dataset's box by default: crops framed
    otherwise would be aligned in the wrong place. ``precision``: torch's compute type
    (:func:`featgender.embed.resolve_precision`); an exported graph computes in float32.
    """

    input_kind = "face crop"

    def __init__(
        self,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        face_box: str | tuple = "auto",
        precision: str = "auto",
    ):
        parse_face_box(face_box)  # a bad value fails now, not at the first images
        self.face_box = face_box
        self._calibrated: tuple[list, tuple | None] | None = None
        self.options: dict[str, Any] = {
            "device": device,
            "batch_size": batch_size,
            "workers": workers,
            "precision": precision,
        }

    def face_box_for(self, images: list, face_crops: bool = False) -> tuple | None:
        """Where a face-aligning network finds the faces of ``images`` (face crops): per
        ``face_box``; in crops the face step cut (``face_crops``), where it put them. The last
        files' box is kept: routing them and aligning them calibrate once."""
        if face_crops:
            return BOX_IN_FACE_CROP
        if not all(isinstance(image, (str, os.PathLike)) for image in images):  # pictures in memory: no key
            return resolve_face_box(self.face_box, images)
        if self._calibrated is None or self._calibrated[0] != images:
            self._calibrated = (list(images), resolve_face_box(self.face_box, images))
        return self._calibrated[1]

    def probabilities(
        self, images: list, progress: bool, face_crops: bool = False, check_box: bool = False
    ) -> tuple[np.ndarray, list[str]]:
        """P(male) per image (NaN where it failed) and the errors ('' where it worked);
        ``face_crops``: the images are faces cut from photos by the face step; ``check_box``: a
        face-aligning network fails an image whose face is not in the box it aligns in
        (:data:`OFF_BOX`)."""
        raise NotImplementedError

    def predict(
        self, images: Sequence, *, faces: str = "auto", all_faces: bool = False, progress: bool = False
    ) -> list[Prediction]:
        """Predictions for image paths or PIL images; a broken file gets an error, the rest run.

        ``faces``: 'crop' classifies each image whole, as the training face crops were;
        'photo' finds the faces first and classifies the largest (every one with
        ``all_faces``), each with its box; an image without a face gets the error
        'no face found' and no label. 'auto' is 'photo' with ``all_faces``, 'crop' on models
        whose backbone takes face crops; on a face-finding model (``input_kind`` 'photo') it
        decides per image, cheaply: pictures larger than :data:`CROP_MAX_SIDE` are photos. When
        the others' faces fill one place (``face_box``, or the calibrated box spanning
        :data:`CROP_FACE_FRACTION`), each is a face crop classified whole, as 'crop' does (at
        `extract`'s speed), if its own face is in that box: the landmarks the alignment seeks
        there hold it (:func:`featgender.faces.align.face_stays_in_box`) and the chip cut there
        looks like a face (:func:`featgender.faces.align.chip_face_score`). Every other small
        picture is decided by the face found in it: crop when it spans that fraction of the
        picture or none is found (the central box, as 'crop' would), photo otherwise. Each
        prediction says its ``route``.
        """
        if faces not in FACE_MODES:
            raise FeatgenderError(f"--faces {faces!r}: choose one of {', '.join(FACE_MODES)}")
        images = list(images)
        if faces == "auto":
            faces = "photo" if all_faces else "routed" if self.input_kind == "photo" else "crop"
        if faces == "routed":
            photos = [is_photo_sized(image) for image in images]
            small = [image for image, photo in zip(images, photos, strict=True) if not photo]
            crops_sit_still = bool(small) and self._faces_fill_a_fixed_box(small)
            parts: list[tuple[list[bool], Callable[[list, bool], list[list[Prediction]]]]] = [
                (photos, partial(self._predict_faces, False)),
                ([not photo for photo in photos], self._predict_boxed if crops_sit_still else self._predict_routed),
            ]
        else:
            parts = [
                (
                    [True] * len(images),
                    self._predict_crops if faces == "crop" else partial(self._predict_faces, all_faces),
                )
            ]
        results: list[list[Prediction]] = [[] for _ in images]
        for chosen, predict in parts:
            indices = [index for index, take in enumerate(chosen) if take]
            if indices:
                for index, found in zip(indices, predict([images[i] for i in indices], progress), strict=True):
                    results[index] = [replace(prediction, image=_name(images[index], index)) for prediction in found]
        return [prediction for found in results for prediction in found]

    def _faces_fill_a_fixed_box(self, images: list) -> bool:
        """Whether the faces of ``images`` sit at one place that makes them face crops: the box
        given (``face_box``), or the one calibrated where it spans :data:`CROP_FACE_FRACTION`
        (small faces at one place, as in a folder of portraits, are photos)."""
        box = self.face_box_for(images)
        if box is None or self.face_box != "auto":
            return box is not None
        left, top, right, bottom = box
        return max(right - left, bottom - top) >= CROP_FACE_FRACTION

    def _predict_crops(self, images: list, progress: bool, check_box: bool = False) -> list[list[Prediction]]:
        probabilities, errors = self.probabilities(images, progress, check_box=check_box)
        return [[_prediction("", p, error)] for p, error in zip(probabilities, errors, strict=True)]

    def _predict_boxed(self, images: list, progress: bool) -> list[list[Prediction]]:
        """Face crops classified whole where each one's face is in the box the crop path aligns
        in; the faces of the others found as :meth:`_predict_routed` finds them, faces smaller
        than the folder's framing allows left unsought."""
        results = self._predict_crops(images, progress, check_box=True)
        off_box = [index for index, (prediction,) in enumerate(results) if prediction.error == OFF_BOX]
        if off_box:
            box = self.face_box_for(images)
            off_box_images = [images[i] for i in off_box]
            routed = self._predict_routed(off_box_images, progress, folder_face=box[2] - box[0] if box else None)
            for index, found in zip(off_box, routed, strict=True):
                results[index] = found
        return results

    def _predict_faces(self, all_faces: bool, images: list, progress: bool) -> list[list[Prediction]]:
        return self._classify_faces(images, progress, partial(faces_in_photo, all_faces))

    def _predict_routed(self, images: list, progress: bool, folder_face: float | None = None) -> list[list[Prediction]]:
        return self._classify_faces(images, progress, partial(face_in_crop_or_photo, folder_face=folder_face))

    def _classify_faces(self, images: list, progress: bool, find: Callable) -> list[list[Prediction]]:
        """``find(detector, picture)`` gives each decoded image's route and (box, face crop)
        pairs, found on threads; the crops are classified as the face step cuts them. Images
        go :data:`FACE_STEP_CHUNK` at a time: a folder of 100,000 keeps one chunk's crops in
        memory, under one progress bar."""
        from tqdm.auto import tqdm

        from featgender.faces import default_detector

        def found_in(detector, image) -> tuple[str, str | list]:  # route, and an error or [(box, crop), ...]
            try:
                picture = Image.fromarray(decode_image(image))
            except Exception as error:  # the same reasons extraction reports
                return "photo", f"{type(error).__name__}: {error}"
            return find(detector, picture)

        # the CNN detector on the predictor's device (the GPU where there is one, under 'auto')
        detector = partial(default_detector, str(self.options["device"]))
        detector()  # dlib missing: say so once, here
        results: list[list[Prediction]] = []
        with tqdm(total=len(images), unit="img", desc="faces", disable=not progress) as bar:
            for start in range(0, len(images), FACE_STEP_CHUNK):
                chunk = images[start : start + FACE_STEP_CHUNK]
                results += self._classify_found(list(map_in_threads(found_in, chunk, detector)))
                bar.update(len(chunk))
        return results

    def _classify_found(self, found: list[tuple[str, str | list]]) -> list[list[Prediction]]:
        """Each image's predictions from its route and its error or (box, face crop) pairs."""
        crops = [crop for _, faces in found if isinstance(faces, list) for _, crop in faces]
        probabilities, errors = self.probabilities(crops, False, face_crops=True) if crops else (np.empty(0), [])
        results: list[list[Prediction]] = []
        next_crop = 0
        for image_route, faces in found:
            if isinstance(faces, str):
                results.append([Prediction("", None, None, faces, route=image_route)])
                continue
            results.append([])
            for box, _ in faces:
                shown = box if image_route == "photo" else None
                results[-1].append(_prediction("", probabilities[next_crop], errors[next_crop], shown, image_route))
                next_crop += 1
        return results


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files under each folder (recursively, following symlinks).

    A folder without any is refused: predicting nothing and exiting 0 would hide a wrong path.
    """
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = [Path(root) / name for root, _, names in os.walk(item, followlinks=True) for name in names]
            images = sorted(path for path in found if path.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FeatgenderError(f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
            files += images
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
    with_boxes = any(p.box is not None for p in predictions)
    rows = [
        (Path(p.image).name, p.label) + ((" ".join(map(str, p.box or ())),) if with_boxes else ())
        for p in predictions
        if p.label is not None
    ]
    with atomic_write(path, kind="a CSV of predictions") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "box"] if with_boxes else ["id", "label"])
        writer.writerows(rows)
    return len(rows)
