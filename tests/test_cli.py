import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from featgender.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def test_every_command_has_help_text():
    commands = app.registered_commands
    assert {c.callback.__name__ for c in commands} >= {
        "extract",
        "info",
        "backbones",
        "download",
        "demo",
        "fit",
        "evaluate",
        "predict",
        "finetune",
        "bench",
        "serve",
        "export",
    }
    for command in commands:
        result = invoke(command.callback.__name__, "--help")
        assert result.exit_code == 0, result.output
        assert command.callback.__doc__.split("\n")[0][:30] in " ".join(result.output.split())


def test_the_command_list_shows_each_summary_unbroken():
    """Rich keeps a docstring's source line breaks in `--help`'s command list unless they are undone."""
    lines = runner.invoke(app, ["--help"], env={"COLUMNS": "1000"}).output.splitlines()
    for command in app.registered_commands:
        summary = " ".join(command.callback.__doc__.split("\n\n")[0].split())
        assert any(summary in line for line in lines), command.callback.__name__


def test_cli_py_at_the_root_of_a_checkout_runs_the_same_app(csv_dataset, tmp_path):
    """``python cli.py`` (the layout's entry beside featgender/) is the installed command."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "c.h5"
    invoke("extract", "--data", csv_dataset, "--backbone", "mobilenet_v3_small", "--weights", "none", "--out", out)
    through_file = subprocess.run(
        [sys.executable, "cli.py", "info", str(out), "--json"], cwd=root, capture_output=True, text=True
    )
    assert through_file.returncode == 0, through_file.stderr
    assert json.loads(through_file.stdout) == json.loads(invoke("info", out, "--json").output)
    missing = subprocess.run(
        [sys.executable, "cli.py", "info", str(tmp_path / "none.h5")], cwd=root, capture_output=True, text=True
    )
    assert missing.returncode == 1 and "none.h5: no such cache file" in missing.stderr.splitlines()[-1]


def test_extract_then_info(csv_dataset, tmp_path):
    out = tmp_path / "c.h5"
    args = (
        "extract",
        "--data",
        csv_dataset,
        "--backbone",
        "mobilenet_v3_small",
        "--weights",
        "none",
        "--out",
        out,
        "--batch-size",
        "4",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "40 images, 0 failed" in result.output
    with h5py.File(out, "r") as h5:
        assert h5["features"].shape == (40, 576)
    again = invoke(*args)
    assert "already complete" in again.output
    info = invoke("info", out)
    assert "split train: 32 images, 16 male" in info.output
    summary = json.loads(invoke("info", out, "--json").output)
    assert summary["backbone"] == "mobilenet_v3_small" and summary["features_shape"] == [40, 576]


def test_extract_default_path_goes_to_the_cache_folder(csv_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "extract", "--data", csv_dataset, "--backbone", "mobilenet_v3_small", "--weights", "none", "--limit", "10"
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "csvset-mobilenet_v3_small-limit10.h5").is_file()


def test_bad_input_is_a_one_line_error(tmp_path):
    result = invoke("extract", "--data", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: --data {tmp_path / 'nowhere'}: no such file or folder"]
    result = invoke("info", tmp_path / "missing.h5")
    assert result.exit_code == 1 and "missing.h5: no such cache file" in result.output


def test_backbones_lists_registry_and_offline_weights():
    result = invoke("backbones")
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert lines["efficientnet_lite0"][1:4] == ["1280", "224", "yes"]
    assert lines["resnet50"][1:3] == ["2048", "224"]


def test_download_without_network_says_which_files_to_place(tmp_path, monkeypatch):
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    result = invoke("download", "celeba", tmp_path)
    assert result.exit_code == 1
    assert "CelebA download failed" in result.output
    for name in ("img_align_celeba.zip", "list_attr_celeba.txt", "list_eval_partition.txt"):
        assert str(tmp_path / "celeba" / name) in result.output


def test_demo_on_real_faces(shared_faces, tmp_path, monkeypatch):
    """Two datasets, one head: dlib's network fine-tuned on them and frozen again to embed them,
    each dataset's test results with its race x gender table, and the saved model's path, ready
    for predict; rerun with a frozen backbone joined, the fine-tune and its caches are reused and
    the model holds both networks."""
    from featgender.heads import load_model

    monkeypatch.chdir(tmp_path)
    result = invoke(
        "demo", "--data", shared_faces / "utkface", "--data", shared_faces / "utkface_more", "--limit", "300"
    )
    assert result.exit_code == 0, result.output
    assert "fine-tuned: models/demo-dlib_resnet-ft-limit300.pt (best epoch" in result.output
    assert "cache: cache/demo-dlib_resnet-ft-limit300/utkface-dlib_resnet-limit300.h5 (created" in result.output
    saved = load_model("models/demo-dlib_resnet-logreg.joblib")
    assert (
        Path(saved.backbones[0]["weights_path"]) == (tmp_path / "models" / "demo-dlib_resnet-ft-limit300.pt").resolve()
    )
    assert "trained on 480 images" in result.output and "balanced by dataset, gender" in result.output
    assert "backbone dlib_resnet" in result.output
    for name in ("utkface", "utkface_more"):
        own = result.output.split(f"\n{name}, test (")[1]
        assert float(own.split("accuracy")[1].split()[0]) > 0.85
        assert "errors per race x gender (" in own and re.search(r"\n    black +women ", own)
    assert result.output.rstrip().endswith("model: models/demo-dlib_resnet-logreg.joblib")
    face = sorted((shared_faces / "utkface" / "images").iterdir())[0]
    predicted = invoke("predict", "--model", "models/demo-dlib_resnet-logreg.joblib", face)
    assert predicted.exit_code == 0 and predicted.output.split("\t")[1] in ("male", "female"), predicted.output

    joined = invoke(
        "demo", "--data", shared_faces / "utkface", "--data", shared_faces / "utkface_more", "--limit", "300",
        "--join", "efficientnet_lite0", "--C", "0.002",
    )  # fmt: skip
    assert joined.exit_code == 0, joined.output
    assert "cache: cache/utkface_more-efficientnet_lite0-limit300.h5 (created" in joined.output
    assert "cache: cache/demo-dlib_resnet-ft-limit300/utkface-dlib_resnet-limit300.h5 (up to date" in joined.output
    both = load_model("models/demo-dlib_resnet+efficientnet_lite0-logreg.joblib")
    assert [entry["backbone"] for entry in both.backbones] == ["dlib_resnet", "efficientnet_lite0"]
    assert both.params["C"] == 0.002 and both.backbones[0]["weights_path"] == saved.backbones[0]["weights_path"]
    assert float(joined.output.split("\nutkface, test (")[1].split("accuracy")[1].split()[0]) > 0.85
    predicted = invoke("predict", "--model", "models/demo-dlib_resnet+efficientnet_lite0-logreg.joblib", face)
    assert predicted.exit_code == 0 and predicted.output.split("\t")[1] in ("male", "female"), predicted.output


@pytest.mark.parametrize(
    "options, refusal",
    [
        (["--join", "efficientnet_lite9"], "--join 'efficientnet_lite9': unknown"),
        (["--join", "mobilenet_v3_small@nolayer"], "--join mobilenet_v3_small@nolayer: not a node or module"),
        (["--join", "resnet18", "--join", "resnet18@flatten"], "--join resnet18@flatten: given twice"),
        (["--backbone", "resnet18", "--join", "resnet18"], "--join resnet18: the demo's backbone already gives"),
        (["--head", "svn"], "--head 'svn': unknown"),
        (["--C", "0"], "--C 0.0: the regularisation C must be above 0"),
        (["--out", "."], ".: is a folder"),
    ],
)
def test_demo_refuses_a_bad_option_before_any_work(csv_dataset, tmp_path, monkeypatch, options, refusal):
    monkeypatch.chdir(tmp_path)
    result = invoke("demo", "--data", csv_dataset, *options, "--frozen")
    assert result.exit_code == 1 and f"Error: {refusal}" in result.output
    assert not (tmp_path / "models").exists() and not (tmp_path / "cache").exists()


def test_help_and_import_do_not_load_torch_until_a_name_is_used():
    script = (
        "import sys, featgender, featgender.cli; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules; "
        "from featgender.data import load_dataset; assert featgender.load_dataset is load_dataset; "
        "assert 'make_head' in dir(featgender) and featgender.make_head('logreg') is not None"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def head_model(csv_dataset, tmp_path):
    """A cache of csv_dataset (mobilenet_v3_small, random weights) and a logreg head fitted on it."""
    from featgender.backbones import build_backbone
    from featgender.data import load_dataset
    from featgender.extract import build_cache
    from featgender.training import train_head

    cache, model = tmp_path / "c.h5", tmp_path / "m.joblib"
    build_cache(load_dataset(csv_dataset), build_backbone("mobilenet_v3_small", weights="none"), cache, progress=False)
    train_head(cache, "logreg", eval_split=None, out=model)
    return cache, model


@pytest.fixture
def finetuned(csv_dataset, tmp_path):
    """A mobilenet_v3_small fine-tuned for one epoch on csv_dataset."""
    from featgender.finetune import finetune

    out = tmp_path / "ft.pt"
    finetune(
        csv_dataset,
        backbone="mobilenet_v3_small",
        weights="none",
        epochs=1,
        batch_size=8,
        workers=0,
        out=out,
        progress=False,
    )
    return out


def test_fit_command(head_model, tmp_path):
    cache, _ = head_model
    model = tmp_path / "fitted.joblib"
    fitted = invoke("fit", "--cache", cache, "--head", "logreg", "--out", model, "--json")
    assert fitted.exit_code == 0, fitted.output
    summary = json.loads(fitted.output)
    assert summary["training"]["images"] == 32 and summary["metrics"]["split"] == "valid"
    assert set(summary["metrics"]["ci95"]) >= {"accuracy", "roc_auc"} and model.is_file()


def test_fit_refuses_a_model_path_no_file_can_take_or_an_unknown_split_before_fitting(head_model, tmp_path):
    cache, _ = head_model
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a_file").write_text("")
    for out, why in ((folder, "is a folder"), (folder / "a_file" / "m.joblib", "cannot be written")):
        result = invoke("fit", "--cache", cache, "--head", "logreg", "--out", out)
        assert result.exit_code == 1 and f"Error: {out}: {why}" in result.output, result.output
        assert "accuracy" not in result.output  # refused before the fit
    assert [path.name for path in folder.iterdir()] == ["a_file"]
    unknown = invoke("fit", "--cache", cache, "--eval-split", "tset", "--out", folder / "m.joblib")
    assert unknown.exit_code == 1 and "Error: --eval-split 'tset': choose one of train, valid, test" in unknown.output


def test_evaluate_command_on_a_cache(head_model, tmp_path):
    cache, model = head_model
    evaluated = invoke("evaluate", "--model", model, "--cache", cache, "--report", tmp_path / "report")
    assert evaluated.exit_code == 0, evaluated.output
    assert "test (4 images)" in evaluated.output and "race: largest accuracy gap" in evaluated.output
    assert (tmp_path / "report" / "report.md").is_file()


def test_evaluate_command_on_images_with_a_finetuned_network(finetuned, csv_dataset, tmp_path):
    evaluated = invoke("evaluate", "--model", finetuned, "--data", csv_dataset, "--report", tmp_path / "report")
    assert evaluated.exit_code == 0, evaluated.output
    assert "test (4 images)" in evaluated.output and (tmp_path / "report" / "metrics.json").is_file()
    on_cache = invoke("evaluate", "--model", finetuned, "--cache", tmp_path / "c.h5")
    assert on_cache.exit_code == 1 and "a fine-tuned network, not a head" in on_cache.output
    both = invoke("evaluate", "--model", finetuned, "--cache", tmp_path / "c.h5", "--data", csv_dataset)
    assert both.exit_code == 1 and "give --cache" in both.output


def test_predict_command(head_model, finetuned, csv_dataset, tmp_path):
    _, model = head_model
    (csv_dataset / "images" / "bad.jpg").write_text("no image")
    predicted = invoke("predict", "--model", model, csv_dataset / "images", "--csv", tmp_path / "p.csv")
    assert predicted.exit_code == 0
    lines = [line for line in predicted.output.splitlines() if "\t" in line]
    assert len(lines) == 40 and all(line.split("\t")[1] in ("male", "female") for line in lines)
    assert "bad.jpg: error: UnidentifiedImageError" in predicted.output
    assert "1 of 41 images could not be read" in predicted.output
    assert (tmp_path / "p.csv").read_text().count("\n") == 41
    by_network = invoke("predict", "--model", finetuned, csv_dataset / "images" / "000.jpg")
    assert by_network.exit_code == 0 and by_network.output.split("\t")[1] in ("male", "female")


def test_fit_names_a_missing_cache(tmp_path):
    result = invoke("fit", "--cache", tmp_path / "missing.h5", "--head", "svm")
    assert result.exit_code == 1 and "missing.h5: no such cache file" in result.output


def test_finetune_command(csv_dataset, tmp_path):
    out = tmp_path / "ft.pt"
    options = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--epochs", "1", "--batch-size", "8"]
    result = invoke("finetune", "--data", csv_dataset, *options, "--workers", "0", "--out", out)
    assert result.exit_code == 0, result.output
    assert "epoch 1: train loss" in result.output and f"saved {out}" in result.output and out.is_file()
    assert "test (4 images)" in result.output


def test_bench_command_on_two_datasets(csv_dataset, celeba_official, tmp_path):
    bench = invoke(
        "bench",
        "--data",
        csv_dataset,
        "--data",
        celeba_official,
        "--balance",
        "dataset,gender",
        "--backbones",
        "mobilenet_v3_small",
        "--heads",
        "logreg",
        "--weights",
        "none",
        "--repeats",
        "1",
        "--out",
        tmp_path / "bench",
    )
    assert bench.exit_code == 0, bench.output
    assert "mobilenet_v3_small + logreg: accuracy" in bench.output
    report = (tmp_path / "bench" / "results.md").read_text()
    assert "balance: dataset,gender" in report and "; csvset " in report and "; celeba " in report


def test_serve_refuses_to_expose_the_page_without_a_password_or_a_port_that_is_none(tmp_path):
    exposed = invoke("serve", "--model", tmp_path / "m.joblib", "--host", "0.0.0.0")
    assert exposed.exit_code == 1 and "give --auth USER:PASSWORD" in exposed.output
    malformed = invoke("serve", "--model", tmp_path / "m.joblib", "--auth", "nopassword")
    assert malformed.exit_code == 1 and "Error: --auth: want USER:PASSWORD" in malformed.output
    no_port = invoke("serve", "--model", tmp_path / "m.joblib", "--port", "-5")
    assert no_port.exit_code == 2 and "Invalid value for '--port'" in no_port.output
    assert not list(tmp_path.iterdir())


def test_demo_joins_one_network_at_two_layers_from_one_pass(csv_dataset, tmp_path, monkeypatch):
    """``--join NAME@LAYER``: another layer of a network, extracted in the same pass as its
    others (one extraction per network and dataset), the demo's own frozen backbone among them;
    each layer its own cache and block."""
    import featgender.demo
    from featgender.demo import run_demo

    passes = []

    def counted(dataset, **options):
        passes.append((options["backbone"], options.get("layers")))
        return extract_layers(dataset, **options)

    extract_layers = featgender.demo.extract_layers
    monkeypatch.setattr(featgender.demo, "extract_layers", counted)
    result = run_demo(
        csv_dataset,
        backbone="resnet18",
        join=["mobilenet_v3_small", "resnet18@layer3"],
        fine_tune=False,
        weights="none",
        cache_dir=tmp_path / "cache",
        out=tmp_path / "m.joblib",
        progress=False,
    )
    assert passes == [("resnet18", ["flatten", "layer3"]), ("mobilenet_v3_small", None)]
    assert result["caches"][0].path.name == "csvset-resnet18.h5"
    assert [cache.path.name for cache in result["joined"][0]] == [
        "csvset-mobilenet_v3_small.h5",
        "csvset-resnet18@layer3.h5",
    ]
    assert [(entry["backbone"], entry["layer"]) for entry in result["model"].backbones] == [
        ("resnet18", "flatten"),
        ("mobilenet_v3_small", "flatten"),
        ("resnet18", "layer3"),
    ]
    assert result["model"].feature_dim == 512 + 576 + 256
