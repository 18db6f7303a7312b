import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

import featgender
from featgender.backbones import build_backbone
from featgender.cache import CacheData, read_caches
from featgender.data import load_dataset
from featgender.errors import FeatgenderError
from featgender.evaluate import evaluate_model
from featgender.extract import build_cache
from featgender.heads import load_model
from featgender.metrics import bootstrap_ci, classification_metrics, resampled_metrics, subgroup_metrics
from featgender.predictor import expand_inputs, write_predictions_csv
from featgender.training import train_head


def test_metrics_match_sklearn_including_rank_auc_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(np.clip(labels * 0.3 + rng.normal(0.35, 0.25, 200), 0, 1), 1)  # many ties
    predicted = (scores >= 0.5).astype(int)
    result = classification_metrics(labels, predicted, scores)
    assert result["accuracy"] == skm.accuracy_score(labels, predicted)
    assert result["f1"] == skm.f1_score(labels, predicted)
    assert result["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
    vectorised = resampled_metrics(labels[None], predicted[None], scores[None])
    for name in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc"):
        assert vectorised[name][0] == pytest.approx(result[name], abs=1e-12), name


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_more_images():
    rng = np.random.default_rng(1)

    def width(n):
        labels = rng.integers(0, 2, n)
        predicted = np.where(rng.random(n) < 0.9, labels, 1 - labels)
        low, high = bootstrap_ci(labels, predicted, n_boot=500)["accuracy"]
        assert low <= (labels == predicted).mean() <= high
        return high - low

    assert width(4000) < width(200) / 2


def test_bootstrap_of_a_large_split_runs_in_batches_with_the_same_resamples():
    """50,000 images: resamples drawn in batches of 83 (memory), the same as all at once."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 50_000)
    predicted = np.where(rng.random(50_000) < 0.8, labels, 1 - labels)
    rows = np.random.default_rng(0).integers(0, 50_000, size=(300, 50_000))
    expected = np.percentile((labels[rows] == predicted[rows]).mean(axis=1), [2.5, 97.5])
    np.testing.assert_allclose(bootstrap_ci(labels, predicted, n_boot=300)["accuracy"], expected, rtol=1e-12)


def test_subgroup_slices_and_gap():
    labels = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    predicted = np.array([1, 1, 0, 0, 0, 1, 1, 0])
    young = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    race = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    data = CacheData(
        np.zeros((8, 2), np.float32),
        labels,
        [str(i) for i in range(8)],
        np.zeros(8, np.int8),
        np.stack([young, race], 1),
        ["Young", "race"],
        {"race": ["asian", "white"]},
        {},
    )
    slices = subgroup_metrics(data, predicted, min_size=1)
    assert slices["Young"]["groups"]["Young"] == {"n": 4, "accuracy": 1.0, "female_error": 0.0, "male_error": 0.0}
    assert slices["Young"]["groups"]["not Young"] == {"n": 4, "accuracy": 0.5, "female_error": 0.5, "male_error": 0.5}
    assert slices["Young"]["accuracy_gap"] == 0.5
    assert set(slices["race"]["groups"]) == {"asian", "white"}
    with pytest.raises(FeatgenderError, match="--groups 'Bald'"):
        subgroup_metrics(data, predicted, ["Bald"])


def test_the_worst_mistakes_are_the_surest_wrong_answers_on_a_contact_sheet(tmp_path):
    from conftest import write_images

    from featgender.metrics import worst_mistakes
    from featgender.report import contact_sheet

    write_images(tmp_path / "img_align_celeba", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], [1, 0, 1, 0])  # men reddish
    ids = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    images = [str(tmp_path / "img_align_celeba" / name) for name in ids]
    scores = np.array([0.9, 0.7, 0.05, 0.4])  # right, wrong, wrong and surest, right
    rows = CacheData(
        np.zeros((4, 2), np.float32),
        np.array([1, 0, 1, 0]),
        ids,
        np.zeros(4, np.int8),
        None,
        [],
        {},
        {"dataset_root": str(tmp_path), "dataset_format": "celeba"},
    )  # a CelebA cache's rows
    mistakes = worst_mistakes(rows, scores)
    assert mistakes == [
        {"image": images[2], "label": "male", "p_male": 0.05, "label_contradicted": False},
        {"image": images[1], "label": "female", "p_male": 0.7, "label_contradicted": False},
    ]
    assert [m["label_contradicted"] for m in worst_mistakes(rows, scores, contradicted=["b.jpg"])] == [False, True]
    moved = {"image": str(tmp_path / "gone.jpg"), "label": "female", "p_male": 0.8}
    sheet = np.asarray(Image.open(contact_sheet(mistakes + [moved], tmp_path / "m.png", columns=2, side=64)))
    assert sheet.shape == (2 * (64 + 30), 128, 3)
    first, second, gone = sheet[20:44, 20:44], sheet[20:44, 84:108], sheet[94 + 20 : 94 + 44, 20:44]
    assert first[..., 0].mean() > first[..., 2].mean() + 50  # image c, a man's
    assert second[..., 2].mean() > second[..., 0].mean() + 50  # image b, a woman's
    assert np.all(gone == 160)  # unreadable: a grey tile


def test_labels_that_contradict_each_other_by_identity_are_kept_apart(tmp_path):
    from featgender.metrics import label_audit
    from featgender.report import markdown_summary

    (tmp_path / "identity_CelebA.txt").write_text("a.jpg 7\nb.jpg 7\nc.jpg 9\nd.jpg 9\ne.jpg 4\n\n")
    ids = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]  # f.jpg: no identity listed
    labels, predicted = np.array([1, 1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 0, 1])
    rows = CacheData(
        np.zeros((6, 2), np.float32),
        labels,
        ids,
        np.zeros(6, np.int8),
        None,
        [],
        {},
        {"dataset_root": str(tmp_path), "dataset_format": "celeba"},
    )
    audit = label_audit(rows, predicted, n_boot=50)
    assert audit["identities"] == 4 and audit["conflicting_identities"] == 1  # person 9: male and female
    assert audit["conflicting_images"] == ["c.jpg", "d.jpg"]
    assert audit["n_consistent"] == 4 and audit["accuracy_consistent"] == 0.75  # b.jpg is the model's error
    low, high = audit["ci95_consistent"]
    assert 0 <= low <= 0.75 <= high <= 1
    result = {"split": "test", "n": 6, "confusion_matrix": [[2, 0], [2, 2]], "ci95": {}, "label_audit": audit}
    assert "1 of 4 people have images labelled both female and male (2 images: c.jpg, d.jpg)" in markdown_summary(
        result, "t"
    )
    assert (
        label_audit(
            CacheData(
                rows.features,
                labels,
                ids,
                rows.splits,
                None,
                [],
                {},
                {"dataset_root": str(tmp_path), "dataset_format": "csv"},
            ),
            predicted,
        )
        is None
    )
    (tmp_path / "identity_CelebA.txt").write_text("a.jpg 7\nb.jpg\n")
    with pytest.raises(FeatgenderError, match=r"identity_CelebA.txt:2: expected"):
        label_audit(rows, predicted)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two small real caches of one generated dataset (two backbones), and a head fitted on one."""
    from conftest import write_images

    root = tmp_path_factory.mktemp("faces")
    write_images(root, [f"male/{i}.jpg" for i in range(40)], [1] * 40, seed=5)
    write_images(root, [f"female/{i}.jpg" for i in range(40)], [0] * 40, seed=6)
    dataset = load_dataset(root)
    caches = []
    for name in ("mobilenet_v3_small", "resnet18"):
        caches.append(root / f"{name}.h5")
        build_cache(dataset, build_backbone(name, weights="none"), caches[-1], progress=False)
    model_path = root / "models" / "logreg.joblib"
    model, evaluation = train_head(caches[0], "logreg", out=model_path)
    return root, caches, model_path, model, evaluation


def test_train_head_evaluates_and_saves_a_complete_artifact(trained):
    root, caches, model_path, model, evaluation = trained
    assert evaluation["split"] == "valid" and evaluation["n"] == 8
    assert evaluation["accuracy"] >= 0.75
    loaded = load_model(model_path)
    assert loaded.backbones[0]["backbone"] == "mobilenet_v3_small"
    assert loaded.training["images"] == 64 and loaded.metrics["accuracy"] == evaluation["accuracy"]
    assert "scikit-learn" in loaded.versions
    features = read_caches(caches[0], "test").features
    np.testing.assert_array_equal(loaded.predict_proba(features), model.predict_proba(features))


def test_evaluate_writes_a_report(trained, tmp_path):
    root, caches, model_path, _, _ = trained
    result = evaluate_model(model_path, caches[0], split="test", report=tmp_path / "report")
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert written["accuracy"] == result["accuracy"] and "ci95" in written
    assert "| accuracy |" in (tmp_path / "report" / "report.md").read_text()
    if pytest.importorskip("matplotlib"):
        assert Image.open(tmp_path / "report" / "roc.png").size[0] > 100
    with pytest.raises(FeatgenderError, match="does not match the model"):
        evaluate_model(model_path, caches[1])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FeatgenderError, match="--report .*a_file: is a file; name a folder"):
        evaluate_model(model_path, caches[0], report=tmp_path / "a_file")
    with pytest.raises(FeatgenderError, match="--report .*a_file/report: cannot be written"):
        evaluate_model(model_path, caches[0], report=tmp_path / "a_file" / "report")


