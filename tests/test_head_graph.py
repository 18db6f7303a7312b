"""Every head of the registry as a torch module gives scikit-learn's P(male) (what export ships)."""

import numpy as np
import pytest
import torch

from featgender.head_graph import head_network
from featgender.heads import fit_head, fit_head_streaming, list_heads


@pytest.fixture(scope="module")
def features():
    """Two overlapping classes in 48 dimensions, skewed like pooled CNN activations."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    rows = np.abs(rng.normal(size=(600, 48)) + 0.6 * labels[:, None] * rng.normal(size=48))
    return rows.astype(np.float32), labels


def _module_probabilities(pipeline, rows: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return head_network(pipeline)(torch.from_numpy(rows)).numpy()


@pytest.mark.parametrize("head", list_heads())
def test_each_head_as_a_module_gives_sklearn_probabilities(features, head):
    rows, labels = features
    pipeline, _ = fit_head(rows[:400], labels[:400], head)
    expected = pipeline.predict_proba(rows[400:])[:, 1]
    np.testing.assert_allclose(_module_probabilities(pipeline, rows[400:]), expected, atol=2e-5)


@pytest.mark.parametrize(
    ("head", "params"),
    [
        ("svm", {"max_small_samples": 100}),
        ("svm-rbf", {"max_small_samples": 100}),
        ("svm-rbf", {"max_small_samples": 100, "max_exact_samples": 100}),
    ],
)
def test_large_data_variants_translate_too(features, head, params):
    """SGD behind calibration (svm), one SVC calibrated on a held-out tenth and PCA + Nystroem
    + linear SVM (svm-rbf), as fitted above their sample thresholds."""
    rows, labels = features
    pipeline, _ = fit_head(rows[:400], labels[:400], head, **params)
    expected = pipeline.predict_proba(rows[400:])[:, 1]
    np.testing.assert_allclose(_module_probabilities(pipeline, rows[400:]), expected, atol=2e-5)


def test_streamed_head_and_pca_translate(features):
    rows, labels = features
    streamed = fit_head_streaming(lambda: [(rows[:400], labels[:400])], "svm")
    np.testing.assert_allclose(
        _module_probabilities(streamed, rows[400:]), streamed.predict_proba(rows[400:])[:, 1], atol=2e-5
    )
    with_pca, _ = fit_head(rows[:400], labels[:400], "logreg", pca=16)
    np.testing.assert_allclose(
        _module_probabilities(with_pca, rows[400:]), with_pca.predict_proba(rows[400:])[:, 1], atol=2e-5
    )
