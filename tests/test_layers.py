"""Layer probing: the layers a backbone lists, and several layers embedded in one pass exactly as
one extraction per layer embeds them (resumable after a kill -9 that left the layers uneven)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from holding import wait_until_held
from test_cli import invoke

from featgender.backbones import build_backbone
from featgender.extract import extract_layers, extract_to_cache
from featgender.layers import list_layers

BACKBONE = "mobilenet_v3_small"
LAYERS = ["features.3", "features.8", "features.12", "flatten"]
OPTIONS = dict(backbone=BACKBONE, weights="none", batch_size=2, chunk_rows=4, workers=0, progress=False)


def test_a_backbone_lists_its_blocks_with_shapes_and_each_builds():
    layers = list_layers("resnet18")
    by_name = {layer.name: layer for layer in layers}
    assert [layer.name for layer in layers if layer.default] == ["flatten"]
    assert by_name["layer4.1"].shape == (512, 7, 7) and by_name["layer4.1"].feature_dim == 512
    assert by_name["layer2.0"].shape == (128, 28, 28)
    assert [layer.name for layer in layers].index("layer2.0") < [layer.name for layer in layers].index("layer4.1")
    for layer in layers:
        assert build_backbone("resnet18", weights="none", layer=layer.name).feature_dim == layer.feature_dim
    assert len(list_layers("resnet18", all_nodes=True)) > len(layers)


def test_layers_command_lists_efficientnet_lite0s_nodes():
    result = invoke("layers", "--backbone", "efficientnet_lite0")
    assert result.exit_code == 0, result.output
    assert "* _avg_pooling" in result.output and "_blocks.15" in result.output and "1280" in result.output


def _features(path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as h5:
        return h5["features"][:], {key: h5.attrs[key] for key in ("layer", "feature_dim", "backbone")}


def test_four_layers_in_one_pass_equal_four_extractions_bit_for_bit(csv_dataset, tmp_path):
    together = extract_layers(csv_dataset, layers=LAYERS, out=tmp_path / "one@{layer}.h5", **OPTIONS)
    assert [result.status for result in together] == ["created"] * 4
    for layer, result in zip(LAYERS, together, strict=True):
        alone = extract_to_cache(csv_dataset, layer=layer, out=tmp_path / f"alone@{layer}.h5", **OPTIONS)
        (ours, ours_meta), (theirs, theirs_meta) = _features(result.path), _features(alone.path)
        assert ours_meta == theirs_meta and ours_meta["layer"] == layer
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)  # bit for bit
    assert _features(together[0].path)[0].shape[1] != _features(together[-1].path)[0].shape[1]


def test_several_layers_need_layer_in_out_and_get_their_own_default_paths(csv_dataset, tmp_path, monkeypatch):
    from featgender.errors import FeatgenderError

    with pytest.raises(FeatgenderError, match=r"--out .*put \{layer\} in the path"):
        extract_layers(csv_dataset, layers=LAYERS[:2], out=tmp_path / "x.h5", **OPTIONS)
    monkeypatch.chdir(tmp_path)
    paths = [result.path for result in extract_layers(csv_dataset, layers=["features.3", "flatten"], **OPTIONS)]
    assert [str(path) for path in paths] == [f"cache/csvset-{BACKBONE}@features.3.h5", f"cache/csvset-{BACKBONE}.h5"]


EXTRACT_LAYERS = f"""
import sys
from featgender.extract import extract_layers
extract_layers(sys.argv[1], layers={LAYERS!r}, out=sys.argv[2], **{OPTIONS!r})
"""


def uneven_hold(folder) -> str:
    """Python for the extraction's process: the first layer's writer writes two chunks and says
    so (``held-2``), the other layers' writers never write their second: the layers stand at
    2 and 1 chunks, whatever the threads' timing, when the test kills the process."""
    return f"""
import pathlib, time
from featgender.cache import CacheWriter
_write_chunk = CacheWriter._write_chunk
def _uneven(self, start, *args):
    first_layer = "@{LAYERS[0]}." in self.out.name
    if start >= 4 and not first_layer:
        while True:
            time.sleep(1)
    _write_chunk(self, start, *args)
    if start >= 4 and first_layer:
        while len(list(self.out.parent.glob("*.partial/rows-0000000000.npz"))) < {len(LAYERS)}:
            time.sleep(0.01)  # every layer's first chunk on disk
        (pathlib.Path({str(folder)!r}) / "held-2").touch()
        while True:
            time.sleep(1)
CacheWriter._write_chunk = _uneven
"""


def test_a_killed_multi_layer_extraction_resumes_where_each_layer_stopped(csv_dataset, tmp_path):
    """Killed with the first layer 2 chunks on disk and the others 1: the rerun feeds the
    network from the first row any layer lacks, each writer skips what it has, and every cache
    equals an uninterrupted run's."""
    hold, out = tmp_path / "hold", str(tmp_path / "ft@{layer}.h5")
    hold.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", uneven_hold(hold) + EXTRACT_LAYERS, str(csv_dataset), out],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_held(process, hold, 2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    chunks = [len(list((tmp_path / f"ft@{layer}.h5.partial").glob("rows-*.npz"))) for layer in LAYERS]
    assert chunks == [2, 1, 1, 1]
    resumed = extract_layers(csv_dataset, layers=LAYERS, out=out, **OPTIONS)
    assert [result.resumed_from for result in resumed] == [8, 4, 4, 4]  # 4 rows a chunk
    straight = extract_layers(csv_dataset, layers=LAYERS, out=tmp_path / "straight@{layer}.h5", **OPTIONS)
    for mine, theirs in zip(resumed, straight, strict=True):
        assert np.array_equal(_features(mine.path)[0], _features(theirs.path)[0])
