"""torchrun extraction: 2 gloo ranks on this machine against one process, shards, joins."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from holding import holding_code, wait_until_held

from featgender.cache import cache_summary, read_cache, read_metadata, shard_path
from featgender.distributed import shard_rows
from featgender.errors import FeatgenderError
from featgender.extract import extract_layers, extract_to_cache

EXTRACT = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--precision", "float32", "--workers", "0"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# The Python API under torchrun, in small chunks so that a rank can be killed between them,
# with loader workers; each rank writes down its pid and how its shard went.
API_SCRIPT = """
import os, sys
from featgender.extract import extract_layers, extract_to_cache
open(sys.argv[2] + ".pid" + os.environ["RANK"], "w").write(str(os.getpid()))
result = extract_to_cache(sys.argv[1], out=sys.argv[2], backbone="mobilenet_v3_small", weights="none",
                          precision="float32", workers=2, batch_size=1, chunk_rows=2, progress=False)
open(sys.argv[2] + ".status" + os.environ["RANK"], "w").write(f"{result.status} {result.resumed_from}")
"""


def torchrun(data, out, nproc=2, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            *TORCHRUN,
            f"--nproc-per-node={nproc}",
            "-m",
            "featgender",
            "extract",
            "--data",
            str(data),
            "--out",
            str(out),
            *EXTRACT,
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_gloo_ranks_write_every_layer_as_one_process_does(csv_dataset, tmp_path):
    """extract --layer A --layer B under torchrun: each layer's shards joined into its own cache,
    bit for bit the cache one process writes for that layer."""
    layers = ["features.3", "flatten"]
    alone = extract_layers(
        csv_dataset,
        layers=layers,
        out=tmp_path / "single@{layer}.h5",
        backbone="mobilenet_v3_small",
        weights="none",
        precision="float32",
        workers=0,
        progress=False,
    )
    run = torchrun(
        csv_dataset, tmp_path / "joined@{layer}.h5", extra=[part for name in layers for part in ("--layer", name)]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for layer, single in zip(layers, alone, strict=True):
        joined = tmp_path / f"joined@{layer}.h5"
        assert read_metadata(joined)["layer"] == layer
        np.testing.assert_array_equal(read_cache(joined).features, read_cache(single.path).features)  # bit for bit


def test_shards_are_contiguous_and_cover_every_row():
    blocks = [shard_rows(10, rank, 3) for rank in range(3)]
    assert [list(block) for block in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def single_process_cache(data, out) -> None:
    """The cache one process writes: what a torchrun job's joined cache must equal."""
    extract_to_cache(
        data, backbone="mobilenet_v3_small", weights="none", precision="float32", workers=0, out=out, progress=False
    )


def test_two_gloo_ranks_give_the_single_process_cache(csv_dataset, tmp_path):
    single = tmp_path / "single.h5"
    single_process_cache(csv_dataset, single)
    joined = tmp_path / "joined.h5"
    run = torchrun(csv_dataset, joined)
    assert run.returncode == 0, run.stderr[-3000:]
    alone, together = read_cache(single), read_cache(joined)
    assert together.ids == alone.ids and np.array_equal(together.labels, alone.labels)
    np.testing.assert_array_equal(together.features, alone.features)  # bit for bit
    assert together.attribute_names == alone.attribute_names and np.array_equal(together.attributes, alone.attributes)
    metadata = read_metadata(joined)
    assert (
        metadata["num_images"] == 40 and metadata["dataset_fingerprint"] == read_metadata(single)["dataset_fingerprint"]
    )
    with h5py.File(joined) as h5:
        assert h5["features"].is_virtual  # the shards' rows, not a copy
    info = subprocess.run(
        [sys.executable, "-m", "featgender", "info", str(joined), "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(info.stdout)["splits"] == cache_summary(single)["splits"]

    # a rank whose shard is gone: the rerun redoes that shard only
    first, second = shard_path(joined, 0, 2), shard_path(joined, 1, 2)
    first_written = first.stat().st_mtime_ns
    second.unlink()
    with pytest.raises(FeatgenderError, match="rank-00001-of-00002.h5 is missing"):
        read_cache(joined)
    run = torchrun(csv_dataset, joined)
    assert run.returncode == 0, run.stderr[-3000:]
    assert first.stat().st_mtime_ns == first_written and second.is_file()
    np.testing.assert_array_equal(read_cache(joined).features, alone.features)


@pytest.mark.parametrize("chunks", [1, 4])
def test_a_rank_killed_mid_shard_is_resumed_by_the_rerun(csv_dataset, tmp_path, chunks):
    """kill -9 one rank (not its loader workers), held once its shard has some chunks: torchrun
    stops the job, nothing is joined; the same job started at once is not refused, resumes
    that shard where it stopped and ends bit for bit equal to one process."""
    single, joined = tmp_path / "single.h5", tmp_path / "joined.h5"
    single_process_cache(csv_dataset, single)
    hold = tmp_path / "hold"
    hold.mkdir()
    script = tmp_path / "api.py"
    script.write_text(
        "import os\nif os.environ['RANK'] == '1':\n" + textwrap.indent(holding_code(hold, chunks), "    ") + API_SCRIPT
    )
    command = [*TORCHRUN, "--nproc-per-node=2", str(script), str(csv_dataset), str(joined)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    partial = shard_path(joined, 1, 2).with_name(shard_path(joined, 1, 2).name + ".partial")
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_held(job, hold, chunks)  # rank 1, with ``chunks`` chunks of its shard on disk
        os.kill(int((tmp_path / "joined.h5.pid1").read_text()), signal.SIGKILL)
        job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode != 0 and not joined.exists()
    assert not shard_path(joined, 1, 2).exists() and partial.is_dir()  # killed mid-shard, resumable

    script.write_text(API_SCRIPT)  # the rerun runs through
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed, resumed_from = (tmp_path / "joined.h5.status1").read_text().split()
    assert resumed == "resumed" and 2 * chunks <= int(resumed_from) < 20  # only the missing rows were embedded
    np.testing.assert_array_equal(read_cache(joined).features, read_cache(single).features)


def test_shards_of_other_rows_are_refused_at_the_join(csv_dataset, tmp_path):
    """Each rank lists the dataset itself: if the listing changed between them, the shards hold
    other images than the joined rows would say, and the join refuses rather than mislabel."""
    from featgender.backbones import build_backbone
    from featgender.cache import cache_metadata, join_shards
    from featgender.data import load_dataset
    from featgender.extract import build_cache

    dataset, backbone = load_dataset(csv_dataset), build_backbone("mobilenet_v3_small", weights="none")
    out = tmp_path / "joined.h5"
    blocks = [dataset.subset(np.array(shard_rows(40, rank, 2))) for rank in range(2)]
    shards = [shard_path(out, rank, 2) for rank in range(2)]
    shards[0].parent.mkdir()
    for block, shard in zip(reversed(blocks), shards, strict=True):  # rank 0 embedded rank 1's rows and the reverse
        build_cache(block, backbone, shard, workers=0, progress=False)
    metadata = cache_metadata(dataset, backbone, "float32", "float16", None, 0, False)
    with pytest.raises(FeatgenderError, match=r"rank-00000-of-00002.h5: holds other images than rows 0-19"):
        join_shards(out, dataset, shards, metadata)
    assert not out.exists()
