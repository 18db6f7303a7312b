"""``featgender compare``: two models face by face, McNemar's exact test and a paired CI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featgender.backbones import build_backbone
from featgender.cli import app
from featgender.compare import compare_images, comparison_markdown
from featgender.data import load_dataset
from featgender.evaluate import evaluate_images
from featgender.extract import build_cache
from featgender.metrics import mcnemar_exact, paired_comparison
from featgender.training import train_head


def test_mcnemar_exact_is_the_two_sided_binomial_tail_of_the_discordant_faces():
    from scipy.stats import binomtest

    assert mcnemar_exact(0, 10) == 2 / 2**10
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    for first, second in [(7, 20), (20, 7), (1, 9), (40, 61), (0, 1)]:
        assert mcnemar_exact(first, second) == pytest.approx(binomtest(first, first + second, 0.5).pvalue)


def test_a_paired_comparison_counts_the_faces_only_one_model_gets_right_overall_and_per_cell(csv_dataset):
    rows = load_dataset(csv_dataset)  # 40 faces: odd rows men, races white, black, asian, indian in turn
    first = rows.labels.astype(int)
    second = first.copy()
    second[:6] = 1 - second[:6]  # wrong on white women 0 and 4, black men 1 and 5, asian women 2, indian men 3
    second[10] = 1 - second[10]  # asian women
    first[11] = 1 - first[11]  # indian men: there the first is wrong where the second is right
    result = paired_comparison(rows, first, second, ["race"])
    assert result["accuracy"] == [39 / 40, 33 / 40] and result["difference"] == pytest.approx(-6 / 40)
    assert (result["only_first_right"], result["only_second_right"]) == (7, 1)
    assert result["p_value"] == pytest.approx(2 * (1 + 8) / 2**8)
    low, high = result["difference_ci95"]
    assert low < -6 / 40 < high < 0  # the same faces resampled for both: the loss is not chance
    cells = {(cell["group"], cell["gender"]): cell for cell in result["group_gender"]["race"]}
    assert cells["white", "women"]["errors"] == [0, 2] and cells["white", "women"]["p_value"] == pytest.approx(0.5)
    assert cells["black", "men"]["errors"] == cells["asian", "women"]["errors"] == [0, 2]
    assert cells["indian", "men"]["errors"] == [1, 1] and cells["indian", "men"]["p_value"] == 1.0
    assert sum(cell["n"] for cell in cells.values()) == 40
    assert paired_comparison(rows, first, first, ["race"])["p_value"] == 1.0


def test_two_real_heads_compare_on_a_datasets_images_as_evaluate_scores_each(csv_dataset, tmp_path):
    dataset = load_dataset(csv_dataset)
    models = []
    for name in ("mobilenet_v3_small", "resnet18"):
        cache, model = tmp_path / f"{name}.h5", tmp_path / f"{name}.joblib"
        build_cache(dataset, build_backbone(name, weights="none"), cache, dtype="float32", progress=False)
        train_head(cache, "logreg", eval_split=None, out=model)
        models.append(model)
    dataset.paths[int(np.flatnonzero(dataset.splits == 2)[0])].write_text("no image")  # fails for both
    result = compare_images(*models, csv_dataset, split="test", progress=False)
    each = [evaluate_images(model, csv_dataset, count_failed=True, progress=False) for model in models]
    assert result["accuracy"] == [evaluation["accuracy"] for evaluation in each]
    assert result["failed"] == [1, 1] and result["n"] == each[0]["n"] == 4
    assert result["only_second_right"] - result["only_first_right"] == round(4 * result["difference"])
    assert set(result["group_gender"]) == {"age", "race"}
    text = comparison_markdown(result)
    assert "mobilenet_v3_small.joblib" in text and "McNemar exact p" in text and "| race | gender |" in text

    runner = CliRunner()
    both = ["compare", "-m", str(models[0]), "-m", str(models[1]), "--data", str(csv_dataset)]
    printed = runner.invoke(app, both)
    assert printed.exit_code == 0 and "McNemar exact p" in printed.stdout, printed.output
    assert json.loads(runner.invoke(app, [*both, "--json"]).stdout)["accuracy"] == result["accuracy"]
    alone = runner.invoke(app, both[:3] + both[5:])
    assert alone.exit_code != 0 and "compare: give --model twice (got 1)" in alone.output


def test_two_heads_compare_on_their_cache_as_evaluate_scores_each_and_other_features_are_refused(csv_dataset, tmp_path):
    from featgender.compare import compare_caches
    from featgender.errors import FeatgenderError
    from featgender.evaluate import evaluate_model

    dataset = load_dataset(csv_dataset)
    caches = {name: tmp_path / f"{name}.h5" for name in ("mobilenet_v3_small", "resnet18")}
    for name, cache in caches.items():
        build_cache(dataset, build_backbone(name, weights="none"), cache, dtype="float32", progress=False)
    heads = [tmp_path / f"{head}.joblib" for head in ("logreg", "svm")]
    for head, out in zip(("logreg", "svm"), heads, strict=True):
        train_head(caches["mobilenet_v3_small"], head, eval_split=None, out=out)
    result = compare_caches(*heads, caches["mobilenet_v3_small"], split="valid")
    each = [evaluate_model(head, caches["mobilenet_v3_small"], split="valid") for head in heads]
    assert result["accuracy"] == [evaluation["accuracy"] for evaluation in each] and result["n"] == each[0]["n"]
    assert result["failed"] == [0, 0] and result["data"] == str(caches["mobilenet_v3_small"])
    with pytest.raises(FeatgenderError, match=r"--model .*logreg.joblib: cache of resnet18 does not match the model's"):
        compare_caches(*heads, caches["resnet18"])

    runner = CliRunner()
    both = ["compare", "-m", str(heads[0]), "-m", str(heads[1])]
    printed = runner.invoke(app, [*both, "--cache", str(caches["mobilenet_v3_small"]), "--split", "valid", "--json"])
    assert printed.exit_code == 0 and json.loads(printed.stdout)["accuracy"] == result["accuracy"], printed.output
    neither = runner.invoke(app, both)
    assert neither.exit_code != 0 and "give --data (both models on its images) or --cache" in neither.output
    misplaced = runner.invoke(app, [*both, "--cache", str(caches["resnet18"]), "--faces", "crop"])
    assert misplaced.exit_code != 0 and "--faces: only with --data" in misplaced.output
