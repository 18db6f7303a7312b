"""The face step, in one home: finding faces (:mod:`~featgender.faces.detect`, dlib's HOG and
its CNN detector; :mod:`~featgender.faces.mmod`, that CNN batched in torch), deciding per
image whether it is a face crop or a photo (:mod:`~featgender.faces.route`), aligning a face
to dlib's chip or ArcFace's (:mod:`~featgender.faces.align`; ArcFace's placed by InsightFace's
SCRFD keypoints, :mod:`~featgender.faces.scrfd`), dlib's face network in torch
(:mod:`~featgender.faces.resnet`, read by :mod:`~featgender.faces.dlib_format`) and
InsightFace's MobileFaceNet (:mod:`~featgender.faces.mobilefacenet`); dlib and its model
files (:mod:`~featgender.faces.models`).

ImageNet features are the weak link for faces; a network trained to recognise faces embeds
them far better. This package's top level is numpy, dlib and onnxruntime only: an exported
model predicts with it on an install without torch; ``mmod``, ``resnet`` and ``mobilefacenet`` need torch.
"""

from featgender.faces.align import (
    CHIP_PADDING,
    CHIP_SIZE,
    CROP_FALLBACK_BOX,
    FaceAligner,
    calibrate_face_box,
    chip_aligner,
    parse_face_box,
    resolve_face_box,
)
from featgender.faces.detect import (
    BOX_IN_FACE_CROP,
    FACE_CROP_SCALE,
    FaceDetector,
    PhotoFaceStep,
    crop_face,
    cut_faces,
    default_detector,
    find_faces,
)
from featgender.faces.models import Box, dlib_model_file

__all__ = [
    "BOX_IN_FACE_CROP",
    "CHIP_PADDING",
    "CHIP_SIZE",
    "CROP_FALLBACK_BOX",
    "FACE_CROP_SCALE",
    "Box",
    "FaceAligner",
    "FaceDetector",
    "PhotoFaceStep",
    "calibrate_face_box",
    "chip_aligner",
    "crop_face",
    "cut_faces",
    "default_detector",
    "dlib_model_file",
    "find_faces",
    "parse_face_box",
    "resolve_face_box",
]
