"""``featgender export``: a saved model as one ONNX graph, pixels in, P(male) out.

The graph holds everything after the image has been cut to the network's input: the
normalisation, the network(s), the pooling, the flip averaging where the features were
flipped, the joining of several backbones' features, and the head's whole pipeline
(:mod:`featgender.head_graph`), in float32. Its inputs, one per network (a network the model
joins at several layers is held and run once), are uint8 (N, 3, S, S) batches of any size:
dlib_resnet's aligned face chip, or the image resized (shorter side) and centre-cropped as
extraction does. The file's metadata records how to cut them and everything the saved model
records of itself (backbone, weights sha256, training data, test metrics, versions), so that
:mod:`featgender.runtime` predicts and the model card is rebuilt from the file alone, on
onnxruntime, without torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from featgender.backbones import Backbone, EmbeddingModel, Preprocess
from featgender.defaults import EXPORTED_SUFFIX, FINETUNED_SUFFIXES
from featgender.errors import FeatgenderError
from featgender.files import atomic_write, file_sha256
from featgender.runtime import EXPORT_FORMAT, EXPORT_VERSION, METADATA_KEY, OUTPUT
from featgender.version import __version__

OPSET = 18


class ImageNetwork(nn.Module):
    """uint8 pixels to features (or P(male)): cast, normalise as the backbone's transform
    does, run the network (a network built at several layers: each layer's features side by
    side, in its order); with ``flip``, the mean with the mirrored image's output."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, network: nn.Module, mean: torch.Tensor, std: torch.Tensor, flip: bool = False):
        super().__init__()
        self.network = network
        self.register_buffer("mean", mean.reshape(1, 3, 1, 1).float())
        self.register_buffer("std", std.reshape(1, 3, 1, 1).float())
        self.flip = flip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(torch.float32) - self.mean) / self.std
        out = self._features(x)
        return (out + self._features(x.flip(-1))) / 2 if self.flip else out

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.network, EmbeddingModel) and len(self.network.layers) > 1:
            return torch.cat(list(self.network.forward_layers(x).values()), 1)
        return self.network(x)


