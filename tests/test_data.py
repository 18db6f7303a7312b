import numpy as np
import pytest
from conftest import CELEBA_ATTRIBUTES, celeba_rows

from featgender.data import SPLITS, FeatgenderError, detect_format, load_dataset, parse_label


def test_formats_are_detected(celeba_official, celeba_kaggle, folder_dataset, csv_dataset):
    assert detect_format(celeba_official) == "celeba"
    assert detect_format(celeba_official.parent) == "celeba"  # torchvision's ROOT/celeba
    assert detect_format(celeba_kaggle) == "celeba-kaggle"
    assert detect_format(folder_dataset) == "folder"
    assert detect_format(csv_dataset) == "csv"
    assert detect_format(csv_dataset / "labels.csv") == "csv"


def test_celeba_official_reads_labels_attributes_and_partitions(celeba_official):
    names, values, partitions = celeba_rows(30)
    dataset = load_dataset(celeba_official)
    assert dataset.image_ids == names
    assert dataset.attribute_names == CELEBA_ATTRIBUTES
    np.testing.assert_array_equal(dataset.attributes, (values > 0).astype(int))
    np.testing.assert_array_equal(dataset.labels, values[:, CELEBA_ATTRIBUTES.index("Male")] > 0)
    np.testing.assert_array_equal(dataset.splits, partitions)
    assert all(path.is_file() for path in dataset.paths)
    sample = next(iter(dataset))
    assert (sample.image_id, sample.label, sample.split) == ("000001.jpg", 0, "train")


def test_celeba_kaggle_layout_gives_the_same_rows(celeba_official, celeba_kaggle):
    official, kaggle = load_dataset(celeba_official), load_dataset(celeba_kaggle)
    assert kaggle.image_ids == official.image_ids
    np.testing.assert_array_equal(kaggle.attributes, official.attributes)
    np.testing.assert_array_equal(kaggle.splits, official.splits)
    assert all(path.is_file() for path in kaggle.paths)


def test_folder_layout_maps_class_words_and_assigns_a_seeded_split(folder_dataset):
    dataset = load_dataset(folder_dataset)
    assert len(dataset) == 40
    assert all(dataset.labels[i] == dataset.image_ids[i].startswith("Man/") for i in range(40))
    counts = np.bincount(dataset.splits, minlength=3)
    assert counts.tolist() == [32, 4, 4]
    for split in range(3):  # stratified: each split is half male
        assert dataset.labels[dataset.splits == split].mean() == 0.5
    again = load_dataset(folder_dataset)
    np.testing.assert_array_equal(again.splits, dataset.splits)
    assert "seed=0" in dataset.split_source
    assert not np.array_equal(load_dataset(folder_dataset, seed=1).splits, dataset.splits)


def test_folder_layout_with_split_folders(tmp_path):
    from conftest import write_images

    for split in ("train", "val", "test"):
        write_images(tmp_path / split, ["male/a.jpg", "female/b.png"], [1, 0])
    dataset = load_dataset(tmp_path)
    assert sorted(dataset.image_ids) == sorted(
        f"{s}/{c}" for s in ("train", "val", "test") for c in ("male/a.jpg", "female/b.png")
    )
    assert [SPLITS[s] for s in dataset.splits] == ["test", "test", "train", "train", "valid", "valid"]


def test_csv_layout_keeps_extra_columns_as_attributes(csv_dataset):
    dataset = load_dataset(csv_dataset)
    assert len(dataset) == 40 and dataset.labels.tolist() == [i % 2 for i in range(40)]
    assert dataset.attribute_names == ["age", "race"]
    assert dataset.attributes[:, 0].tolist() == list(range(20, 60))
    races = dataset.attribute_categories["race"]
    assert [races[code] for code in dataset.attributes[:4, 1]] == ["white", "black", "asian", "indian"]
    assert dataset.paths[0] == csv_dataset / "images" / "000.jpg"


