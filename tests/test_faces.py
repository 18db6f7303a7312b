"""dlib's face-recognition backbone on real faces from ../shared (skips without dlib or ../shared)."""

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("dlib")

from featgender.backbones import build_backbone, get_config, weights_available  # noqa: E402
from featgender.data import load_dataset  # noqa: E402
from featgender.embed import extract_features  # noqa: E402
from featgender.errors import FeatgenderError  # noqa: E402
from featgender.faces import FaceAligner, calibrate_face_box, dlib_model_file  # noqa: E402
from featgender.images import decode_image  # noqa: E402


@pytest.fixture(scope="module")
def dlib_backbone():
    return build_backbone("dlib_resnet")


def test_registry_entry_and_offline_weights():
    config = get_config("dlib_resnet")
    assert config.feature_dim == 128 and config.input_kind == "photo"
    assert weights_available(config)
    random_net = build_backbone("dlib_resnet", weights="none")  # seeded, as every backbone's
    assert random_net.weights.sha256 is None and random_net.model.layer == "descriptor"
    assert torch.equal(
        random_net.model.body.conv1.weight, build_backbone("dlib_resnet", weights="none").model.body.conv1.weight
    )


def test_descriptors_equal_dlibs_own_pipeline_and_are_deterministic(dlib_backbone, shared_faces):
    import dlib

    paths = load_dataset(shared_faces / "utkface", limit=12).paths
    # float32: where the CPU runs bfloat16 natively (AVX512-BF16, AMX), 'auto' autocasts and the
    # descriptors move by about 2e-3 from dlib's float32 ones
    features, errors = extract_features(dlib_backbone, paths, workers=0, precision="float32", progress=False)
    assert features.shape == (12, 128) and errors == [""] * 12
    again, _ = extract_features(dlib_backbone, paths, workers=2, precision="float32", progress=False)
    np.testing.assert_array_equal(features, again)  # same with worker processes
    # dlib's reference path: detect, 5 landmarks, aligned chip, descriptor
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(str(dlib_model_file("landmarks")))
    network = dlib.face_recognition_model_v1(str(dlib_model_file("recognition")))
    image = decode_image(paths[0], 400)
    box = max(detector(image, 0), key=lambda rect: rect.area())
    chip = dlib.get_face_chip(image, landmarks(image, box), size=150, padding=0.25)
    reference = np.asarray(network.compute_face_descriptor(chip))
    np.testing.assert_allclose(features[0], reference.astype(np.float16), rtol=1e-3, atol=1e-3)
    # dlib's descriptors are not unit vectors: its metric puts one person within distance 0.6
    assert 1.0 < np.linalg.norm(features.astype(np.float32), axis=1).mean() < 2.5


def test_faces_smaller_than_the_folders_framing_allows_are_not_sought(shared_faces):
    """A 400 px picture holding one of celeba_10k's 89 x 109 faces, which only the upsampled
    passes find: sought for any face, it is a photo of that small face; as a picture of a folder
    whose faces span half its width (200 px: none framed otherwise falls under 80 px), no face
    is sought below the detectors' window, and it goes the crop way in the central box."""
    from featgender.faces import default_detector
    from featgender.faces.route import face_in_crop_or_photo

    picture = Image.new("RGB", (400, 300), (90, 100, 110))
    picture.paste(Image.open(shared_faces / "celeba_10k" / "img_align_celeba" / "000581.jpg").convert("RGB"), (150, 90))
    detector = default_detector()
    route, ((box, _),) = face_in_crop_or_photo(detector, picture)
    assert route == "photo" and 150 <= box[0] < box[2] <= 239
    route, ((box, _),) = face_in_crop_or_photo(detector, picture, folder_face=0.5)
    assert route == "crop" and box == (40, 30, 360, 270)


