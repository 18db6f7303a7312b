"""A reader of dlib's serialization format, enough for its DNN model files (``.dat``).

Written from dlib's sources (dlib/serialize.h, dlib/float_details.h, dlib/cuda/tensor.h):

- integer: a control byte (0x80 set: negative; low 4 bits: how many bytes follow), then
  the magnitude little-endian;
- string: its length as an integer, then its bytes;
- bool: the character '1' or '0';
- float/double: an int64 mantissa then an int16 exponent, each as an integer; the value is
  mantissa * 2**exponent;
- tensor: version 2, then n, k, nr, nc as integers, then n*k*nr*nc little-endian float32;
  alias tensor (a view into a layer's parameter tensor): version 1, then n, k, nr, nc.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from featgender.errors import FeatgenderError


class DlibReader:
    """Reads dlib-serialized values one after another from the bytes of a file."""

    def __init__(self, data: bytes, source: str | Path = "<bytes>"):
        self.data = memoryview(data)
        self.source = source
        self.offset = 0

    @classmethod
    def open(cls, path: str | Path) -> DlibReader:
        return cls(Path(path).read_bytes(), path)

    def _take(self, size: int) -> memoryview:
        if self.offset + size > len(self.data):
            raise self.error(f"ends after {len(self.data)} bytes, in the middle of a value")
        piece = self.data[self.offset : self.offset + size]
        self.offset += size
        return piece

    def error(self, what: str) -> FeatgenderError:
        return FeatgenderError(
            f"{self.source}: not a dlib model file of the expected kind ({what}, byte {self.offset})"
        )

    def integer(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self.error(f"control byte {control:#04x} does not start an integer")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def string(self) -> str:
        return bytes(self._take(self.integer())).decode("latin-1")

    def boolean(self) -> bool:
        character = bytes(self._take(1))
        if character not in (b"0", b"1"):
            raise self.error(f"{character!r} is not a bool")
        return character == b"1"

    def real(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        return math.ldexp(mantissa, exponent)

    def tensor(self) -> np.ndarray:
        """A tensor's values, shaped (n, k, nr, nc)."""
        version = self.integer()
        if version != 2:
            raise self.error(f"tensor version {version}, want 2")
        shape = tuple(self.integer() for _ in range(4))
        count = math.prod(shape)
        return np.frombuffer(self._take(4 * count), dtype="<f4").reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        """An alias tensor's shape (it holds no values of its own)."""
        version = self.integer()
        if version != 1:
            raise self.error(f"alias tensor version {version}, want 1")
        return self.integer(), self.integer(), self.integer(), self.integer()

    def expect(self, *names: str) -> str:
        """Read a record's name (its version string) and check it is one of ``names``."""
        name = self.string()
        if name not in names:
            raise self.error(f"found {name!r} where {' or '.join(names)} should be")
        return name

    def at_end(self) -> bool:
        return self.offset == len(self.data)


__all__ = ["DlibReader"]
