"""Reading a cache while its extraction is still writing it: finished rows only, bit for bit."""

import subprocess
import sys

import numpy as np
import pytest
from holding import HOLD_TIMEOUT_S, holding_code, release, wait_until_held
from typer.testing import CliRunner

from featgender.backbones import build_backbone
from featgender.cache import cache_summary, iter_cache_chunks, open_rows, read_cache, shard_path
from featgender.cli import app
from featgender.data import load_dataset
from featgender.distributed import shard_rows
from featgender.errors import FeatgenderError
from featgender.extract import build_cache
from featgender.training import train_head

BACKBONE = "mobilenet_v3_small"
OPTIONS: dict = dict(batch_size=2, chunk_rows=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def small_backbone():
    return build_backbone(BACKBONE, weights="none")


def break_image(path) -> bytes:
    """Overwrite an image with junk; returns its bytes to put back."""
    good = path.read_bytes()
    path.write_bytes(b"not an image")
    return good


def stop_at_row(dataset, backbone, out, row: int) -> bytes:
    """Extract until the strict stop at a broken image ``row``: the rows before it are done,
    the cache is not written. Returns the broken image's bytes."""
    good = break_image(dataset.paths[row])
    with pytest.raises(FeatgenderError, match="--strict"):
        build_cache(dataset, backbone, out, strict=True, **OPTIONS)
    assert not out.exists()
    return good


def assert_rows_of(part, whole):
    """``part``'s rows are ``whole``'s rows of the same images, bit for bit."""
    position = {image_id: row for row, image_id in enumerate(whole.ids)}
    rows = [position[image_id] for image_id in part.ids]
    np.testing.assert_array_equal(part.features, whole.features[rows])
    np.testing.assert_array_equal(part.labels, whole.labels[rows])
    np.testing.assert_array_equal(part.splits, whole.splits[rows])


def test_an_interrupted_extraction_shows_its_finished_rows(csv_dataset, small_backbone, tmp_path):
    dataset = load_dataset(csv_dataset)
    out = tmp_path / "c.h5"
    good = stop_at_row(dataset, small_backbone, out, row=21)

    with pytest.raises(FeatgenderError, match=r"still being extracted \(20 of 40 images done\).*--in-progress"):
        read_cache(out)
    partial = read_cache(out, in_progress=True)
    assert partial.ids == dataset.image_ids[:20]  # whole chunks of 4 rows before the broken one
    summary = cache_summary(out)
    assert summary["complete"] is False and summary["finished_rows"] == 20 and summary["num_images"] == 40
    assert sum(counts["images"] for counts in summary["splits"].values()) == 40
    snapshot = open_rows(out, in_progress=True)
    streamed = np.concatenate([features for features, _ in iter_cache_chunks(snapshot, rows=7)])
    np.testing.assert_array_equal(streamed, partial.features)
    model, _ = train_head(out, "logreg", in_progress=True, eval_split=None)
    assert model.training["images"] == int((partial.splits == 0).sum())
    runner = CliRunner()
    shown = runner.invoke(app, ["info", str(out)])
    assert shown.exit_code == 0 and "finished_rows: 20" in shown.output
    refused = runner.invoke(app, ["fit", "--cache", str(out), "--out", str(tmp_path / "m.joblib")])
    assert refused.exit_code == 1 and "still being extracted (20 of 40 images done)" in refused.output

    dataset.paths[21].write_bytes(good)
    build_cache(dataset, small_backbone, out, **OPTIONS)
    whole = read_cache(out)
    assert_rows_of(partial, whole)
    # a snapshot taken before the end still reads: its chunks are gone, the cache has the same rows
    np.testing.assert_array_equal(snapshot.read("features", np.arange(20)), whole.features[:20])
    assert read_cache(out, in_progress=True).ids == whole.ids  # a finished cache reads as itself


def test_readers_follow_a_running_extraction(csv_dataset, small_backbone, tmp_path):
    """A second process extracts, held after each chunk (:mod:`holding`) while this one reads:
    each snapshot holds exactly the chunks written so far."""
    out, hold = tmp_path / "c.h5", tmp_path / "hold"
    hold.mkdir()
    script = (
        holding_code(hold)
        + f"""
import sys
from featgender.backbones import build_backbone
from featgender.data import load_dataset
from featgender.extract import build_cache
build_cache(load_dataset(sys.argv[1]), build_backbone("{BACKBONE}", weights="none"), sys.argv[2], **{OPTIONS!r})
"""
    )
    with pytest.raises(FeatgenderError, match="no extraction is writing it"):
        read_cache(out, in_progress=True)
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(csv_dataset), str(out)], stderr=subprocess.PIPE, text=True
    )
    snapshots = []
    try:
        for chunks in range(1, 11):
            wait_until_held(process, hold, chunks)
            snapshots.append(read_cache(out, in_progress=True))
            release(hold, chunks)
        assert process.wait(timeout=HOLD_TIMEOUT_S) == 0, process.stderr.read()
    finally:
        process.kill()
    whole = read_cache(out)
    assert [len(snapshot.ids) for snapshot in snapshots] == list(range(4, 41, 4))
    for snapshot in snapshots:
        assert_rows_of(snapshot, whole)


def test_torchrun_shards_in_progress_read_as_one_cache(csv_dataset, small_backbone, tmp_path):
    """The files a 2-rank job leaves mid-way: rank 0's shard finished, rank 1's half done."""
    dataset = load_dataset(csv_dataset)
    single = tmp_path / "single.h5"
    build_cache(dataset, small_backbone, single, **OPTIONS)
    out = tmp_path / "joined.h5"
    first, second = (dataset.subset(np.array(shard_rows(40, rank, 2))) for rank in range(2))
    shard_path(out, 0, 2).parent.mkdir()
    build_cache(first, small_backbone, shard_path(out, 0, 2), **OPTIONS)
    stop_at_row(second, small_backbone, shard_path(out, 1, 2), row=9)

    partial = read_cache(out, in_progress=True)
    assert partial.ids == dataset.image_ids[:28]  # 20 of rank 0, two chunks of rank 1
    assert_rows_of(partial, read_cache(single))
    assert cache_summary(out)["finished_rows"] == 28


def test_a_reader_listing_chunks_while_the_writer_cleans_up_does_not_go_back(
    csv_dataset, small_backbone, tmp_path, monkeypatch
):
    """The writer puts the finished file in place, then deletes its chunks. A reader that found
    no file yet and lists the chunks meanwhile sees only some: it must read the file instead of
    taking them for the rows done (seen once under load: a snapshot of 12 rows after one of 16)."""
    import shutil

    from featgender.cache import PartialFolder

    dataset = load_dataset(csv_dataset)
    out, finished = tmp_path / "c.h5", tmp_path / "finished.h5"
    build_cache(dataset, small_backbone, finished, **OPTIONS)
    stop_at_row(dataset, small_backbone, out, row=21)  # five chunks done
    list_chunks = PartialFolder.chunk_starts

    def writer_finishes_meanwhile(partial):
        if not out.exists():
            shutil.copy(finished, out)  # the writer's rename into place
            for start in list_chunks(partial)[:3]:
                partial.chunk_path(start).unlink()  # and its cleanup, part-way
        return list_chunks(partial)

    monkeypatch.setattr(PartialFolder, "chunk_starts", writer_finishes_meanwhile)
    assert read_cache(out, in_progress=True).ids == read_cache(finished).ids
