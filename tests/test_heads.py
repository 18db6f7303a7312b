import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import check_estimator

from featgender.errors import FeatgenderError
from featgender.heads import (
    BlasSVC,
    FeatureNormalizer,
    NystroemSVM,
    SampledScaler,
    SizeAdaptiveClassifier,
    StandardizedPCA,
    fit_head,
    fit_head_streaming,
    list_heads,
    load_model,
    make_head,
    search_grid,
)


def separable(n=300, d=40, seed=0):
    """Non-negative, CNN-like features where a few dimensions carry the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    features = np.abs(rng.normal(0, 1, (n, d))).astype(np.float32)
    features[:, :3] += 1.5 * labels[:, None]
    return features, labels


def test_registry_has_every_head():
    assert list_heads() == ["gbm", "logreg", "mlp", "svm", "svm-rbf"]
    with pytest.raises(FeatgenderError, match="--head 'svn'.*svm"):
        make_head("svn")


@pytest.mark.parametrize("head", ["logreg", "svm", "svm-rbf", "gbm", "mlp"])
def test_every_head_learns_separable_features_with_probabilities(head):
    features, labels = separable()
    test_features, test_labels = separable(seed=1)
    pipeline, _ = fit_head(features, labels, head, pca=0 if head == "gbm" else None)
    assert (pipeline.predict(test_features) == test_labels).mean() > 0.9
    probabilities = pipeline.predict_proba(test_features)
    assert probabilities.shape == (300, 2)
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-6)


def test_pca_and_normalisation_are_pipeline_steps():
    pipeline = make_head("gbm")
    assert list(pipeline.named_steps) == ["normalize", "pca", "classifier"]
    assert pipeline.named_steps["pca"].n_components == 64
    assert list(make_head("gbm", pca=0).named_steps) == ["normalize", "scale", "classifier"]
    assert make_head("logreg", pca=16).named_steps["pca"].n_components == 16
    assert make_head("logreg", C=0.5).named_steps["classifier"].C == 0.5


def test_a_parameter_the_head_lacks_or_out_of_range_is_refused_by_name():
    with pytest.raises(FeatgenderError, match="--C: --head gbm has no such parameter .*learning_rate"):
        make_head("gbm", C=1.0)
    with pytest.raises(FeatgenderError, match="--C -1.0: the regularisation C must be above 0"):
        make_head("logreg", C=-1.0)
    with pytest.raises(FeatgenderError, match="--pca -5: use 0"):
        make_head("logreg", pca=-5)


def test_power_normalisation_is_signed_sqrt_then_unit_length():
    features = np.array([[4.0, -9.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = FeatureNormalizer("power").fit_transform(features)
    np.testing.assert_allclose(out[0], np.array([2, -3, 0]) / np.sqrt(13), rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)
    assert out.dtype == np.float32
    with pytest.raises(FeatgenderError, match="--normalize 'cube'"):
        FeatureNormalizer("cube").fit(features)


def test_sampled_scaler_estimates_the_full_statistics():
    features = np.random.default_rng(0).normal(3, 2, (50_000, 4)).astype(np.float32)
    features[:, 3] = 7.0
    scaler = SampledScaler(max_samples=20_000).fit(features)
    np.testing.assert_allclose(scaler.mean_, features.mean(0), atol=0.05)
    np.testing.assert_allclose(scaler.scale_[:3], features.std(0)[:3], rtol=0.02)
    assert scaler.scale_[3] == 1.0
    scaled = scaler.transform(features)
    np.testing.assert_allclose(scaled.mean(0), 0, atol=0.03)
    assert scaled is not features and scaled.dtype == np.float32
    assert SampledScaler(copy=False).fit(features).transform(features) is features


def test_standardized_pca_equals_scaler_then_pca_on_the_same_rows():
    from sklearn.decomposition import PCA

    features = np.abs(np.random.default_rng(0).normal(1, 2, (3_000, 32))).astype(np.float32)
    fused = StandardizedPCA(8, max_samples=1_000).fit(features)
    sample = features[np.sort(np.random.default_rng(0).choice(3_000, 1_000, replace=False))]
    scaler = StandardScaler().fit(sample.astype(np.float64))
    pca = PCA(8, svd_solver="randomized", iterated_power=3, random_state=0).fit(scaler.transform(sample))
    np.testing.assert_allclose(fused.transform(features), pca.transform(scaler.transform(features)), atol=1e-4)
    assert fused.transform(features).dtype == np.float32
    assert StandardizedPCA(64).fit(features[:20]).transform(features).shape == (3_000, 20)


def test_size_adaptive_classifier_picks_by_training_size():
    features, labels = separable(n=100)
    chooser = SizeAdaptiveClassifier(
        small=LogisticRegression(C=1.0), large=LogisticRegression(C=0.01), max_small_samples=50
    )
    assert chooser.fit(features, labels).estimator_.C == 0.01
    assert clone(chooser).set_params(max_small_samples=100).fit(features, labels).estimator_.C == 1.0


@pytest.mark.parametrize(
    "estimator",
    [
        FeatureNormalizer("l2"),
        FeatureNormalizer("power"),
        SampledScaler(max_samples=20),
        StandardizedPCA(2, max_samples=20),
        NystroemSVM(n_pca=4, n_landmarks=20),
        SizeAdaptiveClassifier(small=LogisticRegression(), large=LogisticRegression()),
    ],
)
def test_our_estimators_pass_sklearn_checks(estimator):
    # Its PCA and landmarks are fitted unweighted (weights are for the SVM's loss), so weighted
    # rows are not the same as repeated ones there.
    unweighted_steps = {"check_sample_weight_equivalence_on_dense_data": "PCA and Nystroem fitted unweighted"}
    check_estimator(estimator, expected_failed_checks=unweighted_steps if isinstance(estimator, NystroemSVM) else None)


SIZE_SWITCHES = {"svm": 50_000, "svm-rbf": 20_000}  # the heads that change solver above a row count (first switch)


@pytest.mark.parametrize("width", [64, 128, 512, 1280, 2048])  # what the registry's backbones produce
@pytest.mark.parametrize("head", ["logreg", "svm", "svm-rbf", "gbm", "mlp"])
def test_every_head_fits_every_width_on_both_sides_of_its_size_switch(head, width):
    """A head's size switch is invisible to its user, so it must never be where it breaks:
    just below and just above it, at every embedding width, each head fits and predicts.
    The switch is lowered to 300 rows here to stay fast; the next test runs at the real one."""
    params = {"max_small_samples": 300} if head in SIZE_SWITCHES else {}
    for rows in (300, 301):
        features, labels = separable(n=rows, d=width, seed=rows)
        pipeline, _ = fit_head(features, labels, head, **params)
        probabilities = pipeline.predict_proba(features)
        assert probabilities.shape == (rows, 2) and np.isfinite(probabilities).all()
        assert (pipeline.predict(features) == labels).mean() > 0.75
        if head in SIZE_SWITCHES:
            switch = pipeline.named_steps["classifier"]
            fitted, expected = switch.estimator_, switch.large if rows > 300 else switch.small
            while isinstance(expected, SizeAdaptiveClassifier):  # svm-rbf's second switch: 301 rows are below it
                fitted, expected = fitted.estimator_, expected.small
            assert type(fitted.estimator) is type(expected.estimator)  # both calibrated


def test_svm_rbf_between_its_switches_fits_one_svc_calibrated_on_a_held_out_tenth():
    """Above 20,000 rows three SVC fits cost minutes (38k face rows: 2 min each): one SVC is
    fitted on nine tenths of the rows, its sigmoid on the tenth it did not see."""
    features, labels = separable(n=1000, d=64)
    pipeline, _ = fit_head(features, labels, "svm-rbf", max_small_samples=500)
    (fold,) = pipeline.named_steps["classifier"].estimator_.estimator_.calibrated_classifiers_
    assert isinstance(fold.estimator, SVC) and fold.estimator.shape_fit_[0] == 900
    probabilities = pipeline.predict_proba(features)[:, 1]
    assert (pipeline.predict(features) == labels).mean() > 0.9
    assert 0 < probabilities.min() < 0.1 and 0.9 < probabilities.max() < 1  # a sigmoid, not the SVC's sign


def test_blas_svc_decides_as_libsvm_does():
    """The same decision values as libsvm's loop, also across the 4,096-row blocks."""
    features, labels = separable(n=4600, d=64)
    fitted = BlasSVC(C=3.0, gamma="scale").fit(features[:500], labels[:500])
    np.testing.assert_allclose(
        fitted.decision_function(features[500:]), SVC.decision_function(fitted, features[500:]), atol=1e-9
    )