def test_the_network_leaves_the_aligning_workers_their_cores(dlib_backbone, shared_faces):
    """While loader workers align faces on the CPU, torch computes on the cores they leave (three
    busy threads on two cores cost dlib's network a fifth to nearly half its speed), and gets
    every core back after; a network fed decoded crops alone keeps them all throughout."""
    from featgender.defaults import cores
    from featgender.embed import iter_features

    paths = load_dataset(shared_faces / "utkface", limit=40).paths[:40]
    before = torch.get_num_threads()
    during = [
        torch.get_num_threads() for _ in iter_features(dlib_backbone, paths, workers=1, batch_size=8, progress=False)
    ]
    assert during == [max(1, cores() - 1)] * 5 and torch.get_num_threads() == before
    in_process = [torch.get_num_threads() for _ in iter_features(dlib_backbone, paths[:8], workers=0, progress=False)]
    assert in_process == [before]
    crops = build_backbone("efficientnet_lite0")
    fed = [torch.get_num_threads() for _ in iter_features(crops, paths[:16], workers=1, batch_size=8, progress=False)]
    assert fed == [before] * 2


def test_small_faces_that_hog_and_the_cnn_miss_are_found_upsampled(shared_faces):
    """Three of celeba_10k's 89 x 109 faces: HOG, HOG upsampled and the CNN miss them; the CNN
    on the upsampled picture finds each, where a person sees it at once."""
    import dlib

    from featgender.faces import default_detector, find_faces

    hog, detector = dlib.get_frontal_face_detector(), default_detector()
    for name in ("000581.jpg", "004081.jpg", "008461.jpg"):
        picture = Image.open(shared_faces / "celeba_10k" / "img_align_celeba" / name).convert("RGB")
        assert not len(hog(np.asarray(picture), 1))
        ((left, top, right, bottom),) = find_faces(picture, detector)
        assert 0 <= left < 44 < right <= 89 and 0 <= top < 60 < bottom <= 109, name  # around the face's centre


def test_the_largest_face_is_sought_halved_first_and_every_face_on_the_whole_picture(shared_faces):
    """Two web faces HOG misses on a 640 x 400 picture, one of 224 px, one of 80: asked for the
    largest alone, the CNN finds it on the picture halved (where the small one is too small to
    see) in the place it finds it whole; asked for every face, both are found."""
    from featgender.faces import default_detector, find_faces
    from featgender.faces.align import overlap

    canvas = Image.new("RGB", (640, 400), (90, 100, 110))
    canvas.paste(Image.open(shared_faces / "fairface" / "train" / "1001.jpg").convert("RGB"), (40, 80))
    small = Image.open(shared_faces / "fairface" / "train" / "10068.jpg").convert("RGB").resize((80, 80))
    canvas.paste(small, (420, 150))
    detector = default_detector()
    every = find_faces(canvas, detector)
    assert len(every) == 2 and every[0][0] < 320 < every[1][0]  # the large face first, then the small one
    (largest,) = find_faces(canvas, detector, largest=True)
    assert all(value % 2 == 0 for value in largest)  # found halved: its box doubled
    assert overlap(largest, every[0]) > 0.7


def test_a_folders_large_faces_are_sought_halved_before_hog_looks(shared_faces):
    """A UTKFace face of 180 px on a 360 x 300 picture, which HOG finds: sought for any face,
    HOG's box comes back; as a picture of a folder whose faces are large (no face under the
    detectors' window), the CNN on the picture halved finds it first, in the same place."""
    from featgender.faces import default_detector, find_faces
    from featgender.faces.align import overlap

    picture = Image.new("RGB", (360, 300), (90, 100, 110))
    picture.paste(Image.open(load_dataset(shared_faces / "utkface", limit=1).paths[0]).convert("RGB"), (100, 50))
    detector = default_detector()
    (hogs,) = find_faces(picture, detector, largest=True)
    (halved,) = find_faces(picture, detector, largest=True, small_faces=False)
    assert any(value % 2 for value in hogs) and all(value % 2 == 0 for value in halved)  # found halved: doubled
    assert overlap(hogs, halved) > 0.6