def test_a_head_scores_a_datasets_images_as_their_cache_and_leaves_out_or_counts_failures(csv_dataset, tmp_path):
    from featgender.evaluate import evaluate_images

    cache, model_path = tmp_path / "c.h5", tmp_path / "m.joblib"
    dataset = load_dataset(csv_dataset)
    build_cache(dataset, build_backbone("mobilenet_v3_small", weights="none"), cache, dtype="float32", progress=False)
    train_head(cache, "logreg", eval_split=None, out=model_path)
    on_cache = evaluate_model(model_path, cache, split="test")
    on_images = evaluate_images(model_path, csv_dataset, split="test", progress=False, report=tmp_path / "report")
    for name in ("n", "accuracy", "confusion_matrix", "subgroups"):
        assert on_images[name] == on_cache[name], name
    assert on_images["roc_auc"] == pytest.approx(on_cache["roc_auc"]) and on_images["failed"] == 0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["data"] == str(csv_dataset)
    with pytest.raises(FeatgenderError, match="--split 'tset'"):
        evaluate_images(model_path, csv_dataset, split="tset")
    dataset.paths[int(np.flatnonzero(dataset.splits == 2)[0])].write_text("no image")
    left_out = evaluate_images(model_path, csv_dataset, progress=False)
    assert (left_out["n"], left_out["failed"]) == (3, 1)
    counted = evaluate_images(model_path, csv_dataset, count_failed=True, progress=False)
    assert (counted["n"], counted["failed"], counted["accuracy"]) == (4, 1, (left_out["accuracy"] * 3) / 4)


