import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from holding import HOLD_TIMEOUT_S, holding_code, wait_until_held

from featgender.backbones import build_backbone
from featgender.cache import cache_summary, read_cache
from featgender.data import load_dataset
from featgender.embed import extract_features
from featgender.errors import FeatgenderError
from featgender.extract import build_cache
from featgender.images import load_image

BACKBONE = "mobilenet_v3_small"


@pytest.fixture(scope="module")
def small_backbone():
    return build_backbone(BACKBONE, weights="none")


def test_cache_schema_opens_in_plain_h5py(celeba_official, small_backbone, tmp_path):
    dataset = load_dataset(celeba_official)
    out = tmp_path / "c.h5"
    result = build_cache(dataset, small_backbone, out, batch_size=4, progress=False)
    assert result.status == "created" and result.num_failed == 0
    with h5py.File(out, "r") as h5:
        assert h5["features"].shape == (30, 576) and h5["features"].dtype == np.float16
        assert h5["features"].chunks is not None
        assert h5["labels"][:].tolist() == dataset.labels.tolist()
        assert h5["split"][:].tolist() == dataset.splits.tolist()
        assert list(h5["split"].attrs["names"]) == ["train", "valid", "test"]
        assert h5["ids"].asstr()[:].tolist() == dataset.image_ids
        assert h5["attributes"].shape == (30, 40) and "Male" in list(h5["attributes"].attrs["names"])
        assert h5["valid"][:].all()
        attrs = dict(h5.attrs)
        assert attrs["backbone"] == BACKBONE and attrs["complete"]
        assert attrs["dataset_fingerprint"] == dataset.fingerprint()
        assert json.loads(attrs["preprocessing"])["input_size"] == 224
        assert "torch" in json.loads(attrs["versions"])
        assert attrs["weights"].startswith("none")
    summary = cache_summary(out)
    assert summary["splits"]["train"]["images"] == 18


def test_cached_features_equal_a_direct_forward_pass(csv_dataset, small_backbone, tmp_path):
    dataset = load_dataset(csv_dataset, limit=12)
    out = tmp_path / "c.h5"
    build_cache(
        dataset, small_backbone, out, batch_size=4, dtype="float32", precision="float32", workers=0, progress=False
    )
    cached = read_cache(out)
    images = small_backbone.transform([load_image(path) for path in dataset.paths[:4]])
    with torch.inference_mode():
        expected = small_backbone.model(images).numpy()
    np.testing.assert_allclose(cached.features[:4], expected, rtol=1e-4, atol=1e-5)
    test_rows = read_cache(out, "test")
    assert set(test_rows.ids) == {i for i, s in zip(dataset.image_ids, dataset.splits, strict=True) if s == 2}


def test_rerun_is_a_noop_and_a_different_cache_is_refused(csv_dataset, small_backbone, tmp_path):
    dataset = load_dataset(csv_dataset, limit=8)
    out = tmp_path / "c.h5"
    build_cache(dataset, small_backbone, out, progress=False)
    before = out.read_bytes()
    assert build_cache(dataset, small_backbone, out, progress=False).status == "up to date"
    other = build_backbone("resnet18", weights="none")
    with pytest.raises(FeatgenderError, match="backbone.*differ.*--overwrite"):
        build_cache(dataset, other, out, progress=False)
    with pytest.raises(FeatgenderError, match="dataset_fingerprint differ"):
        build_cache(load_dataset(csv_dataset, limit=10), small_backbone, out, progress=False)
    assert out.read_bytes() == before  # refused means untouched
    assert build_cache(dataset, other, out, overwrite=True, progress=False).status == "created"
    assert read_cache(out).metadata["backbone"] == "resnet18"