def test_hogs_boxes_are_remembered_per_picture_for_the_face_step_after_calibration(dlib_model):
    """A picture HOG has looked at (a calibration sample) gets the same boxes again without a
    second look; a picture differing in one pixel is looked at anew."""
    import dlib

    from featgender.faces.detect import hog_boxes

    _, paths, _ = dlib_model
    detector = dlib.get_frontal_face_detector()
    looked = []

    def hog(pixels, upsample):
        looked.append(pixels.shape)
        return detector(pixels, upsample)

    pixels = np.ascontiguousarray(decode_image(paths[0])[:, ::-1])  # mirrored: no test has looked at it
    first = hog_boxes(hog, pixels)
    assert first and first == [(r.left(), r.top(), r.right(), r.bottom()) for r in detector(pixels, 0)]
    assert hog_boxes(hog, pixels.copy()) == first and len(looked) == 1
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    assert hog_boxes(hog, changed) == first and len(looked) == 2  # looked at again: a new picture


def test_a_photo_without_a_face_is_reported_not_classified(tmp_path):
    blank = torch.full((3, 120, 160), 128, dtype=torch.uint8)
    aligner = FaceAligner(str(dlib_model_file("landmarks")), None, face_crop=False)
    with pytest.raises(FeatgenderError, match="no face found"):
        aligner(blank)
    crop_aligner = FaceAligner(str(dlib_model_file("landmarks")), None, face_crop=True)
    assert crop_aligner(blank).shape == (3, 150, 150)  # a face crop falls back to its central box


def test_pictures_a_few_pixels_wide_go_the_crop_way_without_crashing_the_call(dlib_model, tmp_path):
    """A 1-pixel side halved for the detector became 0 (PIL refused it) and a 6-pixel one made
    the CNN fail: either ended the whole `predict` call."""
    import featgender

    paths = [tmp_path / f"{width}x{height}.png" for width, height in ((1, 1), (3, 7), (50, 1))]
    for path in paths:
        Image.new("RGB", tuple(map(int, path.stem.split("x"))), (120, 100, 90)).save(path)
    predictions = featgender.load(dlib_model[0]).predict(paths)
    assert [(p.route, p.error, p.label is not None) for p in predictions] == [("crop", "", True)] * 3  # no face found


def test_aligned_crops_get_a_fixed_face_box_and_skip_detection(shared_faces, tmp_path):
    from PIL import Image

    box = calibrate_face_box(load_dataset(shared_faces / "celeba_mini").paths)
    # img_align_celeba puts the face at the same place in every image: the centre, below the middle
    np.testing.assert_allclose(box, (0.25, 0.43, 0.74, 0.82), atol=0.03)
    walls = []
    for i in range(6):
        Image.new("RGB", (120, 100), (40 * i, 90, 90)).save(tmp_path / f"{i}.png")
        walls.append(tmp_path / f"{i}.png")
    assert calibrate_face_box(walls) is None  # no faces: detect
    blank = torch.full((3, 218, 178), 128, dtype=torch.uint8)
    fixed = FaceAligner(str(dlib_model_file("landmarks")), None, face_crop=False, box=box)
    assert fixed(blank).shape == (3, 150, 150)  # landmarks in the box, no detection to fail
    assert build_backbone("dlib_resnet", face_box=box).config.preprocessing()["face_box"] == list(box)
    with pytest.raises(FeatgenderError, match="--face-box: resnet18 does not align faces"):
        build_backbone("resnet18", weights="none", face_box=box)


def test_calibration_looks_upsampled_only_where_faces_are_too_small_to_find_at_their_size(shared_faces, tmp_path):
    """Half-resolution CelebA's faces (about 40 px, under HOG's 80 px window) are found by the
    upsampled look; where HOG finds most faces at their size, the few that only that look finds
    do not count: ten UTKFace crops and four pictures of their size with a small face in a
    corner calibrate to the crops' own box (counted, the four would have left it unagreed)."""
    half_resolution = load_dataset(shared_faces / "celeba_10k", limit=16).paths  # 89 x 109
    np.testing.assert_allclose(calibrate_face_box(half_resolution), (0.24, 0.38, 0.72, 0.82), atol=0.03)
    crops = load_dataset(shared_faces / "utkface", limit=10).paths
    small_faces = []
    for index, path in enumerate(crops[:4]):
        picture = Image.new("RGB", (200, 200), (90, 100, 110))
        picture.paste(Image.open(path).convert("RGB").resize((50, 50)), (120, 120))
        picture.save(tmp_path / f"{index}.png")
        small_faces.append(tmp_path / f"{index}.png")
    assert calibrate_face_box(list(crops) + small_faces) == calibrate_face_box(crops) is not None


