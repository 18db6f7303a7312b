"""Head registry: scikit-learn pipelines that classify cached CNN embeddings.

Every head is a ``Pipeline``: feature normalisation → standardisation (folded into the PCA
projection where there is one) → optional PCA → classifier, with defaults that work on CNN
embeddings and stay fast on the full CelebA train split (162,770 × 2048 on 2 cores; see
benchmarks/README.md):

============  ===================================================================================
``logreg``    LogisticRegression (lbfgs).
``svm``       linear SVM with calibrated (sigmoid) probabilities: LinearSVC up to 50,000 samples,
              SGD with hinge loss above (LinearSVC's primal solver takes minutes there).
``svm-rbf``   RBF SVM: exact SVC, calibrated by 3-fold CV up to 20,000 samples and on a held-out
              tenth up to 60,000 (one fit); above, PCA(256) + Nystroem(1,000) + linear SVM
              (:class:`NystroemSVM`), since exact SVC on 160k samples takes hours.
``gbm``       HistGradientBoostingClassifier behind PCA(64), with early stopping.
``mlp``       MLPClassifier with one hidden layer of 256, early stopping.
============  ===================================================================================

Every size-dependent choice (a PCA's width, Nystroem's landmarks, the switch to a solver that
scales, set by ``max_small_samples``) is bounded by the data's own rows and width, so that a
head never breaks where an invisible switch sits.

:func:`make_head` builds one by name; :func:`fit_head` trains it, optionally tuning its key
hyper-parameter by cross-validation (:func:`search_grid`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import joblib
import numpy as np
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.validation import check_is_fitted, validate_data

from featgender import trust
from featgender.data import LABEL_NAMES
from featgender.defaults import DEFAULT_HEAD, EXPORTED_SUFFIX, FINETUNED_SUFFIXES
from featgender.errors import FeatgenderError
from featgender.files import HEAD_MODEL, atomic_write, file_sha256

NORMALIZATIONS = ("none", "l2", "power")


class FeatureNormalizer(TransformerMixin, BaseEstimator):
    """Per-row normalisation of embeddings: 'none', 'l2' (unit length) or 'power'.

    'power' is the signed square root followed by L2 normalisation, which evens out the
    bursty activations of pooled CNN features (Perronnin et al., 2010). As with sklearn's
    ``Normalizer``, ``copy=False`` normalises a float array in place: on a CelebA-sized
    cache that saves a 1.3 GB copy, whose first touch alone can cost seconds.
    """

    def __init__(self, kind: str = "none", *, copy: bool = True):
        self.kind = kind
        self.copy = copy

    def fit(self, X, y=None):
        if self.kind not in NORMALIZATIONS:
            raise FeatgenderError(f"--normalize {self.kind!r}: choose one of {', '.join(NORMALIZATIONS)}")
        validate_data(self, X, dtype=[np.float32, np.float64])
        return self

    def transform(self, X):
        check_is_fitted(self, "n_features_in_")
        if self.kind == "none":
            return validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False, copy=self.copy)
        for start in range(0, len(X), 256):  # blocks of 2 MB keep the temporaries in cache: 2x faster
            block = X[start : start + 256]
            if self.kind == "power":
                np.copysign(np.sqrt(np.abs(block)), block, out=block)
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            block /= np.maximum(norms, np.finfo(X.dtype).tiny)[:, None]
        return X


def _sample_rows(X: np.ndarray, max_samples: int, random_state: int) -> np.ndarray:
    """At most ``max_samples`` random rows of ``X``, in their original order."""
    if len(X) <= max_samples:
        return X
    return X[np.sort(np.random.default_rng(random_state).choice(len(X), max_samples, replace=False))]


class SampledScaler(TransformerMixin, BaseEstimator):
    """Standardisation with mean and standard deviation estimated on at most ``max_samples`` rows.

    The statistics barely move beyond a few ten thousand rows, but their cost grows with every
    row, and StandardScaler's incremental float64 pass is slow: on 162,770 x 2048 float32
    features it takes 9 s on 2 cores, on 20,000 rows 1 s; numpy's reductions here take 0.1 s.
    With ``copy=False`` the transform works in place on float arrays.
    """

    def __init__(self, *, max_samples: int = 20_000, copy: bool = True, random_state: int = 0):
        self.max_samples = max_samples
        self.copy = copy
        self.random_state = random_state

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        sample = _sample_rows(X, self.max_samples, self.random_state)
        self.mean_ = sample.mean(axis=0, dtype=np.float64)
        std = sample.std(axis=0, dtype=np.float64)
        self.scale_ = np.where(std > 10 * np.finfo(X.dtype).eps, std, 1.0)
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False, copy=self.copy)
        X -= self.mean_.astype(X.dtype)
        X /= self.scale_.astype(X.dtype)
        return X


class StandardizedPCA(TransformerMixin, BaseEstimator):
    """Standardisation then PCA, both fitted on at most ``max_samples`` rows, applied as one product.

    ``transform(X)`` equals PCA's transform of the standardised ``X`` but is computed as
    ``X @ weights_ - offset_``, without the full-size temporaries the chained steps make:
    on 162,770 x 2048 float32 features, 0.4 s instead of 3.3 s. A PCA basis fitted on 20,000
    rows is as good as one fitted on all (PCA(64)'s full fit takes 13 s on 2 cores).
    ``n_components`` is capped at the sample's rank bound for tiny training sets.
    """

    def __init__(self, n_components: int = 64, *, max_samples: int = 20_000, random_state: int = 0):
        self.n_components = n_components
        self.max_samples = max_samples
        self.random_state = random_state

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        sample = _sample_rows(X, self.max_samples, self.random_state)
        self.scaler_ = SampledScaler(max_samples=len(sample)).fit(sample)
        self.pca_ = PCA(
            min(self.n_components, *sample.shape),
            svd_solver="randomized",
            iterated_power=3,
            random_state=self.random_state,
        ).fit(self.scaler_.transform(sample))
        components, scaler = self.pca_.components_, self.scaler_
        self.weights_ = (components / scaler.scale_).T.astype(X.dtype)
        self.offset_ = ((scaler.mean_ / scaler.scale_ + self.pca_.mean_) @ components.T).astype(X.dtype)
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        projected = X @ self.weights_
        projected -= self.offset_
        return projected


class NystroemSVM(ClassifierMixin, BaseEstimator):
    """An RBF SVM approximated for large training sets: PCA to ``n_pca`` dimensions, an RBF
    kernel map on ``n_landmarks`` Nystroem landmarks, then a linear SVM.

    Exact SVC on 160k samples takes hours; this takes seconds. Both widths are bounded by the
    data's own shape (features, rows), and the kernel's gamma is 1 / the PCA width, so the same
    defaults fit 64-d and 2048-d embeddings alike. ``sample_weight`` weighs the SVM's loss; the
    PCA and the landmarks are fitted unweighted.
    """

    def __init__(self, *, C: float = 0.03, n_pca: int = 256, n_landmarks: int = 1000, random_state: int = 0):
        self.C = C
        self.n_pca = n_pca
        self.n_landmarks = n_landmarks
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        self.pipeline_ = Pipeline(
            [
                ("pca", StandardizedPCA(self.n_pca, random_state=self.random_state)),
                ("kernel", Nystroem(n_components=min(self.n_landmarks, len(X)), random_state=self.random_state)),
                ("svm", LinearSVC(C=self.C, dual=False, max_iter=200, random_state=self.random_state)),
            ]
        ).fit(X, y, svm__sample_weight=sample_weight)
        self.classes_ = self.pipeline_.classes_
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        return self.pipeline_.decision_function(validate_data(self, X, dtype=[np.float32, np.float64], reset=False))

    def predict(self, X):
        check_is_fitted(self)
        return self.pipeline_.predict(validate_data(self, X, dtype=[np.float32, np.float64], reset=False))


class BlasSVC(SVC):
    """:class:`~sklearn.svm.SVC` whose binary RBF decision function is computed as kernel-matrix
    products (BLAS) rather than by libsvm's loop over support vectors: the same values, for the
    quick start's 6,439 support vectors of 1,024 features 0.29 ms a face against 5.5 on 2 cores,
    so that the head costs ``predict`` little beside the network. Other kernels, or several
    classes, stay libsvm's."""

    def decision_function(self, X):
        if self.kernel != "rbf" or len(self.classes_) != 2 or issparse(X):
            return super().decision_function(X)
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        vectors, weights = self.support_vectors_, self.dual_coef_[0]
        norms = (vectors**2).sum(1)
        decisions = np.empty(len(X))
        for start in range(0, len(X), 4096):  # a (rows, vectors) kernel block at a time
            rows = X[start : start + 4096]
            distances = (rows**2).sum(1)[:, None] + norms - 2 * rows @ vectors.T
            decisions[start : start + 4096] = np.exp(-self._gamma * np.maximum(distances, 0)) @ weights
        return decisions + self.intercept_[0]


class SizeAdaptiveClassifier(ClassifierMixin, BaseEstimator):
    """Fits ``small`` when the training set has at most ``max_small_samples`` rows, else ``large``.

    For solvers that are best on small data but do not scale (exact SVC, LinearSVC's primal
    solver), so that no default silently runs for hours on a large dataset.
    """

    def __init__(self, small=None, large=None, max_small_samples: int = 20_000):
        self.small = small
        self.large = large
        self.max_small_samples = max_small_samples

    def fit(self, X, y, sample_weight=None):
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        chosen = self.small if len(X) <= self.max_small_samples else self.large
        weights = {} if sample_weight is None else {"sample_weight": sample_weight}
        self.estimator_ = clone(chosen).fit(X, y, **weights)
        self.classes_ = self.estimator_.classes_
        return self

    def predict(self, X):
        check_is_fitted(self)
        return self.estimator_.predict(validate_data(self, X, dtype=[np.float32, np.float64], reset=False))

    def predict_proba(self, X):
        check_is_fitted(self)
        return self.estimator_.predict_proba(validate_data(self, X, dtype=[np.float32, np.float64], reset=False))


_HEADS: dict[str, Callable[..., BaseEstimator]] = {}
_GRIDS: dict[str, dict[str, list]] = {}


def register_head(name: str, grid: dict[str, list]) -> Callable:
    """Decorator adding a classifier factory and the grid :func:`fit_head` searches for it."""

    def add(factory: Callable[..., BaseEstimator]) -> Callable[..., BaseEstimator]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered")
        _HEADS[name] = factory
        _GRIDS[name] = grid
        return factory

    return add


def list_heads() -> list[str]:
    """Registered head names, sorted."""
    return sorted(_HEADS)


def search_grid(name: str) -> dict[str, list]:
    """The hyper-parameter grid that ``--search`` tunes for head ``name`` (Pipeline step names)."""
    _check_name(name)
    return {f"classifier__{key}": values for key, values in _GRIDS[name].items()}


def _check_name(name: str) -> None:
    if name not in _HEADS:
        raise FeatgenderError(f"--head {name!r}: unknown; choose one of {', '.join(list_heads())}")


def make_head(
    name: str,
    *,
    pca: int | None = None,
    normalize: str = "power",
    copy: bool = True,
    random_state: int = 0,
    **params,
) -> Pipeline:
    """An unfitted head pipeline: normalise → standardise → PCA (if ``pca``) → classifier.

    ``params`` go to the classifier factory (for example ``C``); ``None`` values mean "the
    head's default". ``pca`` of 0 removes a head's default PCA. ``copy=False`` lets the
    pipeline normalise and standardise its input in place.

    Examples
    --------
    >>> make_head("logreg", C=0.5).named_steps["classifier"].C
    0.5
    """
    _check_name(name)
    params = {key: value for key, value in params.items() if value is not None}
    accepted = set(inspect.signature(_HEADS[name]).parameters) - {"random_state"}
    for key in params.keys() - accepted:
        raise FeatgenderError(f"--{key}: --head {name} has no such parameter (it takes {', '.join(sorted(accepted))})")
    if pca is not None and pca < 0:
        raise FeatgenderError(f"--pca {pca}: use 0 (no PCA) or a number of components")
    if "C" in params and not params["C"] > 0:
        raise FeatgenderError(f"--C {params['C']}: the regularisation C must be above 0")
    classifier, default_pca = _HEADS[name](random_state=random_state, **params)
    pca = default_pca if pca is None else pca
    # The power and l2 normalisers return their own array, which the scaler may then standardise
    # in place: a second 1.3 GB copy cost 2 s on CelebA-sized caches. With PCA, standardising
    # is folded into the projection.
    if pca:
        reduce = ("pca", StandardizedPCA(pca, random_state=random_state))
    else:
        reduce = ("scale", SampledScaler(copy=copy and normalize == "none", random_state=random_state))
    return Pipeline([("normalize", FeatureNormalizer(normalize, copy=copy)), reduce, ("classifier", classifier)])


# Default C values were chosen on UTKFace's validation split with EfficientNet-Lite0
# features (benchmarks/README.md); --search tunes them for other data.
@register_head("logreg", grid={"C": [0.001, 0.002, 0.005, 0.01, 0.03, 0.1]})
def _logreg(random_state: int, C: float = 0.005):
    return LogisticRegression(C=C, max_iter=300, random_state=random_state), None


@register_head("svm", grid={"C": [0.0003, 0.001, 0.003, 0.01, 0.03]})
def _svm(random_state: int, C: float = 0.001, max_small_samples: int = 50_000):
    large = SGDClassifier(
        loss="hinge", alpha=1.0 / (C * 50_000), average=True, max_iter=5, tol=None, random_state=random_state
    )
    return SizeAdaptiveClassifier(
        small=CalibratedClassifierCV(
            LinearSVC(C=C, dual="auto", max_iter=5000, random_state=random_state), method="sigmoid", cv=3
        ),
        large=CalibratedClassifierCV(large, method="sigmoid", cv=2),
        max_small_samples=max_small_samples,
    ), None


SVC_CACHE_MB = 2048  # libsvm's kernel cache: on 38k face rows a fit takes 2.4x less time than at its 200 MB


@register_head("svm-rbf", grid={"C": [0.3, 1.0, 3.0, 10.0]})
def _svm_rbf(random_state: int, C: float = 3.0, max_small_samples: int = 20_000, max_exact_samples: int = 60_000):
    exact = BlasSVC(C=C, kernel="rbf", gamma="scale", cache_size=SVC_CACHE_MB, random_state=random_state)
    held_out = StratifiedShuffleSplit(n_splits=1, test_size=0.1, random_state=random_state)
    return SizeAdaptiveClassifier(
        # Platt scaling by 3-fold CV costs about 3x one SVC fit; SVC(probability=True) costs 6x.
        small=CalibratedClassifierCV(exact, method="sigmoid", cv=3, ensemble=False),
        large=SizeAdaptiveClassifier(
            # where three fits cost minutes: one SVC on nine tenths, its sigmoid fitted on the tenth left
            small=CalibratedClassifierCV(exact, method="sigmoid", cv=held_out, ensemble=True),
            large=CalibratedClassifierCV(NystroemSVM(C=C / 100, random_state=random_state), method="sigmoid", cv=2),
            max_small_samples=max_exact_samples,
        ),
        max_small_samples=max_small_samples,
    ), None


@register_head("gbm", grid={"learning_rate": [0.05, 0.1, 0.2, 0.3]})
def _gbm(random_state: int, learning_rate: float = 0.2):
    # lr 0.2 beat 0.1 on UTKFace's validation split and halves the boosting rounds needed.
    return HistGradientBoostingClassifier(
        learning_rate=learning_rate,
        max_iter=150,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=15,
        random_state=random_state,
    ), 64


@register_head("mlp", grid={"alpha": [1e-4, 1e-3, 1e-2, 1e-1]})
def _mlp(random_state: int, alpha: float = 1e-3):
    return MLPClassifier(
        hidden_layer_sizes=(256,), alpha=alpha, early_stopping=True, max_iter=200, random_state=random_state
    ), None


# --- fitting -----------------------------------------------------------------------------


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    head: str = DEFAULT_HEAD,
    *,
    search: bool = False,
    cv: int = 3,
    n_jobs: int | None = None,
    overwrite_features: bool = False,
    sample_weight: np.ndarray | None = None,
    random_state: int = 0,
    **head_params,
) -> tuple[Pipeline, dict]:
    """Fit head ``head`` on in-memory features; with ``search``, tune its key hyper-parameter.

    ``sample_weight`` (one per row, e.g. :func:`featgender.mixing.balance_weights`) weighs the
    classifier's loss; the normalisation and PCA steps are fitted unweighted.

    The search is a stratified ``cv``-fold grid search over :func:`search_grid` on these
    features only (the training split), parallel over ``n_jobs`` joblib workers.
    ``overwrite_features=True`` (without search) lets the fit normalise ``features`` in place,
    saving a full-size copy; their content is undefined afterwards. The returned pipeline
    never modifies its input.

    Returns
    -------
    pipeline : the fitted pipeline (refitted on all features with the best value).
    search_result : {} or {'best_params', 'cv_accuracy', 'grid'}.
    """
    shape = np.shape(features)
    weights = {} if sample_weight is None else {"classifier__sample_weight": np.asarray(sample_weight)}
    if not search:
        pipeline = make_head(head, random_state=random_state, copy=not overwrite_features, **head_params)
        with _fit_errors(head, shape):
            pipeline.fit(features, labels, **weights)
        return _never_modifies_input(pipeline), {}
    pipeline = make_head(head, random_state=random_state, **head_params)
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    grid = search_grid(head)
    searcher = GridSearchCV(
        pipeline,
        grid,
        scoring="accuracy",
        n_jobs=n_jobs,
        refit=True,
        cv=StratifiedKFold(cv, shuffle=True, random_state=random_state),
    )
    with _fit_errors(head, shape):
        searcher.fit(features, labels, **weights)
    return searcher.best_estimator_, {
        "best_params": {key.split("__", 1)[1]: value for key, value in searcher.best_params_.items()},
        "cv_accuracy": float(searcher.best_score_),
        "grid": {key.split("__", 1)[1]: values for key, values in grid.items()},
    }


