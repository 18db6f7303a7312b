"""Batched frozen forward pass: image files in, embedding rows out (as arrays; no files written).

The fast path decodes images to uint8 on CPU loader workers (JPEGs are decoded at a reduced
scale when they are much larger than needed), moves uint8 batches to the device (pinned,
non-blocking on CUDA), and resizes, normalises and embeds them there, in channels_last
layout under ``inference_mode`` and bf16 autocast where the hardware runs it natively
(CUDA GPUs, and CPUs with AVX512-BF16 or AMX, where it halves the time per image for
features whose cosine similarity to float32 ones stays above 0.999).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch.utils.data import DataLoader, Dataset

from featgender.backbones import Backbone, EmbeddingModel
from featgender.defaults import DEFAULT_BACKBONE, cores
from featgender.errors import FeatgenderError
from featgender.images import load_image

logger = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}
PRECISIONS = ("auto", "float32", "bfloat16")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when there is a GPU, else the CPU; 'cuda' without one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise FeatgenderError(f"--device {device!r}: use auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FeatgenderError(f"--device {device}: no CUDA GPU is visible to torch here")
    return resolved


FEW_IMAGES = 32  # images embedded in this process, with no loader worker to start


def resolve_workers(
    workers: int | None, device: torch.device, loader_bound: bool = False, images: int | None = None
) -> int:
    """Loader workers: ``workers`` as given, else on GPU up to 8; on CPU one, as the cores run
    the forward pass, or one per core where the loader does the heavy work (``loader_bound``:
    face detection); none for at most :data:`FEW_IMAGES` ``images`` (starting a worker costs
    more than they do)."""
    if workers is not None:
        if workers < 0:
            raise FeatgenderError(f"--workers {workers}: use 0 (decode in this process) or more")
        return workers
    if images is not None and images <= FEW_IMAGES:
        return 0
    if device.type == "cuda":
        return min(8, max(1, cores() - 1))
    return cores() if loader_bound else 1


def detects_on_loader(backbone: Backbone) -> bool:
    """Whether the loader workers detect faces for ``backbone`` (tens of ms per image, more than
    a forward pass): photos through the face step, or face alignment without a fixed box."""
    config = backbone.config
    return bool(config.face_step) or (bool(config.alignment) and config.face_box is None)


class _SharedCores:
    """torch's intra-op threads while loader workers run a loader step (face alignment) on the
    same CPU cores: the cores the workers leave. Three busy threads on two cores cost dlib's
    network 20-45 % of its speed (embedding 2,000 UTKFace faces: 4.8-5.4 s with two threads
    beside the aligning worker, 4.1 s with one; FairFace's 2,500 checked crops: 8.5-9.1 s
    against 5.0 s). A network the loader keeps fed keeps every core: EfficientNet-Lite0 on
    decoded crops (12.7 s against 17 s with one), and a face network whose forward pass
    outweighs the alignment (``outweighs_alignment``; arcface_mbf on 2,000 FairFace faces:
    31 s against 43 s with one). Threads of one process embedding at once share one count,
    restored when the last is done."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved = 0

    @contextmanager
    def beside(self, workers: int, device: torch.device, backbone: Backbone) -> Iterator[None]:
        config = backbone.config
        network_bound = config.outweighs_alignment and not detects_on_loader(backbone)
        if device.type != "cpu" or not workers or backbone.transform.loader_step is None or network_bound:
            yield
            return
        with self.lock:
            if not self.users:
                self.saved = torch.get_num_threads()
            self.users += 1
            torch.set_num_threads(max(1, cores() - workers))
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if not self.users:
                    torch.set_num_threads(self.saved)


SHARED_CORES = _SharedCores()


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass: small on CPU (cache-friendly, measured fastest), large on GPU."""
    return 128 if device.type == "cuda" else 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bfloat16 where the device computes it natively, else float32."""
    if precision not in PRECISIONS:
        raise FeatgenderError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native_bf16 = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return "bfloat16" if native_bf16 else "float32"


