"""Running out of disk space: what was written before survives, the job resumes once there is room.

Two real write failures: a file-size limit (``ulimit -f``: write() fails with EFBIG, any
machine) and a full file system (a small tmpfs: ENOSPC, where this user may mount one).
"""

import hashlib
import resource
import shutil
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest

from featgender.backbones import build_backbone
from featgender.cache import read_cache
from featgender.data import load_dataset
from featgender.errors import FeatgenderError
from featgender.extract import build_cache
from featgender.heads import HeadModel, make_head

BACKBONE = "mobilenet_v3_small"
OPTIONS = dict(batch_size=2, chunk_rows=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def small_backbone():
    return build_backbone(BACKBONE, weights="none")


@contextmanager
def file_size_limit(size: int):
    """Writes past ``size`` bytes of any file fail (EFBIG) in this process until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder) -> list:
    return sorted(str(path) for path in folder.rglob("*.tmp"))


def test_no_room_for_the_new_cache_keeps_the_old_one_and_resumes(csv_dataset, small_backbone, tmp_path):
    dataset = load_dataset(csv_dataset)
    reference = tmp_path / "reference.h5"
    build_cache(dataset, small_backbone, reference, dtype="float32", **OPTIONS)
    out = tmp_path / "c.h5"
    build_cache(dataset, small_backbone, out, dtype="float16", **OPTIONS)
    old = sha256(out)

    # the chunks fit under the limit, the assembled float32 cache does not: refused before writing it
    with file_size_limit(reference.stat().st_size):
        with pytest.raises(
            FeatgenderError,
            match=r"c\.h5: no space left to write it \(needs about .* MiB, the file "
            r"size limit \(ulimit -f\) is .*free some space",
        ):
            build_cache(dataset, small_backbone, out, dtype="float32", overwrite=True, **OPTIONS)
    assert sha256(out) == old and read_cache(out).metadata["dtype"] == "float16"
    assert leftovers(tmp_path) == []

    result = build_cache(dataset, small_backbone, out, dtype="float32", overwrite=True, **OPTIONS)
    assert result.status == "resumed" and result.resumed_from == 40  # nothing embedded twice
    np.testing.assert_array_equal(read_cache(out).features, read_cache(reference).features)


def test_a_cache_or_model_is_not_replaced_by_a_file_of_another_kind(csv_dataset, small_backbone, tmp_path):
    """A mistyped --out (a model onto the cache, a cache onto the model) is refused before any work."""
    from featgender.finetune import finetune
    from featgender.predictor import write_predictions_csv
    from featgender.training import train_head

    dataset = load_dataset(csv_dataset)
    cache, model = tmp_path / "c.h5", tmp_path / "m.joblib"
    build_cache(dataset, small_backbone, cache, dtype="float32", **OPTIONS)
    train_head(cache, "logreg", eval_split=None, out=model)
    kept = {path: sha256(path) for path in (cache, model)}
    pickle = r"a pickle \(a joblib head model\)"
    with pytest.raises(FeatgenderError, match=rf"c\.h5: holds a feature cache \(HDF5\), which {pickle}"):
        train_head(cache, "logreg", eval_split=None, out=cache)
    with pytest.raises(FeatgenderError, match=rf"m\.joblib: holds {pickle}, which a feature cache"):
        build_cache(dataset, small_backbone, model, dtype="float32", overwrite=True, **OPTIONS)
    with pytest.raises(FeatgenderError, match=rf"m\.joblib: holds {pickle}, which a torch file"):
        finetune(csv_dataset, backbone=BACKBONE, weights="none", out=model, workers=0, progress=False)
    with pytest.raises(FeatgenderError, match=r"c\.h5: holds a feature cache \(HDF5\), which a CSV"):
        write_predictions_csv([], cache)
    assert {path: sha256(path) for path in kept} == kept
    written = sorted(path.name for path in tmp_path.iterdir() if path != csv_dataset)
    assert written == ["c.h5", "m.joblib"]  # no .partial, .tmp or probe left
    train_head(cache, "logreg", eval_split=None, out=model)  # a model replaces a model


def test_no_room_for_a_model_keeps_the_old_model(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    backbones = [{"backbone": "x", "feature_dim": 64}]

    def model(dim):
        features = rng.normal(size=(200, dim)) + labels[:, None]
        return HeadModel(
            make_head("logreg", pca=0).fit(features, labels),
            head="logreg",
            params={},
            backbones=[{**backbones[0], "feature_dim": dim}],
            training={},
        )

    path = tmp_path / "model.joblib"
    model(64).save(path)
    old = sha256(path)
    with file_size_limit(path.stat().st_size + 1024):
        with pytest.raises(FeatgenderError, match=r"model\.joblib: no space left"):
            model(4096).save(path)  # a bigger model: 4096 coefficients
    assert sha256(path) == old and leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs at tmp_path/disk (skips where mounting is not allowed), and a function
    that resizes it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        not shutil.which("mount")
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("this user may not mount a tmpfs to fill")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_mid_extraction_loses_no_finished_chunk(csv_dataset, small_backbone, tmp_path, small_disk):
    disk, resize = small_disk
    dataset = load_dataset(csv_dataset)
    reference = tmp_path / "reference.h5"
    build_cache(dataset, small_backbone, reference, dtype="float32", **OPTIONS)
    out = disk / "c.h5"
    with pytest.raises(FeatgenderError, match=r"no space left to write it \(No space left on device\)"):
        build_cache(dataset, small_backbone, out, dtype="float32", **OPTIONS)
    chunks = sorted(out.with_name("c.h5.partial").glob("rows-*.npz"))
    assert 0 < len(chunks) < 10 and leftovers(disk) == [] and not out.exists()

    resize("1m")
    result = build_cache(dataset, small_backbone, out, dtype="float32", **OPTIONS)
    assert result.status == "resumed" and result.resumed_from == 4 * len(chunks)
    np.testing.assert_array_equal(read_cache(out).features, read_cache(reference).features)
