"""An exported model (``featgender export``, one ONNX graph) predicting on onnxruntime, without torch.

The graph takes each backbone's input cut from the image: here the image is decoded
(:func:`featgender.images.decode_image`, as extraction decodes it), then either aligned to
dlib's face chip (:class:`featgender.faces.FaceAligner`, the same code extraction runs) or
resized on its shorter side and centre-cropped with PIL, as torchvision does (within a grey
level). Photos go through the same face step as in torch (:mod:`featgender.predictor`).
Needs ``onnxruntime`` (``pip install 'featgender[onnx]'``), numpy and PIL; dlib for face
backbones and photos (``featgender[faces]``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache, partial
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from featgender.errors import FeatgenderError
from featgender.faces import BOX_IN_FACE_CROP, PhotoFaceStep, chip_aligner, default_detector
from featgender.images import decode_image
from featgender.predictor import ImagePredictor
from featgender.threads import map_in_threads

EXPORT_FORMAT = "featgender-onnx"
EXPORT_VERSION = 1
METADATA_KEY = "featgender"  # the graph's one metadata entry: JSON of what the runtime and the model card need
OUTPUT = "p_male"
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
DEFAULT_BATCH = 32

Prepare = Callable[[np.ndarray], np.ndarray]  # a decoded (H, W, 3) image to one input's (3, S, S)


def resize_crop(pixels: np.ndarray, resize_size: int, input_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """A uint8 (H, W, 3) image resized (antialiased) so its shorter side is ``resize_size``, then
    centre-cropped to ``input_size`` (zero-padded where smaller): torchvision's resize and
    center_crop, with the same output sizes and offsets."""
    height, width = pixels.shape[:2]
    if min(height, width) != resize_size:
        long = int(resize_size * max(height, width) / min(height, width))
        size = (resize_size, long) if width <= height else (long, resize_size)  # PIL's (width, height)
        pixels = np.asarray(Image.fromarray(pixels).resize(size, RESAMPLING[interpolation]))
        height, width = pixels.shape[:2]
    if min(height, width) < input_size:
        pad_h, pad_w = max(input_size - height, 0), max(input_size - width, 0)
        pixels = np.pad(pixels, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        height, width = pixels.shape[:2]
    top, left = int(round((height - input_size) / 2.0)), int(round((width - input_size) / 2.0))
    return pixels[top : top + input_size, left : left + input_size]


def read_metadata(path: str | Path, session) -> dict:
    """The featgender metadata of an exported model's session, checked."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise FeatgenderError(f"--model {path}: an ONNX file, but not one featgender exported (no metadata)")
    if metadata.get("format_version") != EXPORT_VERSION:
        raise FeatgenderError(
            f"--model {path}: export format {metadata.get('format_version')}, this featgender reads {EXPORT_VERSION}"
        )
    return metadata


def _providers(device: str, available: list[str]) -> list:
    """onnxruntime's execution providers for ``--device``: 'auto' (CUDA where this onnxruntime
    has it, else the CPU), 'cpu', or 'cuda[:N]' (``onnxruntime-gpu``)."""
    if device == "auto":
        return [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise FeatgenderError(f"--device {device!r}: use auto, cpu or cuda[:N]")
    if "CUDAExecutionProvider" not in available:
        raise FeatgenderError(f"--device {device}: this onnxruntime has no CUDA (pip install onnxruntime-gpu)")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)})]


def _session(path: Path, device: str):
    """An onnxruntime session of the file on ``device``."""
    try:
        import onnxruntime
    except ImportError:
        raise FeatgenderError(f"--model {path}: running an ONNX model needs pip install 'featgender[onnx]'") from None
    providers = _providers(device, onnxruntime.get_available_providers())
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as error:  # onnxruntime's Fail / InvalidProtobuf / NoSuchFile
        raise FeatgenderError(f"--model {path}: onnxruntime cannot load it ({str(error).splitlines()[0]})") from None


