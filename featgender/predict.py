"""Predict gender on raw images in torch: a saved head with its backbone(s) rebuilt, or a
fine-tuned network. (:func:`featgender.models.load` opens any saved model; an exported ONNX
graph runs on :mod:`featgender.runtime`.)

>>> predictor = featgender.load("models/logreg.joblib")  # doctest: +SKIP
>>> predictor.predict(["face.jpg"])[0].label  # doctest: +SKIP
'female'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featgender.backbones import Backbone, build_backbone, with_face_box
from featgender.embed import extract_features, extract_layer_features
from featgender.errors import FeatgenderError
from featgender.heads import HeadModel
from featgender.predictor import ImagePredictor


def _weights_option(entry: dict) -> str:
    """The ``weights=`` value that rebuilds the weights a model's features came from."""
    name = str(entry.get("weights", ""))
    if name.startswith("none"):
        return "none"
    if name.startswith("file:"):
        return entry["weights_path"]
    return "default"


def rebuild_backbone(entry: dict, *, face_crops: bool = False, layers: Sequence[str] = ()) -> Backbone:
    """Build the backbone described by one of a model's ``backbones`` entries; check its weights.

    ``face_crops``: the images will be faces cut from photos by the face step, which a model
    trained on a photo cache must not run again (where to align them: :func:`aligned_for`).
    ``layers``: the network's layers to embed at in one pass (default: the entry's).
    """
    preprocessing = json.loads(entry.get("preprocessing") or "{}")
    weights = _weights_option(entry)
    if weights not in ("none", "default") and not Path(weights).is_file():
        raise FeatgenderError(
            f"{entry['backbone']}: the model's weights file {weights} is missing: its features came from that "
            "network (put the file back there, or use the model exported to ONNX, which carries it)"
        )
    backbone = build_backbone(
        entry["backbone"],
        weights=weights,
        layer=list(layers) if len(layers) > 1 else entry["layer"],
        face_box=preprocessing.get("face_box"),
        find_faces=bool(preprocessing.get("face_step")) and not face_crops,
    )
    if (backbone.weights.sha256 or "") != (entry.get("weights_sha256") or ""):
        raise FeatgenderError(
            f"{entry['backbone']}: weights here ({backbone.weights.name}, sha256 {str(backbone.weights.sha256)[:12]}) "
            f"are not the ones the model was trained on (sha256 {str(entry.get('weights_sha256'))[:12]})"
        )
    return backbone


def network_groups(entries: Sequence[dict]) -> list[list[int]]:
    """A model's ``backbones`` entries grouped by the network computing them: entries that
    differ only in their layer (one network joined at two layers) share one forward pass."""
    groups: list[list[int]] = []
    for index, entry in enumerate(entries):
        network, layer = _network(entry), entry["layer"]
        shared = [
            group
            for group in groups
            if _network(entries[group[0]]) == network and all(entries[i]["layer"] != layer for i in group)
        ]
        if shared:
            shared[0].append(index)
        else:
            groups.append([index])
    return groups


def _network(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key not in ("layer", "feature_dim")}


def aligned_for(
    predictor: ImagePredictor, backbone: Backbone, images: list, face_crops: bool = False, check_box: bool = False
) -> Backbone:
    """``backbone`` finding the faces of ``images`` where ``predictor`` says they are (a
    face-aligning backbone not behind the face step), else ``backbone`` itself; ``check_box``:
    failing the images whose face is not there."""
    if not backbone.config.alignment or backbone.config.face_step:
        return backbone
    return with_face_box(backbone, predictor.face_box_for(images, face_crops), check=check_box and not face_crops)


class Predictor(ImagePredictor):
    """A head artifact with its backbone(s) rebuilt, ready for raw images."""

    def __init__(self, model: HeadModel, **options):
        super().__init__(**options)
        self.model = model
        self.groups = network_groups(model.backbones)
        self.backbones = {False: self._rebuild(face_crops=False)}
        # one face-finding backbone finds the faces for all: the others take the crop it cuts
        kinds = {backbone.config.input_kind for backbone in self.backbones[False]}
        self.input_kind = "photo" if "photo" in kinds else "face crop"

    def probabilities(
        self, images: list, progress: bool, face_crops: bool = False, check_box: bool = False
    ) -> tuple[np.ndarray, list[str]]:
        if face_crops not in self.backbones:
            self.backbones[face_crops] = self._rebuild(face_crops=True)
        entries = self.model.backbones
        blocks: list[np.ndarray] = [np.empty(0)] * len(entries)
        errors = [""] * len(images)
        backbones = [
            aligned_for(self, backbone, images, face_crops, check_box) for backbone in self.backbones[face_crops]
        ]
        for backbone, group in zip(backbones, self.groups, strict=True):
            flip = bool(entries[group[0]].get("flip"))
            features, block_errors = extract_layer_features(
                backbone, images, progress=progress, flip=flip, dtype="float32", **self.options
            )
            for index in group:
                blocks[index] = features[entries[index]["layer"]]
            errors = [first or second for first, second in zip(errors, block_errors, strict=True)]
        ok = np.array([not error for error in errors], dtype=bool)
        probabilities = np.full(len(images), np.nan)
        if ok.any():
            probabilities[ok] = self.model.predict_proba(np.hstack(blocks)[ok])
        return probabilities, errors

    def _rebuild(self, face_crops: bool) -> list[Backbone]:
        """One backbone per network of the model, built for each of its layers the model joins."""
        entries = self.model.backbones
        return [
            rebuild_backbone(entries[group[0]], face_crops=face_crops, layers=[entries[i]["layer"] for i in group])
            for group in self.groups
        ]


class FinetunedPredictor(ImagePredictor):
    """A fine-tuned network (``featgender finetune``), with the same ``predict`` as :class:`Predictor`."""

    def __init__(self, path: str | Path, **options):
        from dataclasses import replace

        from torch import nn

        from featgender.finetune import load_finetuned

        super().__init__(**options)
        net, backbone, self.checkpoint = load_finetuned(path, device=self.options["device"])
        probability = nn.Sequential(net, nn.Sigmoid(), nn.Unflatten(0, (-1, 1)))
        self.backbone = backbone._replace(model=probability, config=replace(backbone.config, feature_dim=1))
        self.input_kind = backbone.config.input_kind  # a fine-tuned face network finds faces in photos too

    def probabilities(
        self, images: list, progress: bool, face_crops: bool = False, check_box: bool = False
    ) -> tuple[np.ndarray, list[str]]:
        backbone = aligned_for(self, self.backbone, images, face_crops, check_box)
        probabilities, errors = extract_features(backbone, images, progress=progress, dtype="float32", **self.options)
        return probabilities[:, 0], errors