def test_svm_rbf_approximation_fits_a_face_network_sized_cache():
    """The reported case: 128-d face-network features, more rows than exact SVC takes (its
    approximation asked PCA for 256 components of 128 columns)."""
    features, labels = separable(n=SIZE_SWITCHES["svm-rbf"] + 1, d=128)
    pipeline, _ = fit_head(features, labels, "svm-rbf", max_exact_samples=SIZE_SWITCHES["svm-rbf"])
    approximation = pipeline.named_steps["classifier"].estimator_.estimator_.calibrated_classifiers_[0].estimator
    assert approximation.pipeline_.named_steps["pca"].pca_.n_components_ == 128
    assert (pipeline.predict(features) == labels).mean() > 0.9


def test_a_fit_scikit_learn_refuses_is_one_line_naming_the_head():
    features, labels = separable(n=4)
    with pytest.raises(
        FeatgenderError,
        match=r"^--head svm: scikit-learn could not fit it on 4 x 40 features: .*"
        r"3-fold.*\(choose another --head or give it more rows",
    ):
        fit_head(features, np.array([0, 1, 1, 1]), "svm")


def test_search_tunes_the_key_parameter_on_train_only():
    features, labels = separable()
    pipeline, result = fit_head(features, labels, "logreg", search=True, n_jobs=1)
    assert result["best_params"]["C"] in search_grid("logreg")["classifier__C"]
    assert pipeline.named_steps["classifier"].C == result["best_params"]["C"]
    assert 0.9 < result["cv_accuracy"] <= 1.0


