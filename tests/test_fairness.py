"""Errors per group x gender, and one head trained on several datasets with balancing weights."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featgender.backbones import build_backbone
from featgender.cache import CacheData
from featgender.cli import app
from featgender.data import load_dataset
from featgender.errors import FeatgenderError
from featgender.evaluate import evaluate_model
from featgender.extract import build_cache
from featgender.heads import load_model
from featgender.metrics import group_gender_errors, wilson_interval
from featgender.mixing import balance_weights, parse_balance, read_datasets
from featgender.training import train_head


def rows(labels, race, predicted_wrong, names=("black", "white")) -> tuple[CacheData, np.ndarray]:
    labels, race = np.array(labels), np.array(race)
    predicted = np.where(np.array(predicted_wrong, dtype=bool), 1 - labels, labels)
    data = CacheData(
        np.zeros((len(labels), 2), np.float32),
        labels,
        [str(i) for i in range(len(labels))],
        np.zeros(len(labels), np.int8),
        race[:, None],
        ["race"],
        {"race": list(names)},
        {},
    )
    return data, predicted


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)  # not [0, 0] at no error
    assert wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson_interval(49, 271) == pytest.approx([0.1396, 0.2310], abs=1e-3)


def test_cells_count_each_gender_called_the_other_per_group():
    #        black women (12, 3 wrong), black men (10, 1 wrong), white women (10, 0), white men (10, 2)
    labels = [0] * 12 + [1] * 10 + [0] * 10 + [1] * 10
    race = [0] * 22 + [1] * 20
    wrong = [1, 1, 1] + [0] * 9 + [1] + [0] * 9 + [0] * 10 + [1, 1] + [0] * 8
    failed = np.zeros(42, bool)
    failed[0] = True  # one black woman's face was not found (and counted wrong)
    data, predicted = rows(labels, race, wrong)
    table = group_gender_errors(data, predicted, failed=failed)["race"]
    cells = {(cell["group"], cell["gender"]): cell for cell in table["cells"]}
    assert [(cell["n"], cell["errors"], cell["failed"]) for cell in cells.values()] == [
        (12, 3, 1),
        (10, 1, 0),
        (10, 0, 0),
        (10, 2, 0),
    ]
    assert cells["black", "women"]["error_rate"] == 0.25
    assert cells["black", "women"]["ci95"] == wilson_interval(3, 12)
    assert table["worst"] == {"group": "black", "gender": "women", "n": 12, "error_rate": 0.25}
    assert table["error_gap"] == 0.25
    assert table["equalized_odds_gap"] == pytest.approx(0.25)  # women: 0.25 vs 0.0; men: 0.1 vs 0.2
    small = group_gender_errors(data, predicted, min_size=11)["race"]
    assert small["worst"]["n"] == 12 and small["equalized_odds_gap"] == 0.0  # one cell of 11+ faces
    with pytest.raises(FeatgenderError, match="--groups 'Pale_Skin'"):
        group_gender_errors(data, predicted, ["Pale_Skin"])


def test_balance_weights_give_every_cell_the_same_total():
    first, _ = rows([0] * 6 + [1] * 2, [0] * 8, [0] * 8)
    second, _ = rows([0] * 1 + [1] * 3, [0, 1, 0, 1], [0] * 4)
    datasets = [first, second]  # rows with labels and attributes, as a dataset's split or a cache's
    assert balance_weights(datasets, "none") is None and parse_balance("gender,dataset") == ["dataset", "gender"]
    for balance, cells in (("dataset", 2), ("dataset,gender", 4), ("gender", 2), ("dataset,gender,group", 5)):
        weights = balance_weights(datasets, balance)
        assert weights.mean() == pytest.approx(1.0)
        keys = parse_balance(balance)
        labels = np.concatenate([first.labels, second.labels])
        dataset = np.repeat([0, 1], [8, 4])
        group = np.concatenate([first.attributes[:, 0], second.attributes[:, 0]])
        cell = np.stack([{"dataset": dataset, "gender": labels, "group": group}[key] for key in keys], 1)
        totals = [weights[(cell == value).all(1)].sum() for value in np.unique(cell, axis=0)]
        assert len(totals) == cells and np.allclose(totals, 12 / cells), balance
    with pytest.raises(FeatgenderError, match="--balance 'race'.*dataset, gender, group"):
        parse_balance("race")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two small CSV datasets (40 and 24 faces, race columns) and their mobilenet caches."""
    from conftest import write_images

    root = tmp_path_factory.mktemp("mix")
    caches = []
    for name, count, seed in (("first", 40, 7), ("second", 24, 8)):
        folder = root / name
        labels = [i % 2 for i in range(count)]
        write_images(folder, [f"images/{i:03d}.jpg" for i in range(count)], labels, seed=seed)
        lines = ["image,gender,race"] + [
            f"images/{i:03d}.jpg,{'male' if label else 'female'},{['white', 'black'][i % 3 == 0]}"
            for i, label in enumerate(labels)
        ]
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")
        caches.append(root / f"{name}.h5")
        build_cache(
            load_dataset(folder), build_backbone("mobilenet_v3_small", weights="none"), caches[-1], progress=False
        )
    return root, caches


