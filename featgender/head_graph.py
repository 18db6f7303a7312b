"""A fitted head pipeline as a torch module: (N, D) float32 features to P(male), (N,).

The module computes what the scikit-learn pipeline computes, from its fitted parameters, so
that ``torch.onnx`` exports backbone and head as one graph (:mod:`featgender.export`). One
translation per estimator the registry's heads are made of (:func:`head_network`); any other
estimator is an error naming it. Gradient-boosted trees compare in float64, as scikit-learn
does, so that no sample takes another branch than it does there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from torch import nn

from featgender.errors import FeatgenderError
from featgender.heads import FeatureNormalizer, NystroemSVM, SampledScaler, SizeAdaptiveClassifier, StandardizedPCA


def _float(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)


class Normalize(nn.Module):
    """:class:`~featgender.heads.FeatureNormalizer`: signed square root ('power'), unit length."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "power":
            x = torch.sign(x) * torch.sqrt(torch.abs(x))
        norms = torch.sqrt((x * x).sum(1, keepdim=True))
        return x / torch.clamp(norms, min=float(np.finfo(np.float32).tiny))


class Affine(nn.Module):
    """``x @ weight + bias``: a scaler, a (standardised) PCA, a linear decision function."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight, bias):
        super().__init__()
        self.register_buffer("weight", _float(weight))
        self.register_buffer("bias", _float(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Scale(nn.Module):
    """``(x - mean) / scale`` elementwise, in the order scikit-learn's scalers compute it."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, mean, scale):
        super().__init__()
        self.register_buffer("mean", _float(mean))
        self.register_buffer("scale", _float(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class RBFKernel(nn.Module):
    """``exp(-gamma |x - c|^2)`` against each centre ``c`` (support vectors, Nystroem landmarks)."""

    centres: torch.Tensor
    centre_norms: torch.Tensor

    def __init__(self, centres, gamma: float):
        super().__init__()
        self.register_buffer("centres", _float(centres))
        self.register_buffer("centre_norms", _float((np.asarray(centres, dtype=np.float64) ** 2).sum(1)))
        self.gamma = float(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squared = (x * x).sum(1, keepdim=True) - 2 * x @ self.centres.T + self.centre_norms
        return torch.exp(-self.gamma * torch.clamp(squared, min=0))


class Column(nn.Module):
    """The one column of a binary decision function or probability, as (N,)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class PlattSigmoid(nn.Module):
    """A sigmoid calibrator: ``1 / (1 + exp(a d + b))`` of a decision value ``d``."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = float(a), float(b)

    def forward(self, decision: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-(self.a * decision + self.b))


class Mean(nn.Module):
    """The mean of several modules' outputs (a calibrated ensemble's folds)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


class ModifiedHuber(nn.Module):
    """SGD's modified-Huber probability: ``(clip(d, -1, 1) + 1) / 2``."""

    def forward(self, decision: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(decision, -1, 1) + 1) / 2


class Perceptron(nn.Module):
    """An MLP's layers: the hidden activation between affine maps, the logistic output."""

    ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "logistic": torch.sigmoid, "identity": lambda x: x}

    def __init__(self, mlp: MLPClassifier):
        super().__init__()
        if mlp.activation not in self.ACTIVATIONS or mlp.out_activation_ != "logistic":
            raise FeatgenderError(
                f"an MLP with {mlp.activation} / {mlp.out_activation_} activations cannot be exported"
            )
        self.layers = nn.ModuleList(
            Affine(weight, bias) for weight, bias in zip(mlp.coefs_, mlp.intercepts_, strict=True)
        )
        self.activation = mlp.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.ACTIVATIONS[self.activation](layer(x))
        return torch.sigmoid(self.layers[-1](x))[:, 0]


class BoostedTrees(nn.Module):
    """A binary HistGradientBoostingClassifier: every tree walked at once, one level per step.

    Nodes of all trees sit in flat tables; each sample's node in each tree moves to its left or
    right child (``x[feature] <= threshold``, in float64 as scikit-learn compares) until a leaf,
    whose values are summed with the baseline and squashed by the logistic function.
    """

    feature: torch.Tensor
    threshold: torch.Tensor
    missing_left: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    value: torch.Tensor
    roots: torch.Tensor

    def __init__(self, model: HistGradientBoostingClassifier):
        super().__init__()
        if model.n_trees_per_iteration_ != 1 or getattr(model, "is_categorical_", None) is not None:
            raise FeatgenderError("only binary gradient boosting on numeric features can be exported")
        trees = [predictors[0].nodes for predictors in model._predictors]
        width = max(len(nodes) for nodes in trees)
        offsets = np.arange(len(trees))[:, None] * width

        def table(field: str, dtype, fill) -> np.ndarray:
            values = np.full((len(trees), width), fill, dtype=dtype)
            for row, nodes in enumerate(trees):
                values[row, : len(nodes)] = nodes[field]
            return values

        leaf = table("is_leaf", bool, True)
        # children as flat indices into the tables; a leaf points at itself
        own = offsets + np.arange(width)
        left = np.where(leaf, own, table("left", np.int64, 0) + offsets)
        right = np.where(leaf, own, table("right", np.int64, 0) + offsets)
        self.register_buffer("feature", torch.from_numpy(table("feature_idx", np.int64, 0).ravel()))
        self.register_buffer("threshold", torch.from_numpy(table("num_threshold", np.float64, 0.0).ravel()))
        self.register_buffer("missing_left", torch.from_numpy(table("missing_go_to_left", bool, True).ravel()))
        self.register_buffer("left", torch.from_numpy(left.ravel()))
        self.register_buffer("right", torch.from_numpy(right.ravel()))
        self.register_buffer("value", torch.from_numpy(table("value", np.float64, 0.0).ravel()))
        self.register_buffer("roots", torch.from_numpy(offsets[:, 0]))
        self.depth = int(max(nodes["depth"].max() for nodes in trees))
        self.baseline = float(np.asarray(model._baseline_prediction).ravel()[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        node = self.roots.unsqueeze(0).expand(x.shape[0], -1)
        for _ in range(self.depth):
            values = torch.gather(x, 1, self.feature[node])
            go_left = torch.where(torch.isnan(values), self.missing_left[node], values <= self.threshold[node])
            node = torch.where(go_left, self.left[node], self.right[node])
        raw = self.value[node].sum(1) + self.baseline
        return torch.sigmoid(raw).to(torch.float32)


def _linear(estimator) -> nn.Module:
    """A binary linear decision function, (N,)."""
    return nn.Sequential(Affine(np.asarray(estimator.coef_).T, estimator.intercept_), Column())


def _decision(estimator) -> nn.Module:
    """The binary decision function of ``estimator`` (what a calibrator is fitted on), (N,)."""
    if isinstance(estimator, (LinearSVC, SGDClassifier, LogisticRegression)):
        return _linear(estimator)
    if isinstance(estimator, SVC):
        if estimator.kernel != "rbf":
            raise FeatgenderError(f"an SVC with a {estimator.kernel} kernel cannot be exported (rbf can)")
        kernel = RBFKernel(estimator.support_vectors_, estimator._gamma)
        return nn.Sequential(kernel, Affine(np.asarray(estimator.dual_coef_).T, estimator.intercept_), Column())
    if isinstance(estimator, NystroemSVM):
        steps = estimator.pipeline_.steps
        return nn.Sequential(*(transform_network(step) for _, step in steps[:-1]), _decision(steps[-1][1]))
    raise FeatgenderError(f"{type(estimator).__name__}: no ONNX translation for its decision function")


def probability_network(classifier) -> nn.Module:
    """``classifier.predict_proba(x)[:, 1]`` as a module: features to P(class 1), (N,)."""
    if isinstance(classifier, SizeAdaptiveClassifier):
        return probability_network(classifier.estimator_)
    if isinstance(classifier, LogisticRegression):
        return nn.Sequential(_decision(classifier), nn.Sigmoid())
    if isinstance(classifier, SGDClassifier) and classifier.loss in ("log_loss", "modified_huber"):
        squash = nn.Sigmoid() if classifier.loss == "log_loss" else ModifiedHuber()
        return nn.Sequential(_decision(classifier), squash)
    if isinstance(classifier, CalibratedClassifierCV):
        folds = []
        for fold in classifier.calibrated_classifiers_:
            if fold.method != "sigmoid":
                raise FeatgenderError(f"{fold.method} calibration cannot be exported (sigmoid can)")
            (calibrator,) = fold.calibrators
            folds.append(nn.Sequential(_decision(fold.estimator), PlattSigmoid(calibrator.a_, calibrator.b_)))
        return Mean(folds)
    if isinstance(classifier, HistGradientBoostingClassifier):
        return BoostedTrees(classifier)
    if isinstance(classifier, MLPClassifier):
        return Perceptron(classifier)
    raise FeatgenderError(f"{type(classifier).__name__}: no ONNX translation for its probabilities")


def transform_network(step) -> nn.Module:
    """A fitted transformer of a head pipeline as a module."""
    if isinstance(step, FeatureNormalizer):
        return Normalize(step.kind)
    if isinstance(step, SampledScaler):
        return Scale(step.mean_, step.scale_)
    if isinstance(step, StandardScaler):
        width = step.n_features_in_
        return Scale(
            np.zeros(width) if step.mean_ is None else step.mean_,
            np.ones(width) if step.scale_ is None else step.scale_,
        )
    if isinstance(step, StandardizedPCA):
        return Affine(step.weights_, -step.offset_)
    if isinstance(step, PCA):
        return Affine(step.components_.T, -step.mean_ @ step.components_.T)
    if isinstance(step, Nystroem):
        if step.kernel != "rbf":
            raise FeatgenderError(f"a Nystroem map with a {step.kernel} kernel cannot be exported (rbf can)")
        gamma = step.gamma if step.gamma is not None else 1.0 / step.components_.shape[1]
        return nn.Sequential(
            RBFKernel(step.components_, gamma), Affine(step.normalization_.T, np.zeros(len(step.normalization_)))
        )
    raise FeatgenderError(f"{type(step).__name__}: no ONNX translation for this transformer")


def head_network(pipeline: Pipeline) -> nn.Module:
    """A fitted head pipeline (:func:`featgender.heads.make_head`) as a module: features to P(male)."""
    *transforms, (_, classifier) = pipeline.steps
    return nn.Sequential(*(transform_network(step) for _, step in transforms), probability_network(classifier)).eval()


__all__ = ["head_network", "probability_network", "transform_network"]
