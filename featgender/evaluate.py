"""Classification metrics for gender heads (1 = male is the positive class)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics


def classification_metrics(labels: np.ndarray, predicted: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Accuracy, balanced accuracy, precision, recall, F1, ROC-AUC and the confusion matrix.

    ``scores`` are probabilities or decision values of the male class; ROC-AUC is left out
    without them or when only one class is present.
    """
    labels = np.asarray(labels)
    predicted = np.asarray(predicted)
    result = {
        "n": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(labels, predicted)),
        "precision": float(metrics.precision_score(labels, predicted, zero_division=0)),
        "recall": float(metrics.recall_score(labels, predicted, zero_division=0)),
        "f1": float(metrics.f1_score(labels, predicted, zero_division=0)),
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=[0, 1]).tolist(),
    }
    if scores is not None and len(np.unique(labels)) == 2:
        result["roc_auc"] = float(metrics.roc_auc_score(labels, scores))
    return result