def test_a_model_whose_weights_file_is_gone_says_which_file(csv_dataset, tmp_path):
    """A head on a network from a weights file (the quick start's fine-tuned one) needs that file:
    without it, predict names it rather than failing on an option the user never gave."""
    import torch
    from torchvision.models import mobilenet_v3_small

    weights = tmp_path / "net.pt"
    torch.save(mobilenet_v3_small().state_dict(), weights)
    cache, model_path = tmp_path / "c.h5", tmp_path / "m.joblib"
    network = build_backbone("mobilenet_v3_small", weights=str(weights))
    build_cache(load_dataset(csv_dataset), network, cache, progress=False)
    train_head(cache, "logreg", eval_split=None, out=model_path)
    image = sorted((csv_dataset / "images").iterdir())[0]
    assert featgender.load(model_path).predict([image])[0].label in ("female", "male")
    weights.rename(tmp_path / "moved.pt")
    with pytest.raises(FeatgenderError, match=f"the model's weights file {weights} is missing"):
        featgender.load(model_path).predict([image])


def test_caches_of_two_backbones_join_by_id(trained, tmp_path):
    root, caches, _, _, _ = trained
    joined = read_caches(caches, "train")
    assert joined.features.shape == (64, 576 + 512)
    model, evaluation = train_head(caches, "logreg", eval_split="test", out=tmp_path / "joint.joblib")
    assert model.feature_dim == 1088 and [b["backbone"] for b in model.backbones] == ["mobilenet_v3_small", "resnet18"]
    other = tmp_path / "other.h5"
    build_cache(load_dataset(root, limit=40), build_backbone("resnet18", weights="none"), other, progress=False)
    with pytest.raises(FeatgenderError, match="other images"):
        read_caches([caches[0], other])


def test_out_of_core_fit_on_a_cache(trained):
    _, caches, _, model, _ = trained
    streamed, evaluation = train_head(caches[0], "logreg", out_of_core=True)
    assert streamed.training["images"] == 64
    assert evaluation["accuracy"] >= 0.75
    for options in ({"pca": 16}, {"C": 0.1}, {"search": True}):
        with pytest.raises(FeatgenderError, match="--out-of-core: --(pca|C|search) not supported"):
            train_head(caches[0], "logreg", out_of_core=True, **options)