@contextmanager
def _fit_errors(head: str, shape: tuple) -> Iterator[None]:
    """scikit-learn's refusals (too few rows of a label, a bad parameter) as one line naming the head."""
    try:
        yield
    except ValueError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FeatgenderError(
            f"--head {head}: scikit-learn could not fit it on {' x '.join(map(str, shape))} "
            f"features: {reason} (choose another --head or give it more rows of each label)"
        ) from None


STREAMING_LOSSES = {"logreg": "log_loss", "svm": "modified_huber"}


def fit_head_streaming(
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    head: str = DEFAULT_HEAD,
    *,
    epochs: int = 5,
    alpha: float = 1e-4,
    normalize: str = "power",
    overwrite_chunks: bool = False,
    random_state: int = 0,
) -> Pipeline:
    """Fit a linear head out of core: ``chunks()`` yields (features, labels) blocks anew on each call.

    One pass fits the standardisation (``partial_fit``), then ``epochs`` passes train an
    SGD classifier: log loss for 'logreg', modified Huber (a smoothed hinge that still gives
    probabilities) for 'svm'. Chunks should mix both classes (see ``shuffle`` of
    :func:`featgender.cache.iter_cache_chunks`). Memory: one chunk at a time, plus a
    normalised copy of it unless ``overwrite_chunks=True`` lets the fit work in place on
    chunks nobody else holds; the returned pipeline copies as usual.
    """
    if head not in STREAMING_LOSSES:
        raise FeatgenderError(f"--head {head!r}: out-of-core fitting supports {', '.join(STREAMING_LOSSES)}")
    normalizer = FeatureNormalizer(normalize, copy=not overwrite_chunks)
    # in place on the normaliser's output: its copy, or a chunk that may be overwritten
    scaler = StandardScaler(copy=not overwrite_chunks and normalize == "none")
    for features, _ in chunks():
        normalized = normalizer.fit(features).transform(features)
        for start in range(0, len(normalized), 1024):  # partial_fit makes a float64 copy of what it is given
            scaler.partial_fit(normalized[start : start + 1024])
        del features, normalized  # before the next chunk is read: one in memory, not two
    classifier = SGDClassifier(loss=STREAMING_LOSSES[head], alpha=alpha, average=True, random_state=random_state)
    for _ in range(epochs):
        for features, labels in chunks():
            classifier.partial_fit(scaler.transform(normalizer.transform(features)), labels, classes=[0, 1])
            del features, labels
    return _never_modifies_input(Pipeline([("normalize", normalizer), ("scale", scaler), ("classifier", classifier)]))