def test_face_features_beat_imagenet_features_with_the_same_head(shared_faces, tmp_path):
    from featgender.cache import read_cache
    from featgender.extract import build_cache
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


def test_a_model_records_the_calibrated_face_box_of_its_dataset(dlib_model, shared_faces):
    from featgender.heads import load_model

    preprocessing = json.loads(load_model(dlib_model[0]).backbones[0]["preprocessing"])
    paths = load_dataset(shared_faces / "utkface", limit=300).paths
    assert preprocessing["face_box"] == list(calibrate_face_box(paths))


def test_a_group_photo_gives_one_prediction_per_face_with_its_box(dlib_model, group_photo, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    import featgender
    from featgender.cli import app

    model_path, paths, labels = dlib_model
    man, woman = paths[list(labels).index(1)], paths[list(labels).index(0)]
    Image.new("RGB", (400, 300), (200, 200, 200)).save(tmp_path / "wall.jpg")
    predictor = featgender.load(model_path)
    alone = {p.image: p for p in predictor.predict([man, woman], faces="crop")}
    faces = predictor.predict([group_photo, tmp_path / "wall.jpg"], all_faces=True)
    found = sorted((p for p in faces if p.box), key=lambda p: p.box[0])
    assert len(found) == 2 and len(faces) == 3
    assert found[0].box[2] < 360 < found[1].box[0]  # one face in each half
    assert [p.label for p in found] == [alone[str(man)].label, alone[str(woman)].label]
    wall = next(p for p in faces if p.image.endswith("wall.jpg"))
    assert wall.error == "no face found" and wall.label is None and wall.probability is None
    # dlib_resnet finds faces itself: 'auto' is photo mode, the largest face only
    assert len(predictor.predict([group_photo])) == 1
    result = CliRunner().invoke(
        app, ["predict", "--model", str(model_path), "--all-faces", str(group_photo), str(tmp_path / "wall.jpg")]
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "box=" in line]
    assert len(lines) == 2 and "1 of 2 images: no face found" in result.stderr


def test_by_default_each_image_is_routed_as_a_crop_or_a_photo_and_says_which(dlib_model, group_photo, tmp_path):
    """On a face-finding model, 'auto' takes crops whole (as --faces crop: same P(male) where
    the face is in the folder's box) and finds the faces of larger pictures first (as --faces
    photo); each prediction says which."""
    from typer.testing import CliRunner

    import featgender
    from featgender.cli import app
    from featgender.faces.route import CROP_MAX_SIDE, is_photo_sized

    model_path, paths, _ = dlib_model
    Image.new("RGB", (800, 600), (200, 200, 200)).save(tmp_path / "wall.jpg")
    tight = tmp_path / "tight.jpg"  # the face fills the frame: HOG misses it
    Image.open(paths[0]).convert("RGB").crop((40, 40, 160, 160)).resize((224, 224)).save(tight, quality=95)
    images = [*paths[:6], tight, group_photo, tmp_path / "wall.jpg"]
    assert [is_photo_sized(image) for image in images] == [False] * 7 + [True] * 2
    assert not is_photo_sized(Image.new("RGB", (CROP_MAX_SIDE, 300))) and not is_photo_sized(tmp_path / "absent.jpg")
    predictor = featgender.load(model_path)
    auto = predictor.predict(images)
    crop = predictor.predict(images[:7], faces="crop")
    photo = predictor.predict(images[7:], faces="photo")
    assert [p.route for p in auto] == ["crop"] * 7 + ["photo"] * 2 and [p.image for p in auto] == list(map(str, images))
    assert [p.probability for p in auto[:6]] == pytest.approx([p.probability for p in crop[:6]], abs=1e-6)
    # the tight crop's face is not in the box calibrated on the others: its face is found, and fills it
    assert auto[6].label == crop[6].label and auto[6].probability == pytest.approx(crop[6].probability, abs=0.05)
    assert auto[7].box == photo[0].box and auto[7].probability == pytest.approx(photo[0].probability, abs=1e-6)
    assert auto[8].error == "no face found" and auto[8].label is None
    assert all(p.box is None and p.label for p in auto[:7])
    assert {p.route for p in predictor.predict(images[:3], all_faces=True)} == {"photo"}
    result = CliRunner().invoke(app, ["predict", "--model", str(model_path), str(tight), str(group_photo)])
    assert result.exit_code == 0, result.output
    tight_line, group_line = [line for line in result.stdout.splitlines() if "\t" in line]
    assert tight_line.split("\t")[3] == "crop" and group_line.split("\t")[3] == "photo" and "box=" in group_line


def test_evaluate_data_routes_each_image_as_predict_does(dlib_model, boxed_portraits, tmp_path):
    """``evaluate --data`` scores what ``predict`` would: the off-box portraits' faces found,
    not aligned in the folder's box (one route for every door)."""
    import csv

    import featgender
    from featgender.evaluate import evaluate_images

    model_path, paths, truth = dlib_model
    portraits, _ = boxed_portraits
    labels = [int(truth[index % len(paths)]) for index in range(len(portraits))]  # as the fixture pastes them
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "gender", "split"])
        for path, label in zip(portraits, labels, strict=True):
            writer.writerow([str(path), ("female", "male")[label], "test"])
    predictor = featgender.load(model_path)
    for faces in ("auto", "crop"):
        predicted = [p.probability for p in predictor.predict(portraits, faces=faces)]
        evaluated = evaluate_images(model_path, tmp_path, faces=faces, progress=False)
        scores = np.array(evaluated["_curves"]["scores"])
        assert scores == pytest.approx(np.array(predicted), abs=1e-6), faces