def test_predict_images_with_broken_files_and_odd_modes(trained, tmp_path):
    root, _, model_path, _, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(root / "male" / "0.jpg").save(folder / "man.jpg")
    Image.open(root / "female" / "0.jpg").convert("LA").save(folder / "woman_gray_alpha.png")
    Image.open(root / "female" / "1.jpg").convert("CMYK").save(folder / "woman_cmyk.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "link.jpg").symlink_to(root / "male" / "1.jpg")
    (folder / "sub").symlink_to(tmp_path / "linked")
    files = expand_inputs([folder])
    assert [f.name for f in files] == ["broken.jpg", "man.jpg", "link.jpg", "woman_cmyk.jpg", "woman_gray_alpha.png"]
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    with pytest.raises(FeatgenderError, match="no_images: no image files"):
        expand_inputs([folder, tmp_path / "no_images"])
    predictor = featgender.load(model_path)
    predictions = predictor.predict(files)
    by_name = {p.image.split("/")[-1]: p for p in predictions}
    originals = predictor.predict([root / "male" / "0.jpg", root / "male" / "1.jpg", root / "female" / "1.jpg"])
    assert by_name["broken.jpg"].label is None and "broken.jpg" in by_name["broken.jpg"].image
    assert "UnidentifiedImageError" in by_name["broken.jpg"].error
    assert by_name["man.jpg"].probability == pytest.approx(originals[0].probability, abs=0.05)
    # the symlink's target, unchanged up to float rounding: another batch sums in another order
    assert by_name["link.jpg"].probability == pytest.approx(originals[1].probability, abs=1e-6)
    assert by_name["woman_cmyk.jpg"].probability == pytest.approx(originals[2].probability, abs=0.1)
    assert by_name["woman_gray_alpha.png"].label in ("male", "female")
    assert write_predictions_csv(predictions, tmp_path / "out.csv") == 4
    rows = list(csv.reader(open(tmp_path / "out.csv")))
    assert rows[0] == ["id", "label"] and ["man.jpg", by_name["man.jpg"].label] in rows


def test_cnn_features_in_a_sklearn_pipeline(trained):
    import pickle

    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.estimator_checks import (
        check_get_params_invariance,
        check_no_attributes_set_in_init,
        check_parameters_default_constructible,
        check_set_params,
    )

    root = trained[0]
    paths = sorted(root.glob("*/*.jpg"))
    labels = [int(p.parent.name == "male") for p in paths]
    features = featgender.CNNFeatures("mobilenet_v3_small", weights="none", batch_size=16)
    for check in (
        check_get_params_invariance,
        check_no_attributes_set_in_init,
        check_parameters_default_constructible,
        check_set_params,
    ):
        check("CNNFeatures", clone(features))
    pipeline = make_pipeline(features, StandardScaler(), LogisticRegression(max_iter=1000)).fit(paths[::2], labels[::2])
    assert (pipeline.predict(paths[1::2]) == labels[1::2]).mean() > 0.9
    again = pickle.loads(pickle.dumps(pipeline))
    np.testing.assert_array_equal(again.predict_proba(paths[:4]), pipeline.predict_proba(paths[:4]))
    with pytest.raises(FeatgenderError, match="missing.jpg: cannot be read"):
        pipeline.predict([root / "missing.jpg"])


def test_failed_images_stay_out_of_metrics_unless_counted(trained, tmp_path):
    import shutil

    root, caches, model_path, _, _ = trained
    copy = tmp_path / "faces"
    shutil.copytree(root / "male", copy / "male")
    shutil.copytree(root / "female", copy / "female")
    dataset = load_dataset(copy)
    test_rows = np.flatnonzero(dataset.splits == 2)
    for row in test_rows[:3]:
        dataset.paths[row].write_bytes(b"")  # three test images fail at extraction
    cache = tmp_path / "broken.h5"
    build_cache(dataset, build_backbone("mobilenet_v3_small", weights="none"), cache, progress=False)
    left_out = evaluate_model(model_path, cache, split="test")
    counted = evaluate_model(model_path, cache, split="test", count_failed=True)
    assert left_out["n"] == len(test_rows) - 3 and left_out["failed_counted_as_errors"] == 0
    assert counted["n"] == len(test_rows) and counted["failed_counted_as_errors"] == 3
    correct = left_out["accuracy"] * left_out["n"]
    assert counted["accuracy"] == pytest.approx(correct / counted["n"])


def test_a_model_joining_two_layers_of_one_network_predicts_from_one_pass_as_its_caches_say(csv_dataset, tmp_path):
    """One network joined at two layers is built once, for both, and its two blocks of
    features land where the head expects them: predictions match the caches' rows."""
    from featgender.extract import extract_layers
    from featgender.predict import network_groups

    caches = extract_layers(
        csv_dataset,
        layers=["features.6", "avgpool"],
        backbone="mobilenet_v3_small",
        weights="none",
        out=str(tmp_path / "c@{layer}.h5"),
        dtype="float32",
        progress=False,
    )
    model, _ = train_head([caches[1].path, caches[0].path], "logreg", eval_split=None, out=tmp_path / "m.joblib")
    assert [entry["layer"] for entry in model.backbones] == ["avgpool", "features.6"]
    assert network_groups(model.backbones) == [[0, 1]]
    assert network_groups([model.backbones[0], model.backbones[0]]) == [[0], [1]]  # one layer twice: two passes
    predictor = featgender.load(tmp_path / "m.joblib")
    assert len(predictor.backbones[False]) == 1 and predictor.backbones[False][0].layers == ("avgpool", "features.6")
    rows = read_caches([caches[1].path, caches[0].path])
    images = [csv_dataset / image_id for image_id in rows.ids[:6]]
    predicted = [p.probability for p in predictor.predict(images)]
    np.testing.assert_allclose(predicted, model.predict_proba(rows.features[:6]), atol=1e-4)
