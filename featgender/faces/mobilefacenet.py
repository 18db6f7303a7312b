"""InsightFace's MobileFaceNet trained on WebFace600K (``w600k_mbf``) as a torch module, read
from InsightFace's own ONNX file.

The network is the recognition model of InsightFace's ``buffalo_s`` pack: on a 112 x 112 RGB
chip aligned to ArcFace's five-point template, (pixel - 127.5) / 127.5, then a 3x3 stride-2
convolution (128) and a 3x3 depthwise one in groups of two channels, three stages of
depthwise-separable bottlenecks (a 1x1 expansion, a 3x3 depthwise convolution, a linear 1x1
projection; the first of each stage strided, the others residual): 128 channels at 28 px, 256
at 14 px, 256 at 7 px; then 1x1 convolutions to 512 and 64 channels, and the 64 x 7 x 7 map
flattened into a linear layer to 512 and a batch norm: the 512-d embedding, not normalised.
Every convolution but the projections is followed by a PReLU; the file has its batch norms
folded into the convolutions.

Its face recognition was learned on 600,000 people's web photos (WebFace600K): faces of every
age and origin, at every resolution, which is what dlib's network (trained mostly on adult
celebrities) lacks for faces in the wild. InsightFace releases the weights for non-commercial
research only.

:func:`read_insightface_onnx` reads the ``.onnx`` file (``pip install onnx``) into this module's
``state_dict``, matching the file's layers to the module's in order, by shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from featgender.errors import FeatgenderError

EMBEDDING_DIM = 512
# (input channels, output channels, expansion, residual blocks after the strided one) per stage
STAGES = ((128, 128, 128, 4), (128, 256, 256, 6), (256, 256, 512, 2))


def _conv(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups)


class Bottleneck(nn.Module):
    """1x1 expansion -> PReLU -> 3x3 depthwise -> PReLU -> linear 1x1 projection, plus the input
    where the block is residual (stride 1, same width)."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.expand = _conv(in_channels, expansion)
        self.expand_act = nn.PReLU(expansion)
        self.depthwise = _conv(expansion, expansion, 3, stride, groups=expansion)
        self.depthwise_act = nn.PReLU(expansion)
        self.project = _conv(expansion, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise_act(self.depthwise(self.expand_act(self.expand(x)))))
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """InsightFace's w600k MobileFaceNet: float RGB chips (N, 3, 112, 112) in 0..255 -> (N, 512)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 128, 3, 2), nn.PReLU(128), _conv(128, 128, 3, groups=64), nn.PReLU(128))
        blocks: list[nn.Module] = []
        for in_channels, out_channels, expansion, repeats in STAGES:
            blocks.append(Bottleneck(in_channels, out_channels, expansion, 2, residual=False))
            blocks += [Bottleneck(out_channels, out_channels, out_channels, 1, residual=True) for _ in range(repeats)]
        self.blocks = nn.Sequential(*blocks)
        self.neck = nn.Sequential(_conv(256, 512), nn.PReLU(512), _conv(512, 64), nn.PReLU(64))
        self.linear = nn.Linear(64 * 7 * 7, EMBEDDING_DIM)
        self.embedding = nn.BatchNorm1d(EMBEDDING_DIM)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = self.neck(self.blocks(self.stem((chips - 127.5) / 127.5)))
        return self.embedding(self.linear(x.flatten(1)))


def read_insightface_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of :class:`MobileFaceNet` from InsightFace's ``w600k_mbf.onnx``: the
    file's weights in the order its nodes use them, given to the module's parameters and batch
    norm statistics in the order the module holds them; every shape must match."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise FeatgenderError("arcface_mbf: onnx reads its file; pip install 'featgender[arcface]'") from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # DecodeError and friends: not an ONNX file
        raise FeatgenderError(f"--weights {path}: cannot be read as an ONNX file ({type(error).__name__})") from None
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    values = [
        numpy_helper.to_array(initializers[name]) for node in graph.node for name in node.input if name in initializers
    ]
    state = MobileFaceNet().state_dict()
    names = [name for name in state if not name.endswith("num_batches_tracked")]
    if len(values) != len(names):
        raise FeatgenderError(f"--weights {path}: {len(values)} weight tensors, not InsightFace's w600k MobileFaceNet")
    for name, value in zip(names, values, strict=True):
        value = value.astype(np.float32, copy=True)  # writable, C-ordered
        if value.size != state[name].numel():
            raise FeatgenderError(f"--weights {path}: {name} has {value.shape}, not InsightFace's w600k MobileFaceNet")
        state[name] = torch.from_numpy(value).reshape(state[name].shape)  # PReLU's slopes come as (C, 1, 1)
    return state


__all__ = ["MobileFaceNet", "read_insightface_onnx"]