def test_csv_columns_chosen_by_option_and_bad_labels_named(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "list.csv").write_text("picture,sex_code\nx.jpg,1\ny.jpg,-1\n")
    dataset = load_dataset(tmp_path / "list.csv", image_column="picture", label_column="sex_code")
    assert dataset.labels.tolist() == [1, 0]
    (tmp_path / "list.csv").write_text("image,gender\nx.jpg,male\ny.jpg,unknown\n")
    with pytest.raises(FeatgenderError, match=r"list.csv:3: label 'unknown'"):
        load_dataset(tmp_path)
    with pytest.raises(FeatgenderError, match="no column 'nope'"):
        load_dataset(tmp_path, image_column="nope")


def test_duplicate_ids_missing_labels_and_bad_celeba_rows_are_named(tmp_path, celeba_official):
    listing = tmp_path / "list.csv"
    listing.write_text("image,gender\nx.jpg,male\ny.jpg,female\nx.jpg,female\n")
    with pytest.raises(FeatgenderError, match=r"list.csv:4: image 'x.jpg' is listed again \(first at line 2\)"):
        load_dataset(listing)
    listing.write_text("image,gender\nx.jpg,male\ny.jpg,\n")
    with pytest.raises(FeatgenderError, match=r"list.csv:3: label ''"):
        load_dataset(listing)
    attr_file = celeba_official / "list_attr_celeba.txt"
    lines = attr_file.read_text().splitlines()
    male = lines[1].split().index("Male") + 1
    row = lines[4].split()
    row[male] = "0"
    attr_file.write_text("\n".join(lines[:4] + [" ".join(row)] + lines[5:]) + "\n")
    with pytest.raises(FeatgenderError, match=r"list_attr_celeba.txt:5: Male is 0, not -1 \(female\) or 1"):
        load_dataset(celeba_official)
    attr_file.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(FeatgenderError, match=rf"list_attr_celeba.txt:{len(lines) + 1}: image .* listed again"):
        load_dataset(celeba_official)


@pytest.mark.parametrize("value,label", [("Male", 1), ("f", 0), ("woman", 0), ("1", 1), ("-1", 0), ("0", 0)])
def test_parse_label(value, label):
    assert parse_label(value, "here") == label


def test_limit_is_stratified_seeded_and_keeps_file_order(csv_dataset):
    dataset = load_dataset(csv_dataset)
    subset = load_dataset(csv_dataset, limit=20)
    assert len(subset) == 20
    assert subset.labels.mean() == 0.5
    positions = [dataset.image_ids.index(image_id) for image_id in subset.image_ids]
    assert positions == sorted(positions)
    assert load_dataset(csv_dataset, limit=20).image_ids == subset.image_ids
    with pytest.raises(FeatgenderError, match="--limit 0"):
        load_dataset(csv_dataset, limit=0)