def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` ('auto' resolved for ``device``) computes under bfloat16 autocast:
    the one decision extraction, fine-tuning and the benchmarks share."""
    return resolve_precision(precision, device) == "bfloat16"


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn`` (with the loader's pid bound): the kernel kills this
    worker the moment its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Otherwise a parent killed with ``kill -9`` (an OOM killer, a crashed shell) leaves its
    forked workers running for seconds, until torch's watchdog notices, holding whatever they
    inherited. Elsewhere this does nothing.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


def worker_init() -> functools.partial:
    """The ``worker_init_fn`` for loaders started by this process: :func:`die_with_parent`."""
    return functools.partial(die_with_parent, os.getpid())


class ImageFiles(Dataset):
    """Images by index, decoded to uint8; a file that cannot be decoded gives its error instead.

    ``loader_step`` (a backbone transform's per-image CPU step, such as face alignment) runs
    here, on the loader workers, after decoding.
    """

    def __init__(self, sources: Sequence, min_side: int | None, loader_step=None):
        self.sources = sources
        self.min_side = min_side
        self.loader_step = loader_step

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = load_image(self.sources[index], self.min_side)
            return index, image if self.loader_step is None else self.loader_step(image), ""
        except FeatgenderError as error:
            return index, None, str(error)
        except Exception as error:  # PIL raises many types for broken files; each is reported
            return index, None, f"{type(error).__name__}: {error}"


@dataclass
class ImageBatch:
    """A collated batch: row indices, the decodable images, and an error per row ('' if fine)."""

    indices: np.ndarray
    images: torch.Tensor | list[torch.Tensor] | None
    ok: np.ndarray
    errors: list[str]

    def pin_memory(self) -> ImageBatch:
        if isinstance(self.images, torch.Tensor):
            self.images = self.images.pin_memory()
        return self


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> ImageBatch:
    """Stack same-sized images into one tensor; keep a list when sizes differ."""
    found = [image for _, image, _ in items if image is not None]
    images: torch.Tensor | list[torch.Tensor] | None = found or None
    if found and all(image.shape == found[0].shape for image in found):
        images = torch.stack(found)
    return ImageBatch(
        indices=np.array([index for index, _, _ in items], dtype=np.int64),
        images=images,
        ok=np.array([image is not None for _, image, _ in items]),
        errors=[error for _, _, error in items],
    )


def iter_features(
    backbone: Backbone, sources: Sequence, **options
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Embed ``sources[start:]`` in order, one batch at a time, at the backbone's layer.

    Options are :func:`iter_layer_features`'. Yields (indices, features, errors): row numbers
    into ``sources``; a (len(indices), D) array of ``dtype``, NaN rows where an image failed;
    one message per row, '' where the image was embedded.
    """
    layer = _only_layer(backbone, instead="iter_layer_features")
    for indices, features, errors in iter_layer_features(backbone, sources, **options):
        yield indices, features[layer], errors


def _only_layer(backbone: Backbone, instead: str) -> str:
    """The one layer ``backbone`` was built for; built for several, an error naming the
    function that takes them all (``instead``)."""
    if len(backbone.layers) > 1:
        raise FeatgenderError(f"{backbone.config.name}: built for {len(backbone.layers)} layers; use {instead}")
    return backbone.layers[0]


def iter_layer_features(
    backbone: Backbone,
    sources: Sequence,
    *,
    start: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    workers: int | None = None,
    dtype: str = "float16",
    precision: str = "auto",
    flip: bool = False,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], list[str]]]:
    """Embed ``sources[start:]`` in order, one batch at a time, at every layer the backbone was
    built for (``build_backbone(layer=[...])``), all from one forward pass per batch.

    ``batch_size`` and ``workers`` default to what suits the device (see
    :func:`default_batch_size`, :func:`resolve_workers`); ``precision`` is the autocast type
    (see :func:`resolve_precision`); ``dtype`` is the type of the returned features.
    ``flip`` averages each embedding with that of the mirrored image (test-time augmentation).

    Yields
    ------
    indices : row numbers into ``sources``.
    features : per layer, a (len(indices), D) array of ``dtype``; NaN rows where an image failed.
    errors : one message per row, '' where the image was embedded.
    """
    if dtype not in DTYPES:
        raise FeatgenderError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    device = resolve_device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if batch_size < 1:
        raise FeatgenderError(f"--batch-size {batch_size}: must be at least 1")
    workers = resolve_workers(workers, device, loader_bound=detects_on_loader(backbone), images=len(sources) - start)
    autocast = uses_bfloat16(precision, device)
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    transform = backbone.transform.to(device)
    dims = {layer: backbone.at(layer).feature_dim for layer in backbone.layers}
    loader = _image_loader(
        backbone, [sources[i] for i in range(start, len(sources))], batch_size, workers, pin=device.type == "cuda"
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=len(sources), initial=start, unit="img", disable=not progress, desc=backbone.config.name)
    with SHARED_CORES.beside(workers, device, backbone):
        for batch in loader:
            features = {
                layer: np.full((len(batch.indices), dim), np.nan, dtype=DTYPES[dtype]) for layer, dim in dims.items()
            }
            if batch.images is not None:
                # entered per batch, never held across a yield: autocast and inference mode are the
                # thread's state, and a caller that stops iterating must not be left inside them
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    pixels = transform(_to_device(batch.images, device), torch.bfloat16 if autocast else torch.float32)
                    embedded = _forward(model, pixels, backbone.layers)
                    if flip:
                        mirrored = _forward(model, pixels.flip(-1), backbone.layers)
                        embedded = {layer: (rows + mirrored[layer]) / 2 for layer, rows in embedded.items()}
                    for layer, rows in embedded.items():
                        features[layer][batch.ok] = rows.float().cpu().numpy().astype(DTYPES[dtype], copy=False)
            bar.update(len(batch.indices))
            yield batch.indices + start, features, batch.errors
    bar.close()


def _forward(model: torch.nn.Module, pixels: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each layer's embedding rows: an :class:`EmbeddingModel`'s, or the rows any other model
    gives (a fine-tuned network's P(male), for prediction) as its one layer."""
    if isinstance(model, EmbeddingModel):
        return model.forward_layers(pixels)
    return {layers[0]: model(pixels)}


def _image_loader(backbone: Backbone, sources: Sequence, batch_size: int, workers: int, pin: bool) -> DataLoader:
    """Batches of ``sources`` decoded (and aligned, for face backbones) on ``workers`` processes."""
    return DataLoader(
        # photos for the face step decode whole: a face is a small part of them
        ImageFiles(
            sources,
            None if backbone.config.face_step else backbone.config.resize_size,
            backbone.transform.loader_step,
        ),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=worker_init() if workers else None,
    )


def _to_device(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """A batch (or a list of differently sized images) on ``device``, without blocking on CUDA."""
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [image.to(device, non_blocking=True) for image in images]


def extract_features(backbone: Backbone, sources: Sequence, **options) -> tuple[np.ndarray, list[str]]:
    """All embeddings of ``sources`` at once (in memory): features and per-row errors."""
    layer = _only_layer(backbone, instead="extract_layer_features")
    features, errors = extract_layer_features(backbone, sources, **options)
    return features[layer], errors


def extract_layer_features(backbone: Backbone, sources: Sequence, **options) -> tuple[dict[str, np.ndarray], list[str]]:
    """:func:`extract_features` at every layer the backbone was built for, from one forward
    pass per batch: each layer's features, and per-row errors."""
    blocks: dict[str, list[np.ndarray]] = {layer: [] for layer in backbone.layers}
    errors: list[str] = []
    for _, batch_features, batch_errors in iter_layer_features(backbone, sources, **options):
        for layer, rows in batch_features.items():
            blocks[layer].append(rows)
        errors.extend(batch_errors)
    dtype = DTYPES[options.get("dtype", "float16")]
    return {
        layer: np.concatenate(rows) if rows else np.empty((0, backbone.at(layer).feature_dim), dtype=dtype)
        for layer, rows in blocks.items()
    }, errors


class CNNFeatures(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: image paths or PIL images → frozen CNN embeddings (float32).

    >>> from sklearn.pipeline import make_pipeline  # doctest: +SKIP
    >>> model = make_pipeline(CNNFeatures("resnet50"), LogisticRegression())  # doctest: +SKIP
    >>> model.fit(train_paths, train_labels).predict(test_paths)  # doctest: +SKIP

    The backbone is built in ``fit`` (nothing is learned from the images); an image that cannot
    be decoded is an error naming it.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        *,
        weights: str = "default",
        layer: str | None = None,
        batch_size: int | None = None,
        device: str = "auto",
        progress: bool = False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def fit(self, X=None, y=None) -> CNNFeatures:
        from featgender.backbones import build_backbone

        self.backbone_ = build_backbone(self.backbone, weights=self.weights, layer=self.layer)
        self.n_features_out_ = self.backbone_.feature_dim
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "backbone_")
        images = list(X)
        features, errors = extract_features(
            self.backbone_,
            images,
            batch_size=self.batch_size,
            device=self.device,
            dtype="float32",
            workers=0,
            progress=self.progress,
        )
        failed = next((i for i, error in enumerate(errors) if error), None)
        if failed is not None:
            raise FeatgenderError(f"{images[failed]}: cannot be read as an image ({errors[failed]})")
        return features

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        return np.array([f"{self.backbone}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # takes a list of images, not a numeric matrix
        tags.requires_fit = True
        return tags