def test_a_head_trained_on_two_datasets_is_evaluated_on_each(two_datasets):
    root, caches = two_datasets
    model, evaluation = train_head(
        caches[0], "logreg", stack=[caches[1]], balance="dataset,gender", eval_split="test", out=root / "mix.joblib"
    )
    alone = [read_datasets([[cache]], "train")[0].rows for cache in caches]
    assert model.training["images"] == sum(len(data.labels) for data in alone)
    assert [d["name"] for d in model.training["datasets"]] == ["first", "second"]
    assert model.training["balance"] == ["dataset", "gender"]
    assert set(evaluation["datasets"]) == {"first", "second"}
    for name, cache in zip(("first", "second"), caches, strict=True):
        own = evaluate_model(root / "mix.joblib", cache, split="test")  # the same as its own evaluation
        assert evaluation["datasets"][name]["accuracy"] == own["accuracy"]
        assert evaluation["datasets"][name]["group_gender"] == own["group_gender"]
    assert evaluation["n"] == sum(evaluation["datasets"][name]["n"] for name in ("first", "second"))
    assert load_model(root / "mix.joblib").metrics["datasets"]["second"]["n"] == evaluation["datasets"]["second"]["n"]
    unweighted, _ = train_head(caches[0], "logreg", stack=[caches[1]], eval_split=None)
    features = read_datasets([[caches[1]]], "test")[0].rows.features
    assert not np.allclose(unweighted.predict_proba(features), model.predict_proba(features))  # weights count


def test_stacking_refuses_other_features_and_the_same_dataset_twice(two_datasets, tmp_path):
    root, caches = two_datasets
    other = tmp_path / "resnet.h5"
    build_cache(load_dataset(root / "second"), build_backbone("resnet18", weights="none"), other, progress=False)
    with pytest.raises(FeatgenderError, match="resnet.h5: its features are not those of .*first.h5"):
        train_head(caches[0], "logreg", stack=[other])
    with pytest.raises(FeatgenderError, match="the same dataset is given twice"):
        train_head(caches[0], "logreg", stack=[caches[0]])


def test_fit_stack_prints_each_dataset_and_its_group_gender_table(two_datasets, tmp_path):
    root, caches = two_datasets
    result = CliRunner().invoke(
        app,
        [
            "fit",
            "--cache",
            str(caches[0]),
            "--stack",
            str(caches[1]),
            "--balance",
            "dataset",
            "--eval-split",
            "test",
            "--out",
            str(tmp_path / "m.joblib"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "test (6 images of 2 datasets, pooled)" in result.output
    assert "first, test (4 images)" in result.output and "second, test (2 images)" in result.output
    lines = result.output.splitlines()
    table = lines.index(next(line for line in lines if line.startswith("  errors per race x gender")))
    assert lines[table + 1].split()[:2] in (["white", "women"], ["black", "women"])
    bad = CliRunner().invoke(app, ["fit", "--cache", str(caches[0]), "--balance", "race"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: --balance 'race'")


def test_the_report_has_the_group_gender_table_and_plot(two_datasets, tmp_path):
    root, caches = two_datasets
    train_head(caches[0], "logreg", eval_split=None, out=tmp_path / "m.joblib")
    result = evaluate_model(tmp_path / "m.joblib", caches[0], split="test", report=tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Errors per race x gender (no cell of 10 faces or more)" in report and "| white | women | 1 |" in report
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["group_gender"] == result["group_gender"]
    if pytest.importorskip("matplotlib"):
        from PIL import Image

        assert Image.open(tmp_path / "report" / "group_gender.png").size[0] > 100


def test_the_model_card_gives_the_mix_its_balance_and_each_datasets_errors(two_datasets):
    import featgender
    from featgender.app import model_card

    root, caches = two_datasets
    train_head(
        caches[0], "logreg", stack=[caches[1]], balance="dataset,gender", eval_split="test", out=root / "card.joblib"
    )
    card = model_card(featgender.load(root / "card.joblib"))
    assert "**Trained on** 52 images (train split of first (32) + second (20)); balanced by: dataset, gender." in card
    assert "**second**:" in card and "- errors per race x gender (" in card