def test_broken_images_are_recorded_not_fatal(csv_dataset, small_backbone, tmp_path):
    (csv_dataset / "images" / "001.jpg").write_bytes(b"this is not a jpeg")
    (csv_dataset / "images" / "002.jpg").write_bytes(b"")
    whole = (csv_dataset / "images" / "003.jpg").read_bytes()
    (csv_dataset / "images" / "003.jpg").write_bytes(whole[: len(whole) // 2])  # truncated
    dataset = load_dataset(csv_dataset)
    out = tmp_path / "c.h5"
    result = build_cache(dataset, small_backbone, out, batch_size=4, progress=False)
    assert result.num_failed == 3
    with h5py.File(out, "r") as h5:
        assert h5["failed/ids"].asstr()[:].tolist() == ["images/001.jpg", "images/002.jpg", "images/003.jpg"]
        assert "UnidentifiedImageError" in h5["failed/reasons"].asstr()[0]
        assert "truncated" in h5["failed/reasons"].asstr()[2]
        assert np.isnan(h5["features"][1]).all() and not h5["valid"][1]
    assert len(read_cache(out).ids) == 37
    assert len(read_cache(out, include_failed=True).ids) == 40
    with pytest.raises(FeatgenderError, match=r"images/001.jpg: UnidentifiedImageError.*--strict"):
        build_cache(dataset, small_backbone, tmp_path / "strict.h5", batch_size=4, strict=True, progress=False)


def test_image_modes_are_converted_to_rgb(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (10, 12), (255, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    Image.new("L", (10, 12), 7).save(tmp_path / "g.png")
    Image.new("CMYK", (10, 12), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    transparent, gray, cmyk = (load_image(tmp_path / name) for name in ("a.png", "g.png", "c.jpg"))
    assert transparent.shape == gray.shape == cmyk.shape == (3, 12, 10)
    assert transparent.unique().tolist() == [255]  # transparent pixels become white
    assert gray.unique().tolist() == [7]
    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grayscale PNG
    assert load_image(tmp_path / "deep.png")[0].tolist() == [[0, 100, 255]]


def test_decompression_bombs_are_refused_and_recorded(csv_dataset, small_backbone, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # the fixture images have 44 x 54 pixels
    features, errors = extract_features(small_backbone, load_dataset(csv_dataset).paths[:2], workers=0, progress=False)
    assert all("DecompressionBomb" in error for error in errors) and np.isnan(features).all()


EXTRACT_SCRIPT = f"""
import sys
from featgender.backbones import build_backbone
from featgender.extract import build_cache
from featgender.data import load_dataset
build_cache(load_dataset(sys.argv[1]), build_backbone("{BACKBONE}", weights="none"), sys.argv[2],
            batch_size=2, chunk_rows=4, workers=int(sys.argv[3]) if len(sys.argv) > 3 else 0, progress=False)
"""


def _start_held(data, out, hold: Path, after_chunks: int, workers: int = 0) -> subprocess.Popen:
    """An extraction of ``data`` into ``out`` in another process, held once ``after_chunks``
    chunks are on disk (:mod:`holding`); ``hold`` is a new folder for its signals."""
    hold.mkdir()
    return subprocess.Popen(
        [sys.executable, "-c", holding_code(hold, after_chunks) + EXTRACT_SCRIPT, str(data), str(out), str(workers)],
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_and_kill(data, out, hold: Path, chunks_before_kill: int) -> None:
    """Run an extraction until ``chunks_before_kill`` chunks are on disk, then SIGKILL it."""
    process = _start_held(data, out, hold, chunks_before_kill)
    try:
        wait_until_held(process, hold, chunks_before_kill)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        process.kill()


def test_kill_9_then_resume_gives_the_identical_cache(csv_dataset, tmp_path):
    reference, resumed = tmp_path / "ref.h5", tmp_path / "resumed.h5"
    dataset = load_dataset(csv_dataset)
    options = dict(batch_size=2, chunk_rows=4, workers=0, progress=False)
    build_cache(dataset, build_backbone(BACKBONE, weights="none"), reference, **options)
    for chunks in (2, 5):  # the second run resumes at chunk 2
        _run_and_kill(csv_dataset, resumed, tmp_path / f"hold-{chunks}", chunks)
        assert not resumed.exists()
    result = build_cache(dataset, build_backbone(BACKBONE, weights="none"), resumed, **options)
    assert result.status == "resumed" and result.resumed_from >= 8
    with h5py.File(reference, "r") as ref, h5py.File(resumed, "r") as res:
        np.testing.assert_array_equal(ref["features"][:], res["features"][:])
        assert ref["ids"].asstr()[:].tolist() == res["ids"].asstr()[:].tolist()
    assert not resumed.with_name(resumed.name + ".partial").exists()


def test_extract_features_in_memory_matches_the_cache(csv_dataset, small_backbone, tmp_path):
    dataset = load_dataset(csv_dataset, limit=6)
    features, errors = extract_features(small_backbone, dataset.paths, batch_size=3, progress=False)
    out = tmp_path / "c.h5"
    build_cache(dataset, small_backbone, out, batch_size=3, progress=False)
    np.testing.assert_array_equal(features, read_cache(out, dtype=np.float16).features)
    assert errors == [""] * 6


def test_flip_averages_the_embeddings_of_the_image_and_its_mirror(csv_dataset, small_backbone, tmp_path):
    dataset = load_dataset(csv_dataset, limit=4)
    out = tmp_path / "flip.h5"
    build_cache(dataset, small_backbone, out, dtype="float32", precision="float32", flip=True, progress=False)
    batch = small_backbone.transform([load_image(path) for path in dataset.paths])
    with torch.inference_mode():
        expected = ((small_backbone.model(batch) + small_backbone.model(batch.flip(-1))) / 2).numpy()
    cached = read_cache(out, include_failed=True)
    order = [dataset.image_ids.index(image_id) for image_id in cached.ids]
    np.testing.assert_allclose(cached.features, expected[order], rtol=1e-4, atol=1e-5)
    assert cached.metadata["flip"]
    with pytest.raises(FeatgenderError, match="flip differ"):
        build_cache(dataset, small_backbone, out, dtype="float32", precision="float32", progress=False)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_moments_never_leaves_a_wrong_cache(csv_dataset, tmp_path, seed):
    """Kills land anywhere: while importing, mid-chunk, between temp file and rename, while
    assembling the HDF5 file. Whatever is on disk then is either absent or complete and right."""
    import random

    rng = random.Random(seed)
    dataset = load_dataset(csv_dataset)
    options = dict(batch_size=2, chunk_rows=4, workers=0, progress=False)
    reference, out = tmp_path / "ref.h5", tmp_path / "killed.h5"
    build_cache(dataset, build_backbone(BACKBONE, weights="none"), reference, **options)
    expected = read_cache(reference, include_failed=True).features
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", EXTRACT_SCRIPT, str(csv_dataset), str(out)])
        time.sleep(rng.uniform(0.5, 6.0))  # any moment will do: every outcome is checked below
        process.kill()
        process.wait()
        if out.exists():
            np.testing.assert_array_equal(read_cache(out, include_failed=True).features, expected)
    build_cache(dataset, build_backbone(BACKBONE, weights="none"), out, **options)
    np.testing.assert_array_equal(read_cache(out, include_failed=True).features, expected)


def test_a_caller_between_batches_is_not_left_in_autocast(csv_dataset, small_backbone):
    """A caller that stops iterating (an error, a full disk) must get its thread back as it was:
    a later extraction would otherwise run under the abandoned one's autocast state."""
    from featgender.embed import iter_features

    batches = iter_features(
        small_backbone, load_dataset(csv_dataset).paths, batch_size=2, workers=0, precision="bfloat16", progress=False
    )
    next(batches)
    assert not torch.is_autocast_enabled("cpu") and not torch.is_inference_mode_enabled()
    del batches


def test_a_second_extraction_of_the_same_cache_is_refused_while_the_first_runs(csv_dataset, tmp_path):
    """Two writers would write the same temporary files over each other: the second is refused
    (naming the first) while the first is held after its first chunk, the first's kill frees
    the cache, and the rerun resumes it intact."""
    reference, out, hold = tmp_path / "ref.h5", tmp_path / "busy.h5", tmp_path / "hold"
    dataset = load_dataset(csv_dataset)
    options = dict(batch_size=2, chunk_rows=4, workers=0, progress=False)
    second = build_backbone(BACKBONE, weights="none")
    build_cache(dataset, second, reference, **options)
    first = _start_held(csv_dataset, out, hold, after_chunks=1)
    try:
        wait_until_held(first, hold, 1)
        with pytest.raises(FeatgenderError, match=rf"busy.h5: \S+ pid {first.pid} is writing it"):
            build_cache(dataset, second, out, **options)
        first.kill()
        first.wait()
    finally:
        first.kill()
    assert (tmp_path / "busy.h5.lock").exists()  # left by the kill, but no longer locked
    result = build_cache(dataset, second, out, **options)
    assert result.status == "resumed"
    np.testing.assert_array_equal(
        read_cache(out, include_failed=True).features, read_cache(reference, include_failed=True).features
    )
    assert not (tmp_path / "busy.h5.lock").exists()


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@contextlib.contextmanager
def _adopting_orphans():
    """Make this process the subreaper of its descendants: orphans (the workers of a killed
    child) become its children, so that it can read how they ended (os.waitpid)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _how_it_ended(pid: int) -> int:
    """The signal that ended the adopted process ``pid`` (0: it exited by itself)."""
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        assert time.monotonic() < deadline, f"loader worker {pid} still alive {HOLD_TIMEOUT_S} s after its parent"
        time.sleep(0.005)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds loader workers through /proc, adopts them by prctl"
)
def test_kill_9_of_the_parent_alone_never_blocks_the_rerun_started_at_once(csv_dataset, tmp_path):
    """An OOM killer or a crashed shell kills the extracting process but not its loader
    workers. At several moments, each held while both workers are alive (:mod:`holding`):
    the rerun, started at once, is not refused (the workers inherited nothing that holds the
    cache) and goes on from where the killed one stopped; the workers are killed with their
    parent (SIGKILL from the kernel, not their own exit seconds later, which this test tells
    apart by adopting them); the last cache is bit-identical."""
    reference, out = tmp_path / "ref.h5", tmp_path / "killed.h5"
    dataset = load_dataset(csv_dataset)
    options = dict(batch_size=2, chunk_rows=4, workers=0, progress=False)
    build_cache(dataset, build_backbone(BACKBONE, weights="none"), reference, **options)
    with _adopting_orphans():
        for chunks in (1, 3, 5, 7):
            hold = tmp_path / f"hold-{chunks}"
            process = _start_held(csv_dataset, out, hold, after_chunks=chunks, workers=2)
            try:
                wait_until_held(process, hold, chunks)
                workers = _children(process.pid)
                assert len(workers) == 2, workers
                os.kill(process.pid, signal.SIGKILL)  # the parent only
                process.wait()
            finally:
                process.kill()
            assert [_how_it_ended(worker) for worker in workers] == [signal.SIGKILL] * 2
    result = build_cache(dataset, build_backbone(BACKBONE, weights="none"), out, **options)
    assert result.status == "resumed" and result.resumed_from >= 28
    np.testing.assert_array_equal(
        read_cache(out, include_failed=True).features, read_cache(reference, include_failed=True).features
    )


LOCK_THEN_FORK_SCRIPT = """
import os, sys, time
from featgender.files import exclusive
with exclusive(sys.argv[1]):
    child = os.fork()
    if child == 0:  # a forked helper that outlives its parent, holding every inherited descriptor
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
"""


def test_the_writer_lock_belongs_to_its_process_not_to_the_children_it_forks(tmp_path):
    """The lock holder is killed while a child it forked lives on: the cache is free at once."""
    from featgender.files import exclusive

    target = tmp_path / "c.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_THEN_FORK_SCRIPT, str(target)], stdout=subprocess.PIPE, text=True
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(FeatgenderError, match=rf"c.h5: \S+ pid {holder.pid} is writing it"):
            with exclusive(target):
                pass
        holder.kill()
        holder.wait()
        assert _alive(child)
        with exclusive(target):  # not refused
            with pytest.raises(FeatgenderError, match=rf"pid {os.getpid()} is writing it"):  # a second thread's try
                with exclusive(target):
                    pass
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)