class OnnxPredictor(ImagePredictor):
    """An exported model on onnxruntime, with the same ``predict`` as the torch predictors.

    ``model`` (head models) or ``checkpoint`` (fine-tuned ones) hold what the source model
    recorded of itself, as the torch predictors do, for the model card. ``options`` are
    :class:`ImagePredictor`'s; ``workers`` threads cut the images (default: one per core);
    the graph computes in float32 (``precision`` 'auto' or 'float32').
    """

    def __init__(self, path: str | Path, **options):
        super().__init__(**options)
        if self.options["precision"] not in ("auto", "float32"):
            raise FeatgenderError(f"--precision {self.options['precision']}: an exported graph computes in float32")
        path = Path(path)
        if not path.is_file():
            raise FeatgenderError(f"--model {path}: no such file")
        self.session = _session(path, str(self.options["device"]))
        self.metadata = read_metadata(path, self.session)
        self.inputs: list[dict] = self.metadata["inputs"]
        if self.metadata["kind"] == "finetuned":
            self.checkpoint = self.metadata["checkpoint"]
        else:
            self.model = SimpleNamespace(**self.metadata["model"], sha256=self.metadata["source"]["sha256"])
        # one face-aligning input finds the faces for all: the others take the crop the face step cuts
        self.input_kind = "photo" if any(spec.get("alignment") for spec in self.inputs) else "face crop"
        self.batch_size = self.options["batch_size"] or DEFAULT_BATCH
        self.workers = self.options["workers"]

    def _steps(self, images: list, face_crops: bool, check_box: bool) -> list[tuple[bool, tuple | None, bool]]:
        """Per input: whether the face step runs first, the box a face chip is aligned in, and
        whether the face is checked to be in it (``check_box``; not where the face step put it)."""
        box_in_images = cache(partial(self.face_box_for, images))  # calibrated once, for every input that needs it
        steps = []
        for spec in self.inputs:
            cut_by_face_step = face_crops or bool(spec.get("face_step"))  # here, or before these images came
            box = None
            if spec.get("alignment"):
                box = BOX_IN_FACE_CROP if cut_by_face_step else box_in_images()
            steps.append((bool(spec.get("face_step")) and not face_crops, box, check_box and not cut_by_face_step))
        return steps

    def _preparers(self, steps: list[tuple[bool, tuple | None, bool]]) -> list[Prepare]:
        """How one image becomes each input: the face step (photo models), then the chip or the crop.
        dlib's detectors keep state while they run: each thread makes its own."""
        preparers = []
        for spec, (face_step, box, check) in zip(self.inputs, steps, strict=True):
            if spec.get("alignment"):  # dlib's chip goes unsaid
                cut: Prepare = chip_aligner(spec.get("chip", "dlib"), box=box, check=check).chip
            else:
                cut = partial(resize_crop, **{key: spec[key] for key in ("resize_size", "input_size", "interpolation")})
            preparers.append(_after(PhotoFaceStep(default_detector()).face, cut) if face_step else cut)
        return preparers

    def _prepare(self, preparers: list[Prepare], image) -> tuple[list[np.ndarray] | None, str]:
        """One image's inputs (channels first), or the error that stopped it."""
        try:
            decoded: dict[int | None, np.ndarray] = {}
            prepared = []
            for spec, prepare in zip(self.inputs, preparers, strict=True):
                min_side = None if spec.get("face_step") else spec["resize_size"]
                if min_side not in decoded:
                    decoded[min_side] = decode_image(image, min_side)
                prepared.append(np.ascontiguousarray(prepare(decoded[min_side]).transpose(2, 0, 1)))
            return prepared, ""
        except FeatgenderError as error:
            return None, str(error)
        except Exception as error:  # PIL raises many types for broken files; each is reported
            return None, f"{type(error).__name__}: {error}"

    def probabilities(
        self, images: list, progress: bool, face_crops: bool = False, check_box: bool = False
    ) -> tuple[np.ndarray, list[str]]:
        from tqdm.auto import tqdm

        steps = self._steps(images, face_crops, check_box)
        probabilities, errors = np.full(len(images), np.nan), [""] * len(images)
        bar = tqdm(total=len(images), unit="img", disable=not progress, desc="onnxruntime")
        # the next batch is cut while onnxruntime runs this one
        prepared = map_in_threads(
            self._prepare, images, partial(self._preparers, steps), self.workers, ahead=2 * self.batch_size
        )
        for start in range(0, len(images), self.batch_size):
            batch = list(islice(prepared, self.batch_size))
            errors[start : start + len(batch)] = [error for _, error in batch]
            ok = [i for i, (inputs, _) in enumerate(batch) if inputs is not None]
            if ok:
                feeds = {
                    spec["name"]: np.stack([batch[i][0][k] for i in ok])  # type: ignore[index]
                    for k, spec in enumerate(self.inputs)
                }
                (output,) = self.session.run([OUTPUT], feeds)
                probabilities[[start + i for i in ok]] = output
            bar.update(len(batch))
        bar.close()
        return probabilities, errors


def _after(first: Prepare, then: Prepare) -> Prepare:
    return lambda pixels: then(first(pixels))


__all__ = ["EXPORT_FORMAT", "METADATA_KEY", "OnnxPredictor", "read_metadata", "resize_crop"]