class ExportedModel(nn.Module):
    """Each input through its network, the features joined (their columns put back in the
    model's order where a network's layers are not side by side in it), then the head:
    P(male), (N,)."""

    columns: torch.Tensor | None

    def __init__(self, branches: list[ImageNetwork], head: nn.Module, columns: torch.Tensor | None = None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.head = head
        self.register_buffer("columns", columns)

    def forward(self, *pixels: torch.Tensor) -> torch.Tensor:
        features = [branch(x) for branch, x in zip(self.branches, pixels, strict=True)]
        joined = torch.cat(features, 1) if len(features) > 1 else features[0]
        return self.head(joined if self.columns is None else joined[:, self.columns])


def _model_columns(dims: list[int], groups: list[list[int]]) -> torch.Tensor | None:
    """Where each of the model's feature columns lies in the graph's join, which takes the
    backbones entries network by network (``groups``); None where that is the model's order."""
    order = [index for group in groups for index in group]
    if order == sorted(order):
        return None
    starts, start = {}, 0
    for index in order:
        starts[index], start = start, start + dims[index]
    return torch.cat([torch.arange(starts[i], starts[i] + dims[i]) for i in range(len(dims))])


def _normalisation(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std (in 0..255 units) the backbone's transform applies; a face-chip
    transform applies none (dlib's network normalises its input itself)."""
    if isinstance(backbone.transform, Preprocess):
        return backbone.transform.mean, backbone.transform.std
    return torch.zeros(3), torch.ones(3)


def _input_record(name: str, backbone: Backbone, entry: dict | None = None) -> dict:
    """How the runtime cuts an image into this input: the preprocessing the features had."""
    preprocessing = json.loads(entry["preprocessing"]) if entry else backbone.config.preprocessing()
    return {"name": name, "backbone": backbone.config.name, "size": backbone.config.input_size, **preprocessing}


def _head_model(path: Path, trusted: bool) -> tuple[nn.Module, list[dict], dict]:
    """A head artifact's graph module, its inputs and its metadata."""
    from featgender.head_graph import head_network
    from featgender.heads import load_model
    from featgender.predict import network_groups, rebuild_backbone

    model = load_model(path, trusted=trusted)
    entries = model.backbones
    groups = network_groups(entries)
    branches, inputs = [], []
    for index, group in enumerate(groups):
        entry = entries[group[0]]
        backbone = rebuild_backbone(entry, layers=[entries[i]["layer"] for i in group])
        branches.append(ImageNetwork(backbone.model, *_normalisation(backbone), flip=bool(entry.get("flip"))))
        inputs.append(_input_record(f"pixels_{index}", backbone, entry))
    columns = _model_columns([entry["feature_dim"] for entry in entries], groups)
    record = {key: getattr(model, key) for key in ("head", "params", "backbones", "training", "metrics", "versions")}
    return ExportedModel(branches, head_network(model.pipeline), columns), inputs, {"kind": "head", "model": record}


def _finetuned_model(path: Path) -> tuple[nn.Module, list[dict], dict]:
    """A fine-tuned network's graph module (its logit squashed), its input and its metadata."""
    from featgender.finetune import load_finetuned

    net, backbone, saved = load_finetuned(path, device="cpu")
    branch = ImageNetwork(nn.Sequential(net, nn.Unflatten(0, (-1, 1))), *_normalisation(backbone))
    checkpoint = {key: value for key, value in saved.items() if key not in ("state_dict", "optimizer")}
    return (
        ExportedModel([branch], nn.Sequential(nn.Flatten(0), nn.Sigmoid())),
        [_input_record("pixels_0", backbone)],
        {"kind": "finetuned", "checkpoint": checkpoint},
    )


def exported_module(model: Path, *, trusted: bool = False) -> tuple[nn.Module, list[dict], dict]:
    """What :func:`export_onnx` exports, as a torch module in eval mode: uint8 pixels (one
    batch per input) to P(male); its inputs' records and the model's own record."""
    if model.suffix in FINETUNED_SUFFIXES:
        network, inputs, record = _finetuned_model(model)
    else:
        network, inputs, record = _head_model(model, trusted)
    return network.eval(), inputs, record


def export_onnx(model: str | Path, out: str | Path | None = None, *, trusted: bool = False) -> Path:
    """Write ``model`` (a head artifact or a fine-tuned checkpoint) as one ONNX graph.

    ``out`` defaults to the model's path with ``.onnx``. The file is written atomically; the
    model it comes from is only read. Returns the path written.
    """
    model = Path(model)
    if not model.is_file():
        raise FeatgenderError(f"--model {model}: no such file")
    out = Path(out) if out is not None else model.with_suffix(EXPORTED_SUFFIX)
    if out.suffix != EXPORTED_SUFFIX:
        raise FeatgenderError(f"--out {out}: an exported model's file ends in {EXPORTED_SUFFIX}")
    if out.resolve() == model.resolve():
        raise FeatgenderError(f"--out {out}: would overwrite the model it is exported from")
    network, inputs, record = exported_module(model, trusted=trusted)
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "featgender": __version__,
        "source": {"file": model.name, "sha256": file_sha256(model)},
        "inputs": inputs,
        "output": OUTPUT,
        **record,
    }
    proto = _onnx_graph(network, inputs)
    proto.doc_string = f"featgender {record['kind']} model exported from {model.name}: uint8 pixels to P(male)"
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, default=str)
    with atomic_write(out, kind="an ONNX graph") as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return out


def _onnx_graph(network: nn.Module, inputs: list[dict]):
    """The ONNX ModelProto of ``network`` traced on two images per input, batch size dynamic."""
    examples = tuple(torch.zeros(2, 3, spec["size"], spec["size"], dtype=torch.uint8) for spec in inputs)
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            # several inputs share the one batch dimension, which torch says it then renames
            warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
            program = torch.onnx.export(
                network,
                examples,
                input_names=[spec["name"] for spec in inputs],
                output_names=[OUTPUT],
                dynamic_shapes=(tuple({0: batch} for _ in inputs),),  # forward(*pixels): one parameter
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except ImportError as error:  # the exporter's own dependencies (onnxscript, onnx)
        raise FeatgenderError(f"export needs {error.name or 'onnx'}: pip install 'featgender[export]'") from None
    assert program is not None  # torch.onnx.export returns the program when no file is given
    return program.model_proto


__all__ = ["export_onnx", "exported_module"]
