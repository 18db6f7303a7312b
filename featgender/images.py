"""Image decoding: files (or PIL images) to uint8 RGB arrays, the same way everywhere.

The ground floor of the package: extraction's loader workers, the face step, prediction
(in torch and on onnxruntime), fine-tuning and benchmarks all decode through
:func:`decode_image`, so an image is read the same way when a cache is built and when a
model trained on it predicts. Only :func:`load_image` (a torch tensor) needs torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    import PIL.Image
    import torch


def decode_image(source: str | Path | BinaryIO | PIL.Image.Image, min_side: int | None = None) -> np.ndarray:
    """Decode an image file (or PIL image) to a uint8 (H, W, 3) RGB array.

    Grayscale (8- and 16-bit), palette, CMYK and alpha images are converted to RGB, EXIF
    orientation is applied, and JPEGs much larger than ``min_side`` are decoded at a reduced
    scale. Images over PIL's ``MAX_IMAGE_PIXELS`` (decompression bombs) are refused, not
    decoded.
    """
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        image = source
    else:
        with warnings.catch_warnings():  # PIL only warns below twice its pixel limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    if min_side is not None and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))  # DCT scaling keeps both sides >= min_side
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    if image.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: keep the top 8 bits
        depth = 16 if image.mode.startswith("I;16") or np.asarray(image).max() < 65536 else 32
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> (depth - 8)).astype(np.uint8))
    return np.array(image.convert("RGB"))


def load_image(source: str | Path | BinaryIO | PIL.Image.Image, min_side: int | None = None) -> torch.Tensor:
    """:func:`decode_image` as a uint8 (3, H, W) tensor, the layout torchvision works in."""
    import torch

    return torch.from_numpy(decode_image(source, min_side)).permute(2, 0, 1)


__all__ = ["decode_image", "load_image"]
