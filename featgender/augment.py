"""Training augmentations of a fine-tune, on uint8 (3, H, W) images.

'basic': zoom (RandomResizedCrop), horizontal flip, shear: every fine-tune's. 'web' adds what
separates web photos (FairFace) from curated crops (CelebA, UTKFace): low resolution (down,
then back up), small rotations of the alignment, grayscale, exposure and contrast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featgender.errors import FeatgenderError

AUGMENTATIONS = ("basic", "web")
LOW_RESOLUTION_P = 0.35  # share of web-augmented images seen at a lower resolution
LOW_RESOLUTION_SIDES = (0.2, 0.75)  # ... at this fraction of their side, drawn uniformly
GRAYSCALE_P = 0.15
EXPOSURE = 0.25  # brightness and contrast factors within 1 +- this
ROTATION_DEGREES = 10


class LowResolution(nn.Module):
    """With probability ``p``, an image shrunk to a random fraction ``sides`` of its side and
    resized back (bilinear): the blur and blockiness of a small web photo blown up."""

    def __init__(self, p: float = LOW_RESOLUTION_P, sides: tuple[float, float] = LOW_RESOLUTION_SIDES):
        super().__init__()
        self.p, self.sides = p, sides

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return image
        height, width = image.shape[-2:]
        fraction = self.sides[0] + (self.sides[1] - self.sides[0]) * float(torch.rand(()))
        small = (max(8, round(height * fraction)), max(8, round(width * fraction)))
        pixels = image.unsqueeze(0).float()
        pixels = F.interpolate(pixels, size=small, mode="bilinear", antialias=True, align_corners=False)
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
        return pixels.squeeze(0).round().clamp(0, 255).to(image.dtype)


def training_transform(size: int, augment: str) -> nn.Module:
    """The augmentation ``augment`` ('basic' or 'web') of a training image, cut to ``size``."""
    from torchvision.transforms import v2

    if augment not in AUGMENTATIONS:
        raise FeatgenderError(f"--augment {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    steps: list[nn.Module] = [
        v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=ROTATION_DEGREES if augment == "web" else 0, shear=10),
    ]
    if augment == "web":
        steps += [
            LowResolution(),
            v2.RandomGrayscale(GRAYSCALE_P),
            v2.ColorJitter(brightness=EXPOSURE, contrast=EXPOSURE),
        ]
    return v2.Compose(steps)
