"""dlib's face-recognition backbone on real faces from ../shared (skips without dlib or ../shared)."""

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")

from featgender.backbones import build_backbone, weights_available, get_config  # noqa: E402
from featgender.data import load_dataset  # noqa: E402
from featgender.errors import FeatgenderError  # noqa: E402
from featgender.extract import extract_features, load_image  # noqa: E402
from featgender.faces import FaceAligner, dlib_model_file  # noqa: E402


@pytest.fixture(scope="module")
def dlib_backbone():
    return build_backbone("dlib_resnet")


def test_registry_entry_and_offline_weights():
    config = get_config("dlib_resnet")
    assert config.feature_dim == 128 and config.input_kind == "face crop"
    assert weights_available(config)
    with pytest.raises(FeatgenderError, match="--weights none: dlib_resnet has no random init"):
        build_backbone("dlib_resnet", weights="none")


def test_descriptors_equal_dlibs_own_pipeline_and_are_deterministic(dlib_backbone, shared_faces):
    import dlib

    paths = load_dataset(shared_faces / "utkface", limit=12).paths
    features, errors = extract_features(dlib_backbone, paths, workers=0, progress=False)
    assert features.shape == (12, 128) and errors == [""] * 12
    again, _ = extract_features(dlib_backbone, paths, workers=2, progress=False)
    np.testing.assert_array_equal(features, again)  # same with worker processes
    # dlib's reference path: detect, 5 landmarks, aligned chip, descriptor
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(dlib_model_file("landmarks")))
    network = dlib.face_recognition_model_v1(str(dlib_model_file("recognition")))
    image = np.ascontiguousarray(load_image(paths[0], 400).permute(1, 2, 0).numpy())
    box = max(detector(image, 0), key=lambda rect: rect.area())
    chip = dlib.get_face_chip(image, landmarks(image, box), size=150, padding=0.25)
    reference = np.asarray(network.compute_face_descriptor(chip))
    np.testing.assert_allclose(features[0], reference.astype(np.float16), rtol=1e-3, atol=1e-3)
    # dlib's descriptors are not unit vectors: its metric puts one person within distance 0.6
    assert 1.0 < np.linalg.norm(features.astype(np.float32), axis=1).mean() < 2.5


def test_a_photo_without_a_face_is_reported_not_classified(tmp_path):
    blank = torch.full((3, 120, 160), 128, dtype=torch.uint8)
    aligner = FaceAligner(str(dlib_model_file("landmarks")), None, face_crop=False)
    with pytest.raises(FeatgenderError, match="no face found"):
        aligner(blank)
    crop_aligner = FaceAligner(str(dlib_model_file("landmarks")), None, face_crop=True)
    assert crop_aligner(blank).shape == (3, 150, 150)  # a face crop falls back to its central box


def test_face_features_beat_imagenet_features_with_the_same_head(shared_faces, tmp_path):
    from featgender.cache import build_cache, read_cache
    from featgender.heads import make_head

    dataset = load_dataset(shared_faces / "utkface", limit=1000)
    accuracy = {}
    for name in ("dlib_resnet", "efficientnet_lite0"):
        out = tmp_path / f"{name}.h5"
        build_cache(dataset, build_backbone(name), out, progress=False)
        train, test = read_cache(out, "train"), read_cache(out, "test")
        head = make_head("logreg").fit(train.features, train.labels)
        accuracy[name] = (head.predict(test.features) == test.labels).mean()
    assert accuracy["dlib_resnet"] > accuracy["efficientnet_lite0"]
    assert accuracy["dlib_resnet"] > 0.93
