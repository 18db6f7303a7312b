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
from collections.abc import Callable
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


def read_layer(reader: DlibReader, layer: tuple) -> np.ndarray | None:
    """One layer's record; returns its parameter values (con: weights then biases; affine:
    gamma then beta; fc: the (inputs x outputs) matrix), None for layers without."""
    return LAYER_READERS[layer[0]](reader, layer)


def read_con(reader: DlibReader, layer: tuple) -> np.ndarray:
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


def read_affine(reader: DlibReader, layer: tuple) -> np.ndarray:
    """An affine layer's gamma then beta; a batch-norm record (``bn_con2``, as dlib's training
    left it) becomes the affine layer dlib makes of it when it loads one for inference."""
    version = reader.expect("affine_", "affine_2", "bn_con2")
    if version == "bn_con2":
        return _batch_norm_as_affine(reader)
    params = reader.tensor()
    reader.alias_tensor(), reader.alias_tensor()
    reader.integer()  # mode
    if version == "affine_2":
        reader.boolean()  # disabled
    return params.ravel()


def _batch_norm_as_affine(reader: DlibReader) -> np.ndarray:
    """gamma / sqrt(running variance + eps), and beta - that scale * running mean (dlib's affine_(bn_))."""
    params = reader.tensor().ravel().astype(np.float64)
    reader.alias_tensor(), reader.alias_tensor()
    reader.tensor(), reader.tensor()  # the last batch's means and inverse deviations: training only
    running_means = reader.tensor().ravel().astype(np.float64)
    running_variances = reader.tensor().ravel().astype(np.float64)
    reader.integer(), reader.integer()  # updates so far, running-statistics window
    for _ in range(4):  # learning-rate and weight-decay multipliers
        reader.real()
    eps = reader.real()
    channels = running_means.size
    scale = params[:channels] / np.sqrt(running_variances + eps)
    return np.concatenate([scale, params[channels:] - scale * running_means]).astype(np.float32)


def read_relu(reader: DlibReader, layer: tuple) -> None:
    if reader.expect("relu_", "relu_2") == "relu_2":
        reader.boolean()  # disabled


def read_pool(reader: DlibReader, layer: tuple) -> None:
    kind = layer[0]
    reader.expect(f"{kind}_2")
    rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
    if (rows, cols, stride_y, stride_x, pad_y, pad_x) != (layer[1], layer[1], layer[2], layer[2], 0, 0):
        raise reader.error(
            f"a {kind} of {rows}x{cols}, stride {stride_y} where {layer[1]}x{layer[1]}, stride {layer[2]} belongs"
        )


def read_add_prev(reader: DlibReader, layer: tuple) -> None:
    reader.expect("add_prev_")


def read_fc(reader: DlibReader, layer: tuple) -> np.ndarray:
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
LAYER_READERS: dict[str, Callable[[DlibReader, tuple], np.ndarray | None]] = {
    "con": read_con,
    "affine": read_affine,
    "relu": read_relu,
    "max_pool": read_pool,
    "avg_pool": read_pool,
    "add_prev": read_add_prev,
    "fc": read_fc,
}


def read_layer_state(reader: DlibReader, version: int, next_to_input: bool) -> None:
    """What dlib's add_layer writes after its layer's record: flags and (empty) work tensors."""
    for _ in range(3):  # setup called, gradient input stale, output and gradient input disabled
        reader.boolean()
    reader.tensor(), reader.tensor()  # x_grad, cached_output
    if next_to_input or version >= 2:
        reader.tensor()  # grad_final (next to the input) or params_grad
    if next_to_input and version >= 3:
        reader.integer()  # sample expansion factor


def read_layers(reader: DlibReader, layers: list[tuple], read_input: Callable[[DlibReader], None]) -> list[tuple]:
    """A network's layer records after its loss record: (layer, values) of each of ``layers``
    (input to output, as in :func:`read_layer`) but 'tag' and 'skip'; ``read_input`` reads the
    input layer's record. Checks that nothing follows."""
    # every layer wrapper writes its version, then what it wraps: from the output down to the input
    versions = [reader.integer() for _ in layers][::-1]
    read_input(reader)
    values = []
    for index, (layer, version) in enumerate(zip(layers, versions, strict=True)):
        if layer[0] in ("tag", "skip"):
            continue
        values.append((layer, read_layer(reader, layer)))
        read_layer_state(reader, version, next_to_input=index == 0)
    if not reader.at_end():
        raise reader.error("more data after the network")
    return values


def folded_convolutions(values: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weights, biases) of each convolution of :func:`read_layers`' ``values``, in order, the
    affine layer after it (dlib's batch norm, frozen to a scale and shift) folded in."""
    convolutions, in_channels = [], 3
    for (layer, params), (next_layer, next_params) in zip(values, values[1:] + [(("end",), None)], strict=True):
        if layer[0] != "con":
            continue
        _, filters, size, _ = layer
        weights = params[: filters * in_channels * size * size].reshape(filters, in_channels, size, size)
        biases = params[filters * in_channels * size * size :].astype(np.float64)
        if next_layer[0] == "affine":
            if next_params.size != 2 * filters:
                raise FeatgenderError("dlib model: an affine layer of another width than its convolution")
            gamma, beta = next_params[:filters].astype(np.float64), next_params[filters:].astype(np.float64)
            weights, biases = weights * gamma[:, None, None, None], biases * gamma + beta
        convolutions.append((weights, biases))
        in_channels = filters
    return convolutions


__all__ = ["DlibReader", "folded_convolutions", "read_layer", "read_layers"]