def test_streaming_fit_matches_in_memory_accuracy():
    features, labels = separable(n=2000)
    test_features, test_labels = separable(n=500, seed=1)

    def chunks():
        return ((features[i : i + 256], labels[i : i + 256]) for i in range(0, 2000, 256))

    before = features.copy()
    streamed = fit_head_streaming(chunks, "logreg")
    in_memory, _ = fit_head(features, labels, "logreg")
    np.testing.assert_array_equal(features, before)  # the caller's chunks are left as they were
    fit_head_streaming(chunks, "logreg", normalize="none")  # no normaliser's copy to scale in place
    np.testing.assert_array_equal(features, before)
    streamed_accuracy = (streamed.predict(test_features) == test_labels).mean()
    assert streamed_accuracy > (in_memory.predict(test_features) == test_labels).mean() - 0.02
    assert streamed.named_steps["scale"].n_samples_seen_ == 2000
    assert fit_head_streaming(chunks, "svm").predict_proba(test_features).shape == (500, 2)
    with pytest.raises(FeatgenderError, match="out-of-core"):
        fit_head_streaming(chunks, "gbm")


def test_artifacts_refuse_foreign_files(tmp_path):
    import joblib

    with pytest.raises(FeatgenderError, match="no such file"):
        load_model(tmp_path / "none.joblib")
    (tmp_path / "text.joblib").write_text("hello")
    with pytest.raises(FeatgenderError, match="not a featgender model"):
        load_model(tmp_path / "text.joblib", trusted=True)
    joblib.dump({"some": "dict"}, tmp_path / "dict.joblib")
    with pytest.raises(FeatgenderError, match="not a featgender head artifact"):
        load_model(tmp_path / "dict.joblib", trusted=True)
    joblib.dump({"format": "featgender-head", "format_version": 99}, tmp_path / "new.joblib")
    with pytest.raises(FeatgenderError, match="artifact format 99"):
        load_model(tmp_path / "new.joblib", trusted=True)
    joblib.dump({"format": "featgender-head", "format_version": 1, "head": "logreg"}, tmp_path / "part.joblib")
    with pytest.raises(FeatgenderError, match="metadata is incomplete"):
        load_model(tmp_path / "part.joblib", trusted=True)


