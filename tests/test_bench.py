import json

import pytest
from PIL import Image

from featgender.bench import run_bench, timed
from featgender.errors import FeatgenderError


def test_timed_excludes_the_warm_up_and_reports_spread():
    calls = []
    timing = timed(lambda: calls.append(1), repeats=3)
    assert len(calls) == 4 and timing["runs"] == 3
    assert timing["min_s"] <= timing["median_s"] <= timing["max_s"]


def test_bench_json_has_every_stage(csv_dataset, tmp_path):
    results = run_bench(
        csv_dataset,
        backbones=["mobilenet_v3_small"],
        heads=["logreg"],
        finetune=True,
        weights="none",
        repeats=1,
        sample=8,
        out=tmp_path / "bench",
    )
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    stages = written["backbones"][0]["stages"]
    assert set(stages) == {"decode", "preprocess", "forward", "extract_to_cache"}
    assert all(stage["images_per_s"] > 0 for stage in stages.values())
    head = written["heads"][0]
    assert head["head"] == "logreg" and head["fit_s"] > 0 and head["predict_ms_per_image"] > 0
    assert 0 <= head["test_accuracy"] <= 1 and head["cpu_peak_mb"] > 0
    assert set(head["worst_group_gender"]) == {"age", "race"}  # the worst cell of each (none of 10 faces here)
    assert written["finetune"]["s_per_epoch"] > 0 and written["finetune"]["epochs"] == 1
    assert set(written["finetune"]["worst_group_gender"]) == {"age", "race"}  # frozen and fine-tuned side by side
    assert written["machine"]["cores"] >= 1 and "torch" in written["machine"]
    assert "| mobilenet_v3_small | logreg |" in (tmp_path / "bench" / "results.md").read_text()
    assert Image.open(tmp_path / "bench" / "accuracy_vs_cost.png").size[0] > 100
    assert results["images"] == 40


def test_bench_trains_heads_on_several_datasets_and_reports_each(csv_dataset, celeba_official):
    results = run_bench(
        [csv_dataset, celeba_official],
        backbones=["mobilenet_v3_small"],
        heads=["logreg"],
        balance="dataset,gender",
        weights="none",
        repeats=1,
        sample=8,
    )
    assert results["images"] == 70 and results["backbones"][0]["stages"]["extract_to_cache"]["images"] == 70
    head = results["heads"][0]
    assert head["test_images"] == 4 + 6  # both test splits, pooled
    assert set(head["datasets_test_accuracy"]) == {"csvset", "celeba"}
    pooled = (head["datasets_test_accuracy"]["csvset"] * 4 + head["datasets_test_accuracy"]["celeba"] * 6) / 10
    assert head["test_accuracy"] == pytest.approx(pooled)
    assert set(head["worst_group_gender"]["csvset"]) == {"age", "race"}


def test_a_report_folder_no_file_can_take_is_refused_before_the_bench(csv_dataset, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FeatgenderError, match="--out .*a_file: is a file; name a folder"):
        run_bench(csv_dataset, backbones=["no_such_backbone"], out=tmp_path / "a_file")  # refused before the name