def test_a_picture_whose_face_is_off_the_folders_box_is_not_taken_as_a_crop(dlib_model, boxed_portraits):
    """Portraits framed alike but for a few: a box is calibrated for the folder, and the
    pictures whose face is in it go the crop way (as --faces crop: same P(male)); the few framed
    otherwise are not aligned in that box: their faces are found (as --faces photo: same
    P(male)). Where a third are framed otherwise, no box is calibrated at all."""
    import featgender
    from featgender.faces.route import CROP_FACE_FRACTION

    model_path, _, _ = dlib_model
    portraits, in_box = boxed_portraits
    predictor = featgender.load(model_path)
    box = predictor.face_box_for(portraits)
    assert box is not None and box[2] - box[0] >= CROP_FACE_FRACTION  # the folder's faces fill one place
    auto, crop, photo = (predictor.predict(portraits, faces=faces) for faces in ("auto", "crop", "photo"))
    assert [p.route for p in auto[:in_box]] == ["crop"] * in_box and all(p.box is None for p in auto[:in_box])
    assert [p.probability for p in auto[:in_box]] == pytest.approx([p.probability for p in crop[:in_box]], abs=1e-6)
    off_box = auto[in_box:]
    assert [p.probability for p in off_box] == pytest.approx([p.probability for p in photo[in_box:]], abs=1e-4)
    # the crop way would have aligned them elsewhere: another chip, another P(male)
    assert all(abs(a.probability - c.probability) > 1e-3 for a, c in zip(off_box, crop[in_box:], strict=True))
    # framed otherwise a third of the time, a folder has no one box: every face is found
    mixed = portraits[in_box - 8 :]
    assert predictor.face_box_for(mixed) is None
    assert {p.route for p in predictor.predict(mixed)} == {"photo", "crop"}
    assert [p.probability for p in predictor.predict(mixed)] == pytest.approx(
        [p.probability for p in predictor.predict(mixed, faces="photo")], abs=1e-4
    )


