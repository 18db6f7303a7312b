"""dlib's CNN face detector in torch (featgender.faces.mmod) against dlib's own, on real faces
from ../shared (skips without dlib or ../shared)."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib")

from featgender.errors import FeatgenderError  # noqa: E402
from featgender.faces import dlib_model_file  # noqa: E402
from featgender.faces.mmod import MMODDetector, pyramid_tiles, read_mmod_model  # noqa: E402


@pytest.fixture(scope="module")
def detector():
    return MMODDetector()


@pytest.fixture(scope="module")
def real_pictures(shared_faces, group_photo):
    """Pictures of several kinds and sizes: CelebA's 178 x 218 aligned faces, UTKFace's 200 x 200
    crops, the same cut tight (the face fills the frame), a two-face photo, a portrait in a
    larger scene, and a picture of no face."""
    celeba = sorted((shared_faces / "celeba_15k" / "img_align_celeba").glob("*.jpg"))[:8]
    utk = sorted((shared_faces / "utkface" / "images").glob("*.jpg"))[:8]
    pictures = [np.asarray(Image.open(path).convert("RGB")) for path in celeba + utk]
    pictures += [
        np.asarray(Image.open(path).convert("RGB").crop((40, 40, 160, 160)).resize((224, 224))) for path in utk
    ]
    pictures.append(np.asarray(Image.open(group_photo).convert("RGB")))
    scene = Image.open(utk[0]).convert("RGB").resize((480, 640))
    scene.paste(Image.open(utk[1]).convert("RGB").resize((180, 180)), (150, 200))
    pictures.append(np.asarray(scene))
    pictures.append(np.full((300, 400, 3), 128, dtype=np.uint8))
    return [np.ascontiguousarray(picture) for picture in pictures]


def dlib_detections(pictures):
    import dlib

    net = dlib.cnn_face_detection_model_v1(str(dlib_model_file("cnn_detector")))
    return [
        [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence) for d in net(picture, 0)]
        for picture in pictures
    ]


def test_same_boxes_and_scores_as_dlibs_own_detector(detector, real_pictures):
    ours = detector.detect(real_pictures)
    theirs = dlib_detections(real_pictures)
    assert sum(map(len, theirs)) >= len(real_pictures) - 3  # faces found: the comparison is not of empty lists
    assert ours[-1] == [] and ours[-4] != []  # no face in the grey picture; the group photo's found
    assert len(ours[-3]) == 2
    for mine, reference in zip(ours, theirs, strict=True):
        assert len(mine) == len(reference)
        for (box, score), (their_box, their_score) in zip(
            sorted(mine, key=lambda found: found[0]), sorted(reference, key=lambda found: found[0]), strict=True
        ):
            assert max(abs(a - b) for a, b in zip(box, their_box, strict=True)) <= 1
            assert score == pytest.approx(their_score, abs=1e-3)


def test_a_batch_finds_what_each_picture_finds_alone(detector, real_pictures):
    same_size = [picture for picture in real_pictures if picture.shape == real_pictures[0].shape]
    assert len(same_size) >= 4
    batched = MMODDetector(batch_size=3).detect(same_size)
    alone = [detector.detect([picture])[0] for picture in same_size]
    for together, single in zip(batched, alone, strict=True):
        assert [box for box, _ in together] == [box for box, _ in single]
        np.testing.assert_allclose([s for _, s in together], [s for _, s in single], atol=1e-4)


def test_pictures_too_narrow_for_the_network_find_no_face_and_raise_nothing(detector):
    """Down to a pixel wide: the network is not run where its tiled picture would not outlast
    its strided layers (a 6-px-wide picture did, and crashed `predict` on a tiny image), nor
    dlib's own where it raises or corrupts its heap (under 10 px)."""
    import subprocess
    import sys

    pictures = [np.full((rows, cols, 3), 100, dtype=np.uint8) for rows in range(1, 16) for cols in (1, 6, 9, 10, 15)]
    assert detector.detect(pictures) == [[] for _ in pictures]
    torch_free = (  # dlib's own detector, where torch is not installed
        "import sys\nsys.modules['torch'] = None\nimport numpy as np\n"
        "from featgender.faces import dlib_model_file\nfrom featgender.faces.detect import cnn_detector\n"
        "detect = cnn_detector(str(dlib_model_file('cnn_detector')))\n"
        "sizes = [(rows, cols) for rows in range(1, 16) for cols in (1, 6, 9, 10, 15)]\n"
        "assert [detect(np.full((*size, 3), 100, dtype=np.uint8)) for size in sizes] == [[]] * len(sizes)\n"
    )
    done = subprocess.run([sys.executable, "-c", torch_free], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_tiled_pyramid_is_laid_out_as_dlibs():
    """dlib's layout of a 200 x 200 picture: the image and levels down a first column, 10 px
    apart and 11 px in, then the smaller ones back up beside them, right-aligned."""
    import math
    from itertools import combinations

    tiles, rows, cols = pyramid_tiles(200, 200)
    assert tiles[0] == (11, 11, 210, 210) and tiles[1] == (11, 221, 176, 386)  # floor(200 * 5 / 6) = 166
    assert (rows, cols) == (776, 222)
    heights = [bottom - top + 1 for _, top, _, bottom in tiles]
    assert heights == [200] + [math.floor(5 / 6 * h) for h in heights[:-1]] and min(heights) >= 5
    first_column = [tile for tile in tiles if tile[0] == 11]
    assert all(b[1] - a[3] == 11 for a, b in zip(first_column, first_column[1:], strict=False))
    beside = tiles[len(first_column) :]
    assert beside and all(right == 210 for _, _, right, _ in beside)
    for a, b in combinations(tiles, 2):  # no two tiles overlap
        assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_a_broken_detector_file_is_one_clear_error(tmp_path):
    data = dlib_model_file("cnn_detector").read_bytes()
    truncated = tmp_path / "mmod.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatgenderError, match="mmod.dat: not a dlib model file"):
        read_mmod_model(truncated)
    other = dlib_model_file("landmarks")  # a dlib file, of another kind
    with pytest.raises(FeatgenderError, match="not a dlib"):
        read_mmod_model(other)
    with pytest.raises(FeatgenderError, match="missing"):
        MMODDetector(tmp_path / "absent.dat").load()


def test_a_torch_free_install_finds_the_same_faces_with_dlibs_own_detector(shared_faces, tmp_path):
    """The face step where torch is not installed (an exported model on onnxruntime) runs
    dlib's CNN where this one runs ours: tight crops, where HOG misses and the CNN decides,
    give the same boxes within a pixel."""
    import json
    import subprocess
    import sys

    from featgender.faces import default_detector

    utk = sorted((shared_faces / "utkface" / "images").glob("*.jpg"))[:12]
    tight = []
    for index, path in enumerate(utk):
        tight.append(tmp_path / f"{index}.png")
        Image.open(path).convert("RGB").crop((45, 45, 155, 155)).resize((224, 224)).save(tight[-1])
    detector = default_detector()
    ours = [detector(np.asarray(Image.open(path))) for path in tight]
    script = (
        "import json, sys\nimport numpy as np\nfrom PIL import Image\n"
        "sys.modules['torch'] = None\n"
        "from featgender.faces import default_detector\n"
        "detector = default_detector()\n"
        f"print(json.dumps([detector(np.asarray(Image.open(p))) for p in {list(map(str, tight))!r}]))\n"
        "assert not [name for name, module in sys.modules.items() if module and name.split('.')[0] == 'torch']\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout)
    import dlib

    hog = dlib.get_frontal_face_detector()
    assert sum(not len(hog(np.asarray(Image.open(path)), 1)) for path in tight) >= 3  # the CNN decided there
    assert sum(map(bool, ours)) >= 10
    for mine, reference in zip(ours, theirs, strict=True):
        assert len(mine) == len(reference)
        for box, their_box in zip(mine, reference, strict=True):
            assert max(abs(a - b) for a, b in zip(box, their_box, strict=True)) <= 1


def test_the_face_step_runs_the_detector_on_the_predictors_device(real_pictures):
    import torch

    from featgender.faces.detect import cnn_detector

    detect = cnn_detector(str(dlib_model_file("cnn_detector")), "auto")
    assert isinstance(detect, MMODDetector)
    assert detect.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert detect(real_pictures[0]) == MMODDetector(device="cpu")(real_pictures[0])
