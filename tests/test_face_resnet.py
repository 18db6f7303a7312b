"""dlib's face-recognition ResNet in torch: the reader of dlib's file, equality with dlib's
own descriptors on real faces, and what the torch backbone gets (flip, batches, heads that
travel between datasets, fine-tuning)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featgender.errors import FeatgenderError
from featgender.faces.resnet import FaceResNet, add_zero_filled, converted_state_dict, read_dlib_model

dlib = pytest.importorskip("dlib")

from featgender.backbones import build_backbone  # noqa: E402
from featgender.data import load_dataset  # noqa: E402
from featgender.faces import FaceAligner, calibrate_face_box, dlib_model_file  # noqa: E402
from featgender.images import load_image  # noqa: E402


@pytest.fixture(scope="module")
def dlib_file():
    return dlib_model_file("recognition")


@pytest.fixture(scope="module")
def face_chips(shared_faces):
    """Aligned 150 x 150 chips of 16 UTKFace and 8 CelebA faces, as uint8 (N, 3, 150, 150)."""
    chips = []
    for name, count in (("utkface", 16), ("celeba_mini", 8)):
        paths = load_dataset(shared_faces / name, limit=count * 4).paths[:count]
        aligner = FaceAligner(str(dlib_model_file("landmarks")), None, box=calibrate_face_box(paths))
        chips += [aligner(load_image(path)) for path in paths]
    return torch.stack(chips)


def test_zero_filled_addition_is_top_left_aligned():
    small = torch.ones(1, 1, 1, 1)
    large = torch.arange(8.0).view(1, 2, 2, 2)
    expected = large.clone()
    expected[0, 0, 0, 0] += 1  # only the top-left of the first channel overlaps
    assert torch.equal(add_zero_filled(small, large), expected)
    assert torch.equal(add_zero_filled(large, small), expected)


def test_the_reader_gives_every_weight_of_the_network(dlib_file):
    state = read_dlib_model(dlib_file)
    network = FaceResNet()
    assert network.load_state_dict(state, strict=True) is not None
    assert sorted(state) == sorted(network.state_dict())
    np.testing.assert_allclose(state["input_mean"].ravel(), [122.782, 117.001, 104.298], atol=1e-4)
    assert state["conv1.weight"].shape == (32, 3, 7, 7) and state["descriptor.weight"].shape == (128, 256)


def test_foreign_and_truncated_files_are_refused_by_name(dlib_file, tmp_path):
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(dlib_file.read_bytes()[:100_000])
    with pytest.raises(FeatgenderError, match="truncated.dat: not a dlib model file .*ends after 100000 bytes"):
        read_dlib_model(truncated)
    with pytest.raises(FeatgenderError, match="shape_predictor_5_face_landmarks.dat: not a dlib model file"):
        read_dlib_model(dlib_model_file("landmarks"))  # dlib, but not this network


def test_descriptors_equal_dlibs_own_within_1e_5(dlib_file, face_chips):
    """The equality that catches any wrong fact about the network: dlib's same-person
    threshold is 0.6, and an error in padding, pooling or folding moves descriptors more."""
    network = FaceResNet().eval()
    network.load_state_dict(read_dlib_model(dlib_file))
    with torch.inference_mode():
        ours = network(face_chips.float()).numpy()
    reference = dlib.face_recognition_model_v1(str(dlib_file))
    theirs = np.array(
        [reference.compute_face_descriptor(np.ascontiguousarray(chip.permute(1, 2, 0).numpy())) for chip in face_chips]
    )
    assert np.abs(ours - theirs).max() < 1e-5
    assert 1.0 < np.linalg.norm(theirs, axis=1).mean() < 2.5  # dlib's descriptors are not unit vectors


def test_the_conversion_is_kept_and_loaded_weights_only(dlib_file, tmp_path, monkeypatch):
    first = converted_state_dict(dlib_file, tmp_path)
    kept = list(tmp_path.glob("dlib_face_recognition_resnet_model_v1-*.pt"))
    assert len(kept) == 1
    torch.load(kept[0], weights_only=True)

    def no_parsing(path):
        raise AssertionError("dlib's file was parsed again")

    monkeypatch.setattr("featgender.faces.resnet.read_dlib_model", no_parsing)
    second = converted_state_dict(dlib_file, tmp_path)
    assert all(torch.equal(first[key], second[key]) for key in first)
    # and a converted file works as --weights PATH, like any state_dict
    assert build_backbone("dlib_resnet", weights=kept[0]).weights.name == f"file:{kept[0].name}"


def test_the_backbone_batches_flips_and_autocasts_like_any_torch_backbone(shared_faces):
    from featgender.embed import extract_features

    paths = load_dataset(shared_faces / "utkface", limit=40).paths[:12]
    backbone = build_backbone("dlib_resnet", face_box=calibrate_face_box(paths))
    options = dict(dtype="float32", precision="float32", progress=False)
    single, _ = extract_features(backbone, paths, batch_size=1, workers=0, **options)
    batched, errors = extract_features(backbone, paths, batch_size=5, workers=2, **options)
    assert errors == [""] * 12
    np.testing.assert_allclose(batched, single, atol=1e-5)
    chips = torch.stack([backbone.transform.loader_step(load_image(path, 400)) for path in paths]).float()
    with torch.inference_mode():
        mirrored = backbone.model(chips.flip(-1)).numpy()
    flipped, _ = extract_features(backbone, paths, flip=True, workers=0, **options)
    np.testing.assert_allclose(flipped, (single + mirrored) / 2, atol=1e-5)
    bf16, _ = extract_features(backbone, paths, precision="bfloat16", workers=0, progress=False, dtype="float32")
    cosine = (bf16 * single).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(single, axis=1)
    assert cosine.min() > 0.999


def test_a_head_fitted_on_one_datasets_cache_evaluates_another_datasets(shared_faces, tmp_path):
    """UTKFace's faces sit in one calibrated box, CelebA's in another: the chips, and so the
    features, mean the same, and a UTKFace model scores CelebA's cache (domain shift, not an error)."""
    from featgender.cache import read_metadata
    from featgender.evaluate import evaluate_model
    from featgender.extract import extract_to_cache
    from featgender.training import train_head

    utk = extract_to_cache(
        shared_faces / "utkface", backbone="dlib_resnet", limit=300, out=tmp_path / "utk.h5", progress=False
    )
    celeba = extract_to_cache(
        shared_faces / "celeba_mini", backbone="dlib_resnet", out=tmp_path / "celeba.h5", progress=False
    )
    boxes = [read_metadata(result.path)["preprocessing"] for result in (utk, celeba)]
    assert boxes[0] != boxes[1]  # the two datasets' calibrated face boxes differ
    train_head(utk.path, "logreg", eval_split=None, out=tmp_path / "utk.joblib")
    result = evaluate_model(tmp_path / "utk.joblib", celeba.path, split="train")
    assert result["n"] == 100 and result["accuracy"] > 0.85
    flipped = extract_to_cache(
        shared_faces / "celeba_mini", backbone="dlib_resnet", flip=True, out=tmp_path / "celeba-flip.h5", progress=False
    )
    with pytest.raises(FeatgenderError, match="does not match the model's features \\(flip differs\\)"):
        evaluate_model(tmp_path / "utk.joblib", flipped.path, split="train")


