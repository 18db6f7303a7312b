"""Head registry: scikit-learn pipelines that classify cached CNN embeddings.

Each head is a ``Pipeline`` (scaling, optional PCA, classifier) with defaults that work on
CNN embeddings; :func:`make_head` builds one by name, :func:`fit_head` trains it on a
cache's train split.
"""

from __future__ import annotations

from typing import Callable

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from featgender.errors import FeatgenderError

_HEADS: dict[str, Callable[..., Pipeline]] = {}


def register_head(name: str) -> Callable:
    """Decorator adding a ``(**params) -> Pipeline`` factory to the head registry."""

    def add(factory: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered")
        _HEADS[name] = factory
        return factory

    return add


def list_heads() -> list[str]:
    """Registered head names, sorted."""
    return sorted(_HEADS)


def make_head(name: str, **params) -> Pipeline:
    """An unfitted head pipeline; ``params`` of ``None`` mean "the head's default"."""
    if name not in _HEADS:
        raise FeatgenderError(f"--head {name!r}: unknown; choose one of {', '.join(list_heads())}")
    return _HEADS[name](**{key: value for key, value in params.items() if value is not None})


@register_head("logreg")
def _logreg(C: float = 1.0, random_state: int = 0) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=random_state))