def test_unknown_data_is_refused_with_its_path(tmp_path):
    with pytest.raises(FeatgenderError, match="no such file"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(FeatgenderError, match="not a recognised dataset"):
        load_dataset(tmp_path)


def test_real_celeba_mini(shared_faces):
    dataset = load_dataset(shared_faces / "celeba_mini")
    assert dataset.format == "celeba" and len(dataset) == 100
    assert int(dataset.labels.sum()) == 42
    assert set(dataset.splits.tolist()) == {0}
    assert len(dataset.attribute_names) == 40 and dataset.attributes.shape == (100, 40)
    assert all(path.is_file() for path in dataset.paths)


def test_real_celeba_10k_identities_show_contradicting_labels(shared_faces):
    from featgender.data import read_identities
    from featgender.metrics import label_audit

    dataset = load_dataset(shared_faces / "celeba_10k")
    identities = read_identities(dataset.root, dataset.format)
    assert len(identities) == 10000 and len(set(identities.values())) == 5429
    audit = label_audit(dataset, dataset.labels, n_boot=10)
    assert (audit["conflicting_identities"], len(audit["conflicting_images"])) == (48, 142)
    assert audit["accuracy_consistent"] == 1.0  # the labels themselves, scored on the consistent rows


def test_real_utkface_csv(shared_faces):
    dataset = load_dataset(shared_faces / "utkface")
    assert len(dataset) == 8000 and int(dataset.labels.sum()) == 4000
    assert dataset.attribute_names == ["age", "race"]
    assert set(dataset.attribute_categories["race"]) == {"white", "black", "asian", "indian", "other"}
    assert dataset.paths[0].is_file()
    assert np.bincount(dataset.splits).tolist() == [6400, 800, 800]


def fairface_layout(root, train: int = 60, val: int = 20, absent: int = 5):
    """FairFace's own layout with generated images: label CSVs as published (file,age,gender,
    race,service_test), ``absent`` rows of each whose image is not here (a subset download)."""
    from conftest import face_image

    rng = np.random.default_rng(0)
    races = ["Black", "East Asian", "Indian", "Latino_Hispanic", "Middle Eastern", "Southeast Asian", "White"]
    ages = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
    for part, count in (("train", train), ("val", val)):
        (root / part).mkdir(parents=True, exist_ok=True)
        lines = ["file,age,gender,race,service_test"]
        for number in range(1, count + absent + 1):
            gender = ("Female", "Male")[number % 2]
            lines.append(f"{part}/{number}.jpg,{ages[number % 9]},{gender},{races[number % 7]},{number % 3 == 0}")
            if number <= count:
                face_image(number % 2, rng).save(root / part / f"{number}.jpg")
        (root / f"fairface_label_{part}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_fairface_layout_val_is_test_and_train_gives_a_seeded_valid_carve_out(tmp_path):
    root = fairface_layout(tmp_path / "fairface", train=140, val=30)
    assert detect_format(root) == "fairface"
    dataset = load_dataset(root)
    assert len(dataset) == 170 and dataset.format == "fairface"  # rows whose image is absent are left out
    is_val = np.array([image_id.startswith("val/") for image_id in dataset.image_ids])
    np.testing.assert_array_equal(dataset.splits == 2, is_val)  # FairFace val is the test split, all of it
    valid = dataset.splits == 1
    assert 10 <= valid.sum() <= 18 and not (valid & is_val).any()  # about a tenth of train
    race = dataset.attributes[:, dataset.attribute_names.index("race")]
    assert len(np.unique(race[valid])) >= 5  # carved from every race x gender cell
    np.testing.assert_array_equal(load_dataset(root).splits, dataset.splits)  # seeded
    assert not np.array_equal(load_dataset(root, seed=1).splits, dataset.splits)
    assert dataset.attribute_categories["age"][:3] == ["0-2", "3-9", "10-19"]  # in age order, not text order
    first = dataset.image_ids.index("train/4.jpg")
    age, race_code, service = dataset.attributes[first]
    assert (dataset.attribute_categories["age"][age], dataset.attribute_categories["race"][race_code]) == (
        "30-39",
        "Middle Eastern",
    )
    assert dataset.labels[first] == 0 and service == 0
    from featgender.metrics import default_groups

    assert default_groups(dataset) == ["age", "race"]  # race x gender and age x gender in every report


def test_a_fairface_layout_it_cannot_read_is_one_clear_line(tmp_path):
    root = fairface_layout(tmp_path / "fairface")
    (root / "fairface_label_val.csv").unlink()
    with pytest.raises(FeatgenderError, match="fairface_label_val.csv: missing"):
        load_dataset(root)
    root = fairface_layout(tmp_path / "other")
    (root / "fairface_label_train.csv").write_text("file,gender\ntrain/1.jpg,Male\n")
    with pytest.raises(FeatgenderError, match="fairface_label_train.csv: no column 'age'"):
        load_dataset(root)
    root = fairface_layout(tmp_path / "ages")
    text = (root / "fairface_label_val.csv").read_text().replace("20-29", "twenty")
    (root / "fairface_label_val.csv").write_text(text)
    with pytest.raises(FeatgenderError, match="age 'twenty' is not one of FairFace's bins"):
        load_dataset(root)
    root = fairface_layout(tmp_path / "empty", train=0, val=0)
    with pytest.raises(FeatgenderError, match="none of their images"):
        load_dataset(root)