def test_the_face_network_fine_tunes_end_to_end_and_predicts(shared_faces, tmp_path):
    import featgender
    from featgender.finetune import finetune

    out = tmp_path / "dlib-ft.pt"
    result = finetune(
        shared_faces / "utkface",
        backbone="dlib_resnet",
        limit=60,
        epochs=1,
        unfreeze_last=2,
        batch_size=16,
        workers=0,
        out=out,
        progress=False,
    )
    saved = torch.load(out, weights_only=True)
    assert saved["trainable_blocks"] == ["blocks.13", "descriptor"]
    assert saved["config"]["face_box"] is not None  # the dataset's calibrated box, kept for prediction
    frozen_before = build_backbone("dlib_resnet").model.body.conv1.weight
    assert torch.equal(saved["state_dict"]["embedding.conv1.weight"], frozen_before)  # frozen blocks unchanged
    assert not torch.equal(
        saved["state_dict"]["embedding.descriptor.weight"], build_backbone("dlib_resnet").model.body.descriptor.weight
    )
    test = load_dataset(shared_faces / "utkface", limit=60)
    test_paths = [path for path, split in zip(test.paths, test.splits, strict=True) if split == 2]
    predictions = featgender.load(out).predict(test_paths, faces="crop")
    assert len(predictions) == len(test_paths) == result.test["n"]
    assert all(p.label in ("male", "female") for p in predictions)
    reframed = []  # the same faces framed otherwise: aligned where they are, not in the training box
    for path in test_paths:
        canvas = Image.new("RGB", (420, 320), (120, 110, 100))
        canvas.paste(Image.open(path).convert("RGB").resize((150, 150)), (250, 160))
        reframed.append(tmp_path / Path(path).name)
        canvas.save(reframed[-1], quality=95)
    gaps = [
        abs(a.probability - b.probability)
        for a, b in zip(predictions, featgender.load(out).predict(reframed, faces="crop"), strict=True)
    ]
    assert np.median(gaps) < 0.02
    # a face network finds faces in photos itself (pictures above 512 px are photos in 'auto'):
    # each face with its box
    photos = []
    for path in test_paths[:3]:
        canvas = Image.new("RGB", (640, 480), (120, 110, 100))
        canvas.paste(Image.open(path).convert("RGB").resize((150, 150)), (250, 160))
        photos.append(tmp_path / f"photo-{Path(path).name}")
        canvas.save(photos[-1], quality=95)
    in_photos = featgender.load(out).predict(photos)
    assert all(p.route == "photo" and p.box is not None and p.box[0] >= 240 for p in in_photos)  # found there
    assert np.allclose([p.probability for p in in_photos], [p.probability for p in predictions[:3]], atol=0.1)
