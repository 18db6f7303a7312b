"""The 5-point alignment of dlib's face network: where the face is in a face crop, its
landmarks, and the aligned 150 x 150 chip the network embeds.

Per image, on the loader workers (:class:`FaceAligner`): find the face (the detectors of
:mod:`featgender.faces.detect`; on crops where none finds one, a central box; or a fixed box
calibrated for a dataset of aligned crops), locate 5 landmarks, cut the chip. numpy and dlib
only (torch tensors only at the loader steps' edges).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from featgender.errors import FeatgenderError
from featgender.faces.detect import FaceDetector
from featgender.faces.models import _dlib

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CHIP_SIZE = 150  # side of the aligned chip dlib's face network takes
CHIP_PADDING = 0.25
CROP_FALLBACK_BOX = (0.1, 0.1, 0.9, 0.9)  # fractions of width/height: a face crop's central box


def calibrate_face_box(sources: Sequence, samples: int = 64, max_spread: float = 0.1) -> tuple[float, ...] | None:
    """Where the face sits in a dataset of aligned face crops, as a relative box; else None.

    HOG-detects faces in ``samples`` images spread evenly over ``sources`` (deterministic).
    When at least half of them have a face and the boxes agree (median absolute deviation of
    each side below ``max_spread``), returns their median (left, top, right, bottom) as
    fractions of width and height, within the image; a dataset whose faces move around gets
    None (detect).
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
    return tuple(round(float(value), 3) for value in np.clip(median, 0, 1))  # HOG's box may cross the edges


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