def _never_modifies_input(pipeline: Pipeline) -> Pipeline:
    """After a fit in place: the normaliser copies, and the scaler works in place on that copy
    (on the input itself where the 'none' normaliser passes it through, so it copies then)."""
    pipeline.set_params(normalize__copy=True)
    if "scale" in pipeline.named_steps:
        pipeline.set_params(scale__copy=pipeline.named_steps["normalize"].kind == "none")
    return pipeline


# --- the model artifact ----------------------------------------------------------------------

ARTIFACT_FORMAT = "featgender-head"
ARTIFACT_VERSION = 1


class HeadModel:
    """A fitted head plus what is needed to use it on raw images.

    Attributes
    ----------
    pipeline : the fitted scikit-learn pipeline (features → class 1 = male).
    head : registry name of the head; params : its options.
    backbones : one dict per feature block (backbone, layer, weights, weights_sha256,
        weights_path, preprocessing, precision, feature_dim), in the order they are joined.
    training : caches, their dataset fingerprints, split and image count it was fitted on.
    metrics : evaluation results recorded at training time.
    sha256 : of the artifact file it was loaded from ('' when fitted in this process).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        head: str,
        params: dict,
        backbones: list[dict],
        training: dict,
        metrics: dict | None = None,
        versions: dict | None = None,
    ):
        self.pipeline = pipeline
        self.head = head
        self.params = params
        self.backbones = backbones
        self.training = training
        self.metrics = metrics or {}
        self.versions = versions or {}
        self.label_names = LABEL_NAMES
        self.sha256 = ""  # of the file it was loaded from (load_model), for the model card

    @property
    def feature_dim(self) -> int:
        return sum(int(backbone["feature_dim"]) for backbone in self.backbones)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of 'male' per row of features."""
        if features.shape[1] != self.feature_dim:
            raise FeatgenderError(
                f"features have {features.shape[1]} columns; this model expects {self.feature_dim} "
                f"({' + '.join(b['backbone'] for b in self.backbones)})"
            )
        return self.pipeline.predict_proba(features)[:, 1]

    def save(self, path: str | os.PathLike) -> None:
        """Write the artifact with joblib, atomically (:func:`featgender.files.atomic_write`)."""
        path = Path(path)
        with atomic_write(path, kind=HEAD_MODEL) as tmp:
            joblib.dump({"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **self.__dict__}, tmp)
        trust.record(path)


def load_model(path: str | os.PathLike, *, trusted: bool = False) -> HeadModel:
    """Load a head artifact written by :meth:`HeadModel.save`.

    Loading runs a pickle, so only artifacts written by featgender on this machine (their
    sha256 is in :func:`featgender.trust.trust_list`) are opened, unless ``trusted``: say so
    only for files from a source you trust. A file that is not a featgender head artifact of
    this format version, or whose metadata is incomplete, is refused. The loaded model's
    ``sha256`` is the file's.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatgenderError(f"--model {path}: no such file")
    if path.suffix in FINETUNED_SUFFIXES:
        raise FeatgenderError(
            f"--model {path}: a fine-tuned network, not a head: it scores images "
            "(predict, serve, evaluate --data), not cached features"
        )
    if path.suffix == EXPORTED_SUFFIX:
        raise FeatgenderError(
            f"--model {path}: an exported ONNX graph: it scores images (predict, serve, evaluate --data), "
            "not cached features; evaluate the .joblib it was exported from on a cache"
        )
    digest = file_sha256(path)
    if not trusted and not trust.is_trusted(digest):
        raise FeatgenderError(
            f"--model {path}: sha256 {digest} was not written by featgender here; loading it "
            "runs a pickle, so pass --trusted only if you trust where it comes from"
        )
    try:
        content = joblib.load(path)
    except Exception as error:  # unpickling raises many types for foreign files
        raise FeatgenderError(f"--model {path}: not a featgender model ({type(error).__name__})") from None
    if not isinstance(content, dict) or content.get("format") != ARTIFACT_FORMAT:
        raise FeatgenderError(f"--model {path}: not a featgender head artifact")
    if content.get("format_version") != ARTIFACT_VERSION:
        raise FeatgenderError(
            f"--model {path}: artifact format {content.get('format_version')}, this featgender reads {ARTIFACT_VERSION}"
        )
    fields = ("pipeline", "head", "params", "backbones", "training", "metrics", "versions")
    missing = [field for field in fields if field not in content]
    if missing or not isinstance(content["pipeline"], Pipeline) or not content["backbones"]:
        raise FeatgenderError(f"--model {path}: artifact metadata is incomplete ({', '.join(missing) or 'pipeline'})")
    model = HeadModel(**{field: content[field] for field in fields})
    model.sha256 = digest
    return model
