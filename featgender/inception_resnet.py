"""Inception-ResNet-v1, the face-recognition network of FaceNet, as trained on VGGFace2.

Written here so that the checkpoint published with facenet-pytorch
(``20180402-114759-vggface2.pt``, a port of David Sandberg's TensorFlow model) loads with
``torch.load(weights_only=True)`` and ``load_state_dict``: module names follow that state_dict
(``conv2d_1a.conv.weight``, ``repeat_1.0.branch1.1.bn.running_mean``, ``last_bn.weight``, ...).
Its classifier over the 8,631 VGGFace2 identities (``logits.*``) is not part of the network.

Input: 160 x 160 RGB face crops standardised as ``(x - 127.5) / 128``. Output: the 512-d
embedding, L2-normalised as FaceNet defines it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCHNORM_EPS = 1e-3  # the TensorFlow original's


class ConvBNReLU(nn.Module):
    """Convolution without bias, batch norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BATCHNORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(*layers: tuple) -> nn.Sequential:
    """ConvBNReLU layers from (in, out, kernel, stride, padding) tuples."""
    return nn.Sequential(*(ConvBNReLU(*layer) for layer in layers))


class Branches(nn.Module):
    """Parallel branches (``branch0``, ``branch1``, ...) concatenated along channels."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branch_count = len(branches)
        for index, branch in enumerate(branches):
            self.add_module(f"branch{index}", branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, f"branch{index}")(x) for index in range(self.branch_count)], 1)


class ResidualBranches(Branches):
    """Inception-ResNet block: branches → 1x1 conv (``conv2d``) → scaled residual → ReLU."""

    def __init__(self, channels: int, branch_channels: int, *branches: nn.Module, scale: float, relu: bool = True):
        super().__init__(*branches)
        self.conv2d = nn.Conv2d(branch_channels, channels, kernel_size=1)
        self.scale = scale
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.scale * self.conv2d(super().forward(x))
        return F.relu(out) if self.relu else out


def block35(scale: float) -> ResidualBranches:
    """Inception-ResNet-A on the 35 x 35 grid (256 channels)."""
    return ResidualBranches(
        256,
        96,
        ConvBNReLU(256, 32, 1),
        _chain((256, 32, 1), (32, 32, 3, 1, 1)),
        _chain((256, 32, 1), (32, 32, 3, 1, 1), (32, 32, 3, 1, 1)),
        scale=scale,
    )


def block17(scale: float) -> ResidualBranches:
    """Inception-ResNet-B on the 17 x 17 grid (896 channels)."""
    return ResidualBranches(
        896,
        256,
        ConvBNReLU(896, 128, 1),
        _chain((896, 128, 1), (128, 128, (1, 7), 1, (0, 3)), (128, 128, (7, 1), 1, (3, 0))),
        scale=scale,
    )


def block8(scale: float, relu: bool = True) -> ResidualBranches:
    """Inception-ResNet-C on the 8 x 8 grid (1792 channels)."""
    return ResidualBranches(
        1792,
        384,
        ConvBNReLU(1792, 192, 1),
        _chain((1792, 192, 1), (192, 192, (1, 3), 1, (0, 1)), (192, 192, (3, 1), 1, (1, 0))),
        scale=scale,
        relu=relu,
    )


class InceptionResnetV1(nn.Module):
    """FaceNet's Inception-ResNet-v1 embedding network (512-d, unit length)."""

    def __init__(self, embedding_dim: int = 512):
        super().__init__()
        self.conv2d_1a = ConvBNReLU(3, 32, 3, stride=2)
        self.conv2d_2a = ConvBNReLU(32, 32, 3)
        self.conv2d_2b = ConvBNReLU(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvBNReLU(64, 80, 1)
        self.conv2d_4a = ConvBNReLU(80, 192, 3)
        self.conv2d_4b = ConvBNReLU(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*(block35(0.17) for _ in range(5)))
        self.mixed_6a = Branches(  # reduction to 17 x 17: 384 + 256 + 256 channels
            ConvBNReLU(256, 384, 3, stride=2),
            _chain((256, 192, 1), (192, 192, 3, 1, 1), (192, 256, 3, 2)),
            nn.MaxPool2d(3, stride=2),
        )
        self.repeat_2 = nn.Sequential(*(block17(0.10) for _ in range(10)))
        self.mixed_7a = Branches(  # reduction to 8 x 8: 384 + 256 + 256 + 896 channels
            _chain((896, 256, 1), (256, 384, 3, 2)),
            _chain((896, 256, 1), (256, 256, 3, 2)),
            _chain((896, 256, 1), (256, 256, 3, 1, 1), (256, 256, 3, 2)),
            nn.MaxPool2d(3, stride=2),
        )
        self.repeat_3 = nn.Sequential(*(block8(0.20) for _ in range(5)))
        self.block8 = block8(1.0, relu=False)
        self.last_linear = nn.Linear(1792, embedding_dim, bias=False)
        self.last_bn = nn.BatchNorm1d(embedding_dim, eps=BATCHNORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for stage in (
            self.conv2d_1a,
            self.conv2d_2a,
            self.conv2d_2b,
            self.maxpool_3a,
            self.conv2d_3b,
            self.conv2d_4a,
            self.conv2d_4b,
            self.repeat_1,
            self.mixed_6a,
            self.repeat_2,
            self.mixed_7a,
            self.repeat_3,
            self.block8,
        ):
            x = stage(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.normalize(self.last_bn(self.last_linear(x)), p=2, dim=1)