def test_only_artifacts_written_here_open_without_trusted(tmp_path):
    import shutil

    from featgender.files import file_sha256
    from featgender.heads import HeadModel

    features, labels = separable()
    model = HeadModel(
        make_head("logreg").fit(features, labels), head="logreg", params={}, backbones=[{"backbone": "x"}], training={}
    )
    model.save(tmp_path / "ours.joblib")
    assert load_model(tmp_path / "ours.joblib").sha256 == file_sha256(tmp_path / "ours.joblib")
    shutil.copy(tmp_path / "ours.joblib", tmp_path / "copy.joblib")
    load_model(tmp_path / "copy.joblib")  # the same bytes: still ours
    with open(tmp_path / "copy.joblib", "ab") as handle:
        handle.write(b"\0")  # changed after it was written: from elsewhere now
    with pytest.raises(FeatgenderError, match=r"copy.joblib: sha256 [0-9a-f]{64} was not written by featgender here"):
        load_model(tmp_path / "copy.joblib")
    assert load_model(tmp_path / "copy.joblib", trusted=True).head == "logreg"


def test_fitted_pipelines_pickle():
    features, labels = separable()
    pipeline, _ = fit_head(features, labels, "svm")
    again = pickle.loads(pickle.dumps(pipeline))
    np.testing.assert_array_equal(again.predict_proba(features), pipeline.predict_proba(features))


def test_streaming_fit_over_a_label_sorted_cache_matches_in_memory(tmp_path):
    """Class folders give caches sorted by label; chunks read in file order would hold one
    class each and ruin SGD. Shuffled blocks mix them: accuracy as in memory, each row once."""
    from featgender.cache import iter_cache_chunks, read_cache, write_cache
    from featgender.data import FaceDataset

    rng = np.random.default_rng(0)
    n, d = 8000, 32
    labels = np.repeat(np.array([0, 1], dtype=np.int8), n // 2)
    features = rng.normal(0, 1, (n, d)).astype(np.float32) + 0.15 * np.outer(2 * labels - 1, rng.normal(0, 1, d))
    splits = np.where(rng.random(n) < 0.25, 2, 0).astype(np.int8)
    dataset = FaceDataset(
        root=tmp_path,
        format="generated",
        image_ids=[f"{i:05d}" for i in range(n)],
        paths=[],
        labels=labels,
        splits=splits,
        split_source="generated",
    )
    cache = tmp_path / "sorted.h5"
    write_cache(cache, dataset, [(features, [""] * n)], {"backbone": "generated", "feature_dim": d, "dtype": "float32"})
    train, test = read_cache(cache, "train"), read_cache(cache, "test")

    order = np.random.default_rng(0)
    streamed = fit_head_streaming(
        lambda: iter_cache_chunks(cache, "train", rows=512, shuffle=order), "logreg", overwrite_chunks=True
    )
    in_memory, _ = fit_head(train.features, train.labels, "logreg")

    def accuracy(model):
        return (model.predict(test.features) == test.labels).mean()

    test_features = test.features.copy()
    assert accuracy(streamed) > accuracy(in_memory) - 0.03  # 3 standard errors on 2,000 test rows; file order: -0.10
    np.testing.assert_array_equal(test.features, test_features)  # fitted in place, predicts on a copy

    passes = [list(iter_cache_chunks(cache, "train", rows=512, shuffle=order)) for _ in range(2)]
    for chunks in passes:
        assert all(len(block) <= 512 for block, _ in chunks)
        streamed_rows = np.concatenate([block for block, _ in chunks])
        order_of = np.lexsort(streamed_rows.T)
        np.testing.assert_array_equal(streamed_rows[order_of], train.features[np.lexsort(train.features.T)])
    assert not np.array_equal(passes[0][0][0], passes[1][0][0])  # another order each pass