def test_the_aligners_check_passes_faces_in_their_box_and_fails_faces_elsewhere(shared_faces):
    """The check behind the crop route, on real crops: UTKFace's faces in the box calibrated
    for them pass; the same faces moved a third of the picture off it, or shrunk into a
    corner (nothing but background left in the box), fail with OFF_BOX."""
    from PIL import ImageFilter

    from featgender.faces.align import OFF_BOX

    paths = load_dataset(shared_faces / "utkface", limit=60).paths[:30]
    box = calibrate_face_box(paths)
    aligner = FaceAligner(str(dlib_model_file("landmarks")), box=box, check=True)
    passed, moved_off, cornered = 0, 0, 0
    for path in paths:
        face = Image.open(path).convert("RGB")
        background = face.filter(ImageFilter.GaussianBlur(20))
        moved, corner = background.copy(), background.copy()
        moved.paste(face, (face.width // 3, face.height // 3))
        corner.paste(face.resize((face.width // 2, face.height // 2)), (0, 0))
        outcomes = []
        for picture in (face, moved, corner):
            try:
                aligner.chip(np.asarray(picture))
                outcomes.append(True)
            except FeatgenderError as error:
                assert str(error) == OFF_BOX
                outcomes.append(False)
        passed += outcomes[0]
        moved_off += not outcomes[1]
        cornered += not outcomes[2]
    assert passed >= 29 and moved_off >= 27 and cornered >= 27, (passed, moved_off, cornered)


def test_where_small_pictures_frame_faces_differently_the_face_found_decides(dlib_model, tmp_path, monkeypatch):
    """Crop-sized pictures whose faces do not sit at one place: each is a crop when its face
    fills it (or none is found: the central box, as --faces crop), a photo when its face is
    small (boxed, as --faces photo)."""
    import featgender

    model_path, paths, labels = dlib_model
    portrait = tmp_path / "portrait.jpg"  # a 120 px face in a 500 x 400 scene: HOG's box spans 0.3 of it
    scene = Image.new("RGB", (500, 400), (120, 110, 100))
    scene.paste(Image.open(paths[0]).convert("RGB").resize((120, 120)), (300, 200))
    scene.save(portrait, quality=95)
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 200), (128, 128, 128)).save(blank)
    shifted = []
    for index, path in enumerate(paths[1:7]):  # crops whose faces move about: a corner, then the middle
        canvas = Image.new("RGB", (300, 300), (100, 100, 100))
        canvas.paste(Image.open(path).convert("RGB").resize((220, 220)), (80 * (index % 2), 80 * (index % 2)))
        shifted.append(tmp_path / f"shifted{index}.jpg")
        canvas.save(shifted[-1], quality=95)
    predictor = featgender.load(model_path)
    assert predictor.face_box_for(shifted + [portrait, blank]) is None  # the faces move: no fixed box
    auto = predictor.predict(shifted + [portrait, blank])
    assert [p.route for p in auto] == ["crop"] * 6 + ["photo", "crop"]
    assert auto[6].box is not None and all(p.box is None for p in auto[:6] + auto[7:])
    assert auto[6].label == predictor.predict([portrait], faces="photo")[0].label
    assert auto[7].label is not None and not auto[7].error  # a crop where nothing is found: the central box
    crop = predictor.predict(shifted, faces="crop")
    np.testing.assert_allclose([p.probability for p in auto[:6]], [p.probability for p in crop], atol=0.05)
    assert [p.label for p in auto[:6]] == [p.label for p in crop]
    assert np.mean([p.label == ("female", "male")[y] for p, y in zip(auto[:6], labels[1:7], strict=True)]) >= 0.8
    monkeypatch.setattr("featgender.predictor.FACE_STEP_CHUNK", 3)  # a large folder goes a chunk at a time
    chunked = predictor.predict(shifted + [portrait, blank])
    assert [(p.image, p.route, p.box, p.label) for p in chunked] == [(p.image, p.route, p.box, p.label) for p in auto]
    np.testing.assert_allclose([p.probability for p in chunked], [p.probability for p in auto], atol=1e-5)


def test_photo_datasets_go_through_the_face_step(shared_faces, tmp_path):
    from conftest import photo_dataset

    from featgender.cache import read_cache, read_metadata
    from featgender.extract import extract_to_cache

    utk = load_dataset(shared_faces / "utkface", limit=100)
    photo_dataset(tmp_path, utk.paths[:6], utk.labels[:6], size=(800, 600), step=(90, 50), empty=2)
    result = extract_to_cache(
        tmp_path / "photos.csv",
        backbone="dlib_resnet",
        faces="photo",
        out=tmp_path / "photos.h5",
        progress=False,
        workers=0,
    )
    assert result.num_failed == 2
    with h5py.File(result.path) as h5:
        assert h5["failed/ids"].asstr()[:].tolist() == ["empty0.jpg", "empty1.jpg"]
        assert set(h5["failed/reasons"].asstr()[:]) == {"no face found"}
    assert len(read_cache(result.path).ids) == 6  # faceless photos stay out of training and metrics
    assert "face_step" in json.loads(read_metadata(result.path)["preprocessing"])
    # the face found in a photo embeds like the crop it came from
    crops, _ = extract_features(build_backbone("dlib_resnet"), utk.paths[:6], workers=0, progress=False)
    found = read_cache(result.path, include_failed=True).features[:6]
    cosine = (found * crops).sum(1) / np.linalg.norm(found, axis=1) / np.linalg.norm(crops, axis=1)
    assert cosine.min() > 0.95


def test_crops_framed_unlike_the_training_data_are_aligned_where_their_faces_are(dlib_model, tmp_path):
    """A model trained on one dataset's crops, given crops framed otherwise (as another
    dataset frames them): predict finds where those faces sit, as extract does for a dataset."""
    from PIL import Image

    import featgender
    from featgender.heads import load_model

    model_path, paths, labels = dlib_model
    reframed = []
    for path in paths:  # the same faces, smaller and off-centre on a wider canvas
        canvas = Image.new("RGB", (420, 320), (120, 110, 100))
        canvas.paste(Image.open(path).convert("RGB").resize((150, 150)), (250, 160))
        reframed.append(tmp_path / path.name)
        canvas.save(reframed[-1], quality=95)
    original = [p.probability for p in featgender.load(model_path).predict(paths, faces="crop")]
    found = [p.probability for p in featgender.load(model_path).predict(reframed, faces="crop")]
    training_box = ",".join(map(str, json.loads(load_model(model_path).backbones[0]["preprocessing"])["face_box"]))
    stale = [p.probability for p in featgender.load(model_path, face_box=training_box).predict(reframed, faces="crop")]
    detected = [p.probability for p in featgender.load(model_path, face_box="detect").predict(reframed, faces="crop")]
    gap = {
        name: np.abs(np.subtract(original, values))
        for name, values in (("found", found), ("stale", stale), ("detected", detected))
    }
    assert np.median(gap["found"]) < 0.02 and np.median(gap["detected"]) < 0.02
    assert np.median(gap["stale"]) > 10 * np.median(gap["found"])  # what predict did before
    accuracy = {
        name: float(np.mean((np.array(values) >= 0.5) == labels))
        for name, values in (("original", original), ("found", found), ("stale", stale))
    }
    assert accuracy["found"] >= accuracy["original"] - 0.05 > accuracy["stale"] + 0.1
    with pytest.raises(FeatgenderError, match="--face-box 'middle'"):
        featgender.load(model_path, face_box="middle")


def test_loader_workers_detect_faces_after_this_process_ran_dlibs_cnn(tmp_path):
    """dlib's CNN detector, run here first (a photo in predict or the web app), must not hang
    the loader workers forked afterwards that detect with it (its thread pool did)."""
    import os
    import subprocess
    import sys

    script = (
        "from PIL import Image\n"
        "from featgender.backbones import build_backbone\n"
        "from featgender.embed import extract_features\n"
        "from featgender.faces import default_detector, find_faces\n"
        "blank = Image.new('RGB', (300, 300), (100, 100, 100))\n"
        "assert find_faces(blank, default_detector()) == []  # HOG missed: the CNN ran in this process\n"
        "features, errors = extract_features(build_backbone('dlib_resnet'), [blank] * 4, workers=2, progress=False)\n"
        "print(len(errors), sum(map(bool, errors)))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "DLIB_NUM_THREADS"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["4", "0"]  # central-box chips of the face crops
