"""The alignment of the face networks: where the face is in a face crop, its landmarks, and
the aligned chip the network embeds: dlib's 150 x 150 chip on its 5 landmarks, or ArcFace's
112 x 112 on the eye centres, nose tip and mouth corners that SCRFD finds (``arcface_mbf``;
dlib's 68 landmarks where it finds no face).

Per image, on the loader workers (:class:`FaceAligner`): find the face (the detectors of
:mod:`featgender.faces.detect`; on crops where none finds one, a central box; or a fixed box
calibrated for a dataset of aligned crops), locate 5 landmarks, cut the chip. numpy, dlib and
onnxruntime only (torch tensors only at the loader steps' edges).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from featgender.errors import FeatgenderError
from featgender.faces.detect import FaceDetector
from featgender.faces.models import _dlib, dlib_model_file, hog_detector
from featgender.faces.scrfd import FiveKeypoints, scrfd_file
from featgender.threads import map_in_threads

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CHIP_SIZE = 150  # side of the aligned chip dlib's face network takes
CHIP_PADDING = 0.25
# ArcFace's 112 x 112 template (InsightFace): where the eye centres (the one on the picture's
# left first), the nose tip and the mouth corners go; and those points among dlib's 68
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
ARCFACE_SIZE = 112
ARCFACE_POINTS = (slice(36, 42), slice(42, 48), slice(30, 31), slice(48, 49), slice(54, 55))
CROP_FALLBACK_BOX = (0.1, 0.1, 0.9, 0.9)  # fractions of width/height: a face crop's central box
# Where dlib's 5 landmarks (outer and inner corner of each eye, then the nose) sit in dlib's HOG
# box, as fractions of its width and height: the mean over 600 UTKFace and CelebA faces. A box
# is re-seated on the landmarks found in it by this shape (the calibrated box is HOG's too).
LANDMARKS_IN_BOX = np.array([[0.79, 0.281], [0.62, 0.29], [0.194, 0.279], [0.364, 0.29], [0.49, 0.609]])
BOX_CHECK_STEPS = 3  # landmark passes, each from the box re-seated on the last one's landmarks
BOX_CHECK_IOU = 0.6  # ... the box they end in overlaps the one they started from at least this much
BOX_HELD_IOU = 0.85  # landmarks this close to their box hold it: no further pass
# Landmarks in a box with no face at all stay put: the chip cut there must look like a face to
# dlib's HOG detector seen at this side (its one 80 px window: the whole chip), scoring this much.
CHIP_CHECK_SIDE = 80
CHIP_FACE_SCORE = -1.0
OFF_BOX = "face not in the box"
# A calibrated box holds for a folder when this share of the faces sampled overlap it by this
# IoU (dataset crops: 0.92-1.00 of them; portraits framed a third of the time otherwise: 0.67-0.73)
CALIBRATION_IOU = 0.5
CALIBRATION_AGREEMENT = 0.85


def calibrate_face_box(
    sources: Sequence, samples: int = 64, max_spread: float = 0.1, min_agreement: float = CALIBRATION_AGREEMENT
) -> tuple[float, ...] | None:
    """Where the face sits in a dataset of aligned face crops, as a relative box; else None.

    HOG-detects faces in ``samples`` images spread evenly over ``sources`` (deterministic), on
    a thread per core; upsampled 2x (faces under its 80 px window) only in the images where it
    finds none when it finds under half of them at their size (half-resolution CelebA's 40 px
    faces): elsewhere the faces that only the upsampled look finds are stragglers the median
    does without, and that look costs half the time (FairFace's 224 px crops: 0.33 of 0.55 s).
    When at least half of them have a face, the boxes agree (median absolute deviation of
    each side below ``max_spread``) and ``min_agreement`` of them overlap their median by
    :data:`CALIBRATION_IOU` (a folder framed one way for two thirds and otherwise for the rest
    has a median box that is wrong for that third: it gets None), returns their median (left,
    top, right, bottom) as fractions of width and height, within the image; a dataset whose
    faces move around gets None (detect).
    """
    picks = np.unique(np.linspace(0, len(sources) - 1, min(samples, len(sources))).round().astype(int))
    picked = [sources[index] for index in picks]
    found = list(map_in_threads(partial(_largest_face, small_faces=False), picked, FaceDetector))  # HOG only
    if sum(box is not None for box in found) < 0.5 * len(picks):  # small faces: the misses looked at upsampled
        missed = [source for source, box in zip(picked, found, strict=True) if box is None]
        found += map_in_threads(partial(_largest_face, small_faces=True), missed, FaceDetector)
    relative = np.array([box for box in found if box is not None])
    if len(relative) < 0.5 * len(picks):
        return None
    median = np.median(relative, axis=0)
    if np.median(np.abs(relative - median), axis=0).max() >= max_spread:
        return None
    if np.mean([overlap(box, median) >= CALIBRATION_IOU for box in relative]) < min_agreement:
        return None
    return tuple(round(float(value), 3) for value in np.clip(median, 0, 1))  # HOG's box may cross the edges


def _largest_face(detector: FaceDetector, source, small_faces: bool) -> tuple[float, ...] | None:
    """The largest face a detector finds in an image, as fractions of its width and height;
    None where it finds none, or the file does not open (extraction reports it)."""
    from featgender.images import decode_image

    try:
        picture = decode_image(source)
    except Exception:
        return None
    boxes = detector(picture, small_faces=small_faces)
    if not boxes:
        return None
    height, width = picture.shape[:2]
    left, top, right, bottom = boxes[0]
    return left / width, top / height, right / width, bottom / height


def box_on_landmarks(points: np.ndarray) -> np.ndarray:
    """The (left, top, right, bottom) box in which five landmarks sit as they sit in a face's
    own box (:data:`LANDMARKS_IN_BOX`): a least-squares fit of one scale and a shift."""
    centred = LANDMARKS_IN_BOX - LANDMARKS_IN_BOX.mean(axis=0)
    scale = np.sum((points - points.mean(axis=0)) * centred) / np.sum(centred**2)
    corner = points.mean(axis=0) - scale * LANDMARKS_IN_BOX.mean(axis=0)
    return np.concatenate([corner, corner + scale])


def overlap(first, second) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes."""
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    inter = max(width, 0) * max(height, 0)
    union = (first[2] - first[0]) * (first[3] - first[1]) + (second[2] - second[0]) * (second[3] - second[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def face_stays_in_box(landmarks, pixels: np.ndarray, box, points: np.ndarray) -> bool:
    """Whether the face whose landmarks ``points`` were found in ``box`` is in that box.

    Landmarks sought in a box that misses the face are pulled part of the way towards it: the
    box re-seated on them (:func:`box_on_landmarks`) and sought again, :data:`BOX_CHECK_STEPS`
    passes in all, walks off towards the face, while a face in its box holds it. The face is in
    the box when the last seated box overlaps it by :data:`BOX_CHECK_IOU`; a seated box that
    overlaps it by :data:`BOX_HELD_IOU` ends the walk early (most face crops: no second pass).
    ``landmarks(pixels, box)`` gives the points found in a box (dlib's shape predictor)."""
    seated = box_on_landmarks(points)
    for _ in range(BOX_CHECK_STEPS - 1):
        if overlap(seated, box) >= BOX_HELD_IOU:
            return True
        seated = box_on_landmarks(landmarks(pixels, seated))
    return overlap(seated, box) >= BOX_CHECK_IOU


def chip_face_score(hog, chip: np.ndarray) -> float:
    """dlib's HOG detector's best score on a face chip seen at :data:`CHIP_CHECK_SIDE` pixels
    (-inf where nothing scores above -2): what tells a chip of a face from one of a background."""
    from PIL import Image

    small = np.asarray(Image.fromarray(chip).resize((CHIP_CHECK_SIDE,) * 2, Image.Resampling.BILINEAR))
    _, scores, _ = hog.run(small, 0, -2.0)
    return max(scores, default=-np.inf)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation, uniform scale and shift taking ``source`` points nearest to ``target``
    (least squares, Umeyama 1991), as a 2 x 3 matrix."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centred, target_centred = source - source_mean, target - target_mean
    u, singular, vt = np.linalg.svd(target_centred.T @ source_centred)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])  # a rotation, never a reflection
    rotation = u @ sign @ vt
    scale = (singular * np.diag(sign)).sum() / (source_centred**2).sum()
    return np.hstack([scale * rotation, (target_mean - scale * rotation @ source_mean)[:, None]])


def arcface_chip(pixels: np.ndarray, five: np.ndarray) -> np.ndarray:
    """ArcFace's aligned uint8 (112, 112, 3) chip of a uint8 (H, W, 3) image, from its five
    points (eye centres, nose tip, mouth corners): bilinear, black beyond the picture's edge."""
    from PIL import Image

    forward = np.vstack([similarity_transform(five, ARCFACE_TEMPLATE), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2].ravel()  # PIL maps each chip pixel back to the picture
    picture = Image.fromarray(pixels)
    size = (ARCFACE_SIZE, ARCFACE_SIZE)
    return np.array(picture.transform(size, Image.Transform.AFFINE, tuple(inverse), Image.Resampling.BILINEAR))


def five_of_68(points68: np.ndarray) -> np.ndarray:
    """ArcFace's five points (eye centres, nose tip, mouth corners) from dlib's 68 landmarks."""
    return np.stack([points68[part].mean(0) for part in ARCFACE_POINTS])


class FaceAligner:
    """uint8 (3, H, W) image → aligned uint8 face chip: (3, 150, 150) as dlib's model expects, or
    with ``arcface``, (3, 112, 112) on ArcFace's template, placed by SCRFD's five keypoints
    around the face's box (``keypoints``, ArcFace's own way), or where SCRFD finds no face
    there, by dlib's 68 landmarks in the box.

    ``box``: the face's relative (left, top, right, bottom) box in every image (aligned face
    crops, see :func:`calibrate_face_box`): no detection, only landmarks; with ``check``, an
    image whose face is not in that box (:func:`face_stays_in_box`) raises
    :class:`FeatgenderError` :data:`OFF_BOX` (``predict`` then finds its face), as does one
    whose chip does not look like a face (:func:`chip_face_score`). Else the face is
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
        check: bool = False,
        arcface: str | None = None,
        keypoints: FiveKeypoints | None = None,
    ):
        self.landmarks_file = landmarks_file
        self.arcface = arcface  # dlib's 68-landmark file: cut ArcFace's chip
        self.keypoints = keypoints
        self.detector = FaceDetector(cnn_detector_file)
        self.face_crop = face_crop
        self.box = box
        self.check = check and box is not None
        self._landmarks: Any = None  # dlib's shape predictor, once loaded
        self._hog: Any = None  # dlib's HOG detector, once loaded, for the check
        self._landmarks68: Any = None  # dlib's 68-landmark predictor, once loaded (arcface)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_landmarks": None, "_hog": None, "_landmarks68": None}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.chip(image.permute(1, 2, 0).numpy())).permute(2, 0, 1)

    def chip(self, pixels: np.ndarray) -> np.ndarray:
        """The aligned uint8 (150, 150, 3) chip of a uint8 (H, W, 3) image; (112, 112, 3) for ArcFace."""
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
        if self.arcface is None or self.check:
            # dlib's chip is what is checked for a face, whichever chip is cut: a joined model's
            # networks take or leave the same pictures
            chip = self._dlib_chip(pixels, boxes[0])
            if self.arcface is None:
                return chip
        five = None if self.keypoints is None else self.keypoints(pixels, boxes[0])
        if five is None:
            if self._landmarks68 is None:
                self._landmarks68 = dlib.shape_predictor(self.arcface)
            five = five_of_68(_points(self._landmarks68(pixels, dlib.rectangle(*boxes[0]))))
        return arcface_chip(pixels, five)

    def _dlib_chip(self, pixels: np.ndarray, box: tuple) -> np.ndarray:
        """dlib's chip on the 5 landmarks found in ``box``; with ``check``, one whose landmarks
        leave the box or whose chip does not look like a face raises :data:`OFF_BOX`."""
        shape = self._landmarks(pixels, _dlib().rectangle(*box))
        if self.check and not face_stays_in_box(self._landmarks_in, pixels, box, _points(shape)):
            raise FeatgenderError(OFF_BOX)
        chip = np.ascontiguousarray(_dlib().get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING))
        if self.check:
            if self._hog is None:
                self._hog = hog_detector()
            if chip_face_score(self._hog, chip) < CHIP_FACE_SCORE:
                raise FeatgenderError(OFF_BOX)
        return chip

    def _landmarks_in(self, pixels: np.ndarray, box) -> np.ndarray:
        """The five landmarks found in a (left, top, right, bottom) box, as a (5, 2) array."""
        return _points(self._landmarks(pixels, _dlib().rectangle(*(int(round(value)) for value in box))))


def chip_aligner(chip: str, box: tuple | None = None, check: bool = False) -> FaceAligner:
    """The :class:`FaceAligner` that cuts a face network's ``chip`` ('dlib' or 'arcface'), with
    dlib's model files, finding faces in ``box`` (None: detected)."""
    if chip not in ("dlib", "arcface"):
        raise FeatgenderError(f"chip {chip!r}: a face network takes 'dlib' or 'arcface' chips")
    return FaceAligner(
        str(dlib_model_file("landmarks")),
        str(dlib_model_file("cnn_detector")),
        face_crop=True,
        box=box,
        check=check,
        arcface=str(dlib_model_file("landmarks68")) if chip == "arcface" else None,
        keypoints=FiveKeypoints(scrfd_file()) if chip == "arcface" else None,
    )


def _points(shape) -> np.ndarray:
    """dlib's landmarks (a full_object_detection) as a (parts, 2) float array."""
    return np.array([(shape.part(index).x, shape.part(index).y) for index in range(shape.num_parts)], dtype=float)


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
