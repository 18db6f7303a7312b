"""End-to-end fine-tuning, the baseline that frozen features + a head are compared against.

The backbone's classifier is replaced by dropout + one logit; all but the last N parameter
blocks stay frozen (N=0: head only; 'all': everything). Training uses AdamW and
BCEWithLogitsLoss on augmented images (:mod:`featgender.augment`: flip, shear, zoom; 'web'
adds low resolution, rotation, grayscale, exposure), validates every epoch, stops when the
valid loss has not improved for ``patience`` epochs and keeps the best epoch.

Fine-tuning that keeps what the network knows (issue #34): ``head_first`` starts the logit
from a logistic regression on the frozen embedding (no early steps spent undoing a random
head), ``layer_decay`` gives each block down from the top that factor of the learning rate
(the first layers, which see edges and skin, move least), and ``schedule='cosine'`` warms the
rate up over the first :data:`WARMUP` of the steps, then lowers it to 0 along a cosine.
``batch_norm='frozen'`` keeps every batch-norm layer's pretrained statistics (its scale and
shift still train): an ImageNet network trained whole on small CPU batches with live statistics
unlearned faster than it learned (benchmarks/README.md, session 15).

A checkpoint after every epoch makes the run resumable. Checkpoints hold only tensors and plain
values, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from featgender.augment import training_transform
from featgender.backbones import FINETUNED_FORMAT, Backbone, EmbeddingModel, build_backbone, pooled
from featgender.cache import library_versions
from featgender.data import FaceDataset, load_dataset, split_code
from featgender.defaults import DEFAULT_BACKBONE, MODELS_FOLDER
from featgender.embed import detects_on_loader, resolve_device, resolve_workers, uses_bfloat16, worker_init
from featgender.errors import FeatgenderError
from featgender.extract import finding_faces_in
from featgender.files import CHECKPOINT, atomic_write, check_writable
from featgender.images import load_image
from featgender.metrics import evaluate_scores, pool_evaluations, public_result
from featgender.mixing import balance_weights, parse_balance

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = FINETUNED_FORMAT
CHECKPOINT_VERSION = 1
SCHEDULES = ("constant", "cosine")
BATCH_NORM = ("train", "frozen")  # batch-norm statistics: updated by the blocks that train, or kept
WARMUP = 0.05  # share of a cosine schedule's steps spent warming the learning rate up
HEAD_FIRST_SAMPLES = 8000  # training images whose frozen embeddings the first logit is fitted on
# Per backbone, the fine-tune measured to keep what the network knew while it learns faces in
# the wild (benchmarks/README.md, "The quick start fine-tunes"): every block, the head fitted first,
# rates falling 0.8x per block down, cosine schedule, web-photo augmentation. Two epochs of
# 12,000 draws scored as three of 16,000 on FairFace's valid carve-out (0.875) in half the
# steps; one of 16,000 did not (0.863).
RECIPES: dict[str, dict[str, Any]] = {
    "dlib_resnet": {
        "epochs": 2,
        "samples_per_epoch": 12_000,
        "unfreeze_last": "all",
        "head_first": True,
        "layer_decay": 0.8,
        "schedule": "cosine",
        "augment": "web",
        "lr": 3e-4,
        "batch_size": 64,
    }
}


class GenderNet(nn.Module):
    """A backbone's embedding followed by dropout and a single logit (male)."""

    def __init__(self, backbone: Backbone, dropout: float = 0.2):
        super().__init__()
        assert isinstance(backbone.model, EmbeddingModel), "a backbone as build_backbone builds it"
        self.embedding = backbone.model.body  # the graph up to the embedding layer
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(backbone.feature_dim, 1)
        self.frozen: list[nn.Module] = []

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled (N, D) embedding the logit reads."""
        return pooled(self.embedding(images)["embedding"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit(self.dropout(self.features(images))).squeeze(1)

    def train(self, mode: bool = True) -> GenderNet:
        super().train(mode)
        for module in self.frozen:  # frozen blocks keep their batch-norm statistics
            module.eval()
        return self


def parameter_blocks(module: nn.Module) -> list[str]:
    """Parameter-holding blocks in forward order, named by their first two name components
    (``layer4.2``, ``features.17``, ``_blocks.15``): what ``unfreeze_last`` counts."""
    blocks = []
    for name, _ in module.named_parameters():
        block = ".".join(name.split(".")[:2]) if name.count(".") >= 2 else name.split(".")[0]
        if block not in blocks:
            blocks.append(block)
    return blocks


def freeze_all_but_last(net: GenderNet, unfreeze_last: int | str) -> list[str]:
    """Freeze the embedding except its last ``unfreeze_last`` blocks ('all': none frozen)."""
    blocks = parameter_blocks(net.embedding)
    if unfreeze_last == "all":
        trainable = blocks
    else:
        count = int(unfreeze_last) if str(unfreeze_last).isdigit() else -1
        if count < 0:
            raise FeatgenderError(f"--unfreeze-last {unfreeze_last}: use 0, a positive number or all")
        trainable = blocks[len(blocks) - count :] if count else []
    modules = dict(net.embedding.named_modules())
    net.frozen = [modules[block] for block in blocks if block not in trainable and block in modules]
    for name, parameter in net.embedding.named_parameters():
        parameter.requires_grad_(any(name == block or name.startswith(block + ".") for block in trainable))
    return trainable


def freeze_batch_norm_statistics(net: GenderNet) -> None:
    """Keep every batch-norm layer's running statistics, as frozen blocks keep theirs; the
    layers' scale and shift still train where their block does."""
    net.frozen += [module for module in net.embedding.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


class TrainingImages(Dataset):
    """uint8 images with labels; training images get ``augment``'s augmentations
    (:func:`featgender.augment.training_transform`; '' for none).

    ``backbone``'s loader step, if any (face alignment), runs first: its chips are the
    network's input size already, and are augmented as they are."""

    def __init__(self, rows: FaceDataset, backbone: Backbone, augment: str = ""):
        from torchvision.transforms import v2

        self.paths = rows.paths
        self.labels = rows.labels.astype(np.float32)
        self.min_side = backbone.config.resize_size
        self.loader_step = backbone.transform.loader_step
        size = backbone.config.input_size
        resize = size if self.loader_step is not None else backbone.config.resize_size
        if augment:
            self.transform = training_transform(size, augment)
        else:
            self.transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(self.paths[index], self.min_side)
        if self.loader_step is not None:
            image = self.loader_step(image)
        return self.transform(image), self.labels[index]


@dataclass
class TrainingData:
    """One dataset's splits, with the backbone finding faces where they sit in its images."""

    dataset: FaceDataset
    backbone: Backbone
    face_box: tuple | None

    def split(self, name: str) -> FaceDataset:
        return self.dataset.subset(np.flatnonzero(self.dataset.splits == split_code(name)))

    def images(self, name: str, augment: str = "") -> TrainingImages:
        return TrainingImages(self.split(name), self.backbone, augment)


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: best epoch, per-epoch history, test evaluation, files."""

    checkpoint: Path
    best_epoch: int
    history: list[dict]
    test: dict
    resumed_from: int = 0


def recipe(backbone: str, limit: int | None = None) -> dict[str, Any]:
    """:func:`finetune`'s options measured for ``backbone`` (:data:`RECIPES`; none for others);
    with ``limit`` (a few faces per dataset), each epoch is one pass over them instead of the
    recipe's draws."""
    options = dict(RECIPES.get(backbone, {}))
    if limit is not None and "samples_per_epoch" in options:
        options["samples_per_epoch"] = None
    return options


def load_training_data(
    data: Sequence[str | Path], built: Backbone, *, face_box: str | tuple, format: str, limit: int | None, seed: int
) -> list[TrainingData]:
    """Each of ``data``'s datasets, checked to have train and valid images and to differ, each with
    ``built`` finding the face per ``face_box`` in its own images (a face-aligning backbone)."""
    read: list[TrainingData] = []
    for path in data:
        dataset = load_dataset(path, format=format, limit=limit, seed=seed)
        if not all(np.any(dataset.splits == split_code(name)) for name in ("train", "valid")):
            raise FeatgenderError(f"--data {path}: fine-tuning needs train and valid images")
        if any(done.dataset.fingerprint() == dataset.fingerprint() for done in read):
            raise FeatgenderError(f"--data {path}: the same dataset is given twice")
        read.append(TrainingData(dataset, *finding_faces_in(dataset, built, face_box)))
    return read


def _loader(
    images: ConcatDataset | TrainingImages,
    batch_size: int,
    workers: int,
    seed: int,
    pin: bool,
    *,
    shuffle: bool = False,
    weights: np.ndarray | None = None,
    samples: int | None = None,
) -> DataLoader:
    """Batches of ``images``: in order, shuffled, or ``samples`` drawn per epoch with ``weights``
    (with replacement); every draw comes from the loader's seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if weights is not None or samples is not None:
        weights = np.ones(len(images)) if weights is None else weights
        sampler = WeightedRandomSampler(weights.tolist(), samples or len(images), replacement=True, generator=generator)
    return DataLoader(
        images,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        generator=generator,
        drop_last=False,
        worker_init_fn=worker_init() if workers else None,
    )


def _run_epoch(
    net, loader, device, normalise, autocast, optimizer=None, lr_at: Callable[[int], float] | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass; trains when ``optimizer`` is given, step i at ``lr_at(i)`` times each parameter
    group's ``initial_lr`` when that is given. Returns mean loss, labels, P(male)."""
    loss_function = nn.BCEWithLogitsLoss(reduction="sum")
    net.train(optimizer is not None)
    total, label_batches, score_batches = 0.0, [], []
    with torch.set_grad_enabled(optimizer is not None):
        for step, (images, targets) in enumerate(loader):
            images = normalise(images.to(device, non_blocking=True), torch.float32)
            targets = targets.to(device, non_blocking=True)
            # autocast per batch: it caches its bfloat16 copies of the weights until it exits, so one
            # context around the epoch would run every step on the first step's weights
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                logits = net(images).float()
            loss = loss_function(logits, targets)
            if optimizer is not None:
                if lr_at is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = group["initial_lr"] * lr_at(step)
                optimizer.zero_grad(set_to_none=True)
                (loss / len(targets)).backward()
                optimizer.step()
            total += float(loss.detach())
            label_batches.append(targets.cpu().numpy())
            score_batches.append(torch.sigmoid(logits).detach().cpu().numpy())
    labels, scores = np.concatenate(label_batches), np.concatenate(score_batches)
    return total / max(len(labels), 1), labels.astype(int), scores


def layerwise_groups(net: GenderNet, lr: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups of ``net``'s trainable parameters: the logit at ``lr``, each block
    of the embedding at ``layer_decay`` times the rate of the block above it."""
    groups = [{"params": list(net.logit.parameters()), "lr": lr, "initial_lr": lr}]
    named = list(net.embedding.named_parameters())
    for depth, block in enumerate(reversed(parameter_blocks(net.embedding)), start=1):
        params = [p for name, p in named if p.requires_grad and (name == block or name.startswith(block + "."))]
        if params:
            rate = lr * layer_decay**depth
            groups.append({"params": params, "lr": rate, "initial_lr": rate})
    return groups


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate's factor at ``step`` of ``steps``: 1 ('constant'), or ('cosine') a
    linear warm-up over the first :data:`WARMUP` of the steps times a cosine from 1 to 0."""
    if schedule not in SCHEDULES:
        raise FeatgenderError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return 1.0
    warmup = max(1, round(WARMUP * steps))
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


@torch.no_grad()
def fit_head_first(net: GenderNet, loader: DataLoader, run: _Run) -> float:
    """Set ``net``'s logit to a logistic regression fitted on the frozen embedding of
    ``loader``'s (unaugmented) training images; returns its training accuracy."""
    from sklearn.linear_model import LogisticRegression

    net.eval()
    features, labels = [], []
    for images, targets in run.batches(loader, "head first"):
        images = run.normalise(images.to(run.device), torch.float32)
        with torch.autocast(run.device.type, torch.bfloat16, enabled=run.autocast):
            features.append(net.features(images).float().cpu().numpy())
        labels.append(targets.numpy())
    embedded, truth = np.concatenate(features), np.concatenate(labels).astype(int)
    head = LogisticRegression(max_iter=2000).fit(embedded, truth)
    net.logit.weight.copy_(torch.from_numpy(head.coef_).to(net.logit.weight))
    net.logit.bias.copy_(torch.from_numpy(head.intercept_).to(net.logit.bias))
    return float(head.score(embedded, truth))


def finetune(
    data: str | Path | Sequence[str | Path],
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "default",
    layer: str | None = None,
    epochs: int = 10,
    unfreeze_last: int | str = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 2,
    dropout: float = 0.2,
    balance: str | Sequence[str] | None = None,
    samples_per_epoch: int | None = None,
    augment: str = "basic",
    layer_decay: float = 1.0,
    schedule: str = "constant",
    head_first: bool = False,
    batch_norm: str = "train",
    out: str | Path | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    workers: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    format: str = "auto",
    face_box: str | tuple = "auto",
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``backbone`` end to end on ``data`` and report test metrics: ``featgender finetune``.

    ``data``: one dataset, or several trained on together (each evaluated on its own test
    split too). ``balance`` (none, or any of dataset, gender, group) draws training images with
    the weights :func:`featgender.mixing.balance_weights` gives, ``samples_per_epoch`` of them per
    epoch (default: as many as there are training images). ``augment``, ``layer_decay``,
    ``schedule``, ``head_first`` and ``batch_norm``: how much the network keeps of what it knew
    (the module's docstring). ``layer``: the graph node the logit reads, pooled (default: the
    backbone's embedding layer), e.g. arcface_mbf's ``neck.1`` below its identity projection; the
    checkpoint loads, and ``extract --weights`` embeds, at it. ``face_box``: for a face-aligning
    backbone (dlib_resnet), where to find the face in each dataset's images, as ``featgender
    extract --face-box`` (:func:`featgender.extract.face_box_for`).
    Writes ``out`` (default ``models/<backbone>-ft.pt``: the best epoch) and
    ``<out>.last.pt`` (the latest epoch): rerunning the same command resumes from it, and
    rerunning with more ``epochs`` trains on.
    """
    bounds = (("--epochs", epochs, 1), ("--batch-size", batch_size, 1), ("--patience", patience, 1), ("--lr", lr, 0))
    for option, value, least in bounds:
        if not value >= least:
            raise FeatgenderError(f"{option} {value}: must be at least {least}")
    if samples_per_epoch is not None and samples_per_epoch < 1:
        raise FeatgenderError(f"--samples-per-epoch {samples_per_epoch}: want a positive number of images")
    if not 0 < layer_decay <= 1:
        raise FeatgenderError(f"--layer-decay {layer_decay}: want a factor in (0, 1]")
    lr_factor(schedule, 0, 1)  # an unknown schedule fails now, not after the data is read
    training_transform(1, augment)  # as does an unknown augmentation
    if batch_norm not in BATCH_NORM:
        raise FeatgenderError(f"--batch-norm {batch_norm!r}: choose one of {', '.join(BATCH_NORM)}")
    out = Path(out) if out is not None else Path(MODELS_FOLDER) / f"{backbone}-ft.pt"
    last = out.with_name(out.name + ".last.pt")
    for path in (out, last):
        check_writable(path, CHECKPOINT)
    built = build_backbone(backbone, weights=weights, layer=layer, face_box=None)
    parts = load_training_data(
        [data] if isinstance(data, (str, Path)) else data,
        built,
        face_box=face_box,
        format=format,
        limit=limit,
        seed=seed,
    )
    torch.manual_seed(seed)
    net = GenderNet(built, dropout)
    trainable = freeze_all_but_last(net, unfreeze_last)
    if batch_norm == "frozen":
        freeze_batch_norm_statistics(net)
    run = _Run(
        device=resolve_device(device),
        precision=precision,
        normalise=built.transform,
        batch_size=batch_size,
        seed=seed,
        workers=workers,
        loader_bound=any(detects_on_loader(part.backbone) for part in parts),
        progress=progress,
    )
    net = net.to(run.device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(layerwise_groups(net, lr, layer_decay), lr=lr, weight_decay=weight_decay)
    config = _run_config(
        parts,
        built,
        unfreeze_last=unfreeze_last,
        lr=lr,
        batch_size=batch_size,
        dropout=dropout,
        seed=seed,
        balance=parse_balance(balance),
        samples_per_epoch=samples_per_epoch,
        augment=augment,
        layer_decay=layer_decay,
        schedule=schedule,
        head_first=head_first,
        # absent where the logit reads the registry's layer, as in checkpoints written before the option
        **({"layer": built.config.layer} if layer is not None else {}),
        # absent where the statistics train, as in checkpoints written before the option
        **({"batch_norm": batch_norm} if batch_norm != "train" else {}),
    )
    history, best = _resume(last, config, net, optimizer) if last.is_file() else ([], BestEpoch())
    start_epoch = len(history)
    train = [part.split("train") for part in parts]
    train_loader = run.loader(
        ConcatDataset([part.images("train", augment=augment) for part in parts]),
        shuffle=True,
        weights=balance_weights(train, balance),
        samples=samples_per_epoch,
    )
    if head_first and not history:
        first_draw = run.loader(
            ConcatDataset([part.images("train") for part in parts]),
            weights=balance_weights(train, balance),
            samples=min(HEAD_FIRST_SAMPLES, samples_per_epoch or sum(len(rows) for rows in train)),
        )
        logger.info("head first: training accuracy %.4f", fit_head_first(net, first_draw, run))
    steps = epochs * len(train_loader)
    valid_loader = run.loader(ConcatDataset([part.images("valid") for part in parts]))
    from tqdm.auto import tqdm

    for epoch in tqdm(
        range(start_epoch, epochs),
        initial=start_epoch,
        total=epochs,
        unit="epoch",
        disable=not progress,
        desc=f"fine-tune {backbone}",
    ):
        if len(history) - best.epoch >= patience:
            break
        torch.manual_seed(seed + epoch)  # same draws and augmentations whether or not the run was resumed
        train_loader.generator.manual_seed(seed + epoch)
        done = epoch * len(train_loader)
        lr_at = partial(_scheduled, schedule, done, steps)
        history.append(_epoch(net, run, train_loader, valid_loader, optimizer, epoch + 1, lr_at))
        if history[-1]["valid_loss"] < best.loss:
            best = BestEpoch(history[-1]["valid_loss"], epoch + 1, copy.deepcopy(net.state_dict()))
        _save(
            last,
            {
                "config": config,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "best": {"loss": best.loss, "epoch": best.epoch},
                "best_state": best.state,
            },
        )
    if best.state is None:
        raise FeatgenderError(f"--epochs {epochs}: no epoch was trained")
    net.load_state_dict(best.state)
    test = _test(net, parts, run)
    _save(
        out,
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": config,
            "backbone": backbone,
            "layer": built.config.layer,
            "feature_dim": built.feature_dim,
            "weights_path": built.weights.path or "",
            "trainable_blocks": trainable,
            "state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
            "history": history,
            "best_epoch": best.epoch,
            "metrics": public_result(test),
            "versions": library_versions(),
        },
    )
    return FinetuneResult(out, best.epoch, history, test, start_epoch)


@dataclass
class BestEpoch:
    """The epoch of lowest valid loss so far, with the network's weights after it."""

    loss: float = float("inf")
    epoch: int = 0
    state: dict | None = None


@dataclass
class _Run:
    """Where and how a fine-tune computes: device, precision, input normalisation, loaders."""

    device: torch.device
    precision: str
    normalise: nn.Module
    batch_size: int
    seed: int
    workers: int | None
    loader_bound: bool
    progress: bool = False  # a bar over each pass's batches (passes take minutes on CPU)

    def __post_init__(self):
        self.autocast = uses_bfloat16(self.precision, self.device)
        self.normalise = self.normalise.to(self.device)
        self.workers = resolve_workers(self.workers, self.device, loader_bound=self.loader_bound)

    def loader(self, images: ConcatDataset | TrainingImages, **sampling) -> DataLoader:
        return _loader(
            images, self.batch_size, int(self.workers or 0), self.seed, self.device.type == "cuda", **sampling
        )

    def scores(
        self, net: GenderNet, loader: DataLoader, optimizer=None, lr_at: Callable[[int], float] | None = None
    ) -> tuple[float, np.ndarray, np.ndarray]:
        batches = self.batches(loader, "train" if optimizer else "score")
        return _run_epoch(net, batches, self.device, self.normalise, self.autocast, optimizer, lr_at)

    def batches(self, loader: DataLoader, what: str) -> Iterable:
        """``loader``'s batches, under a progress bar that goes when the pass ends."""
        from tqdm.auto import tqdm

        return tqdm(loader, desc=what, unit="batch", leave=False, disable=not self.progress)


def _scheduled(schedule: str, done: int, steps: int, step: int) -> float:
    """:func:`lr_factor` at step ``step`` of an epoch that starts after ``done`` steps."""
    return lr_factor(schedule, done + step, steps)


def _epoch(
    net: GenderNet,
    run: _Run,
    train_loader: DataLoader,
    valid_loader: DataLoader,
    optimizer,
    number: int,
    lr_at: Callable[[int], float] | None = None,
) -> dict:
    """One epoch of training (step i at ``lr_at(i)`` of each group's rate), then validation:
    its row of the history."""
    train_loss, _, _ = run.scores(net, train_loader, optimizer, lr_at)
    valid_loss, valid_labels, valid_scores = run.scores(net, valid_loader)
    return {
        "epoch": number,
        "train_loss": train_loss,
        "valid_loss": valid_loss,
        "valid_accuracy": float(((valid_scores >= 0.5) == valid_labels).mean()),
    }


def _run_config(parts: list[TrainingData], built: Backbone, **settings) -> dict:
    """What a checkpoint must match to be resumed: backbone, weights, data, face boxes, settings.

    One dataset keeps its face box under ``face_box`` (the loaded network aligns faces there
    unless told otherwise); several keep theirs under ``face_boxes``, and a loaded network
    detects faces."""
    boxes = [list(part.face_box) if part.face_box else None for part in parts]
    fingerprints = [part.dataset.fingerprint() for part in parts]
    config = {
        "backbone": built.config.name,
        "weights": built.weights.name,
        "weights_sha256": built.weights.sha256 or "",
        "face_box": boxes[0] if len(parts) == 1 else None,
        **settings,
        "dataset_fingerprint": fingerprints[0] if len(parts) == 1 else fingerprints,
    }
    if len(parts) > 1:
        config.update(datasets=[part.dataset.name for part in parts], face_boxes=boxes)
    return config


def _resume(last: Path, config: dict, net: GenderNet, optimizer) -> tuple[list[dict], BestEpoch]:
    """The history and best epoch of the run checkpointed in ``last``, its state loaded."""
    saved = torch.load(last, map_location="cpu", weights_only=True)
    found, absent = saved.get("config") or {}, object()  # a key in one config only differs, as before
    differ = sorted(key for key in found.keys() | config.keys() if found.get(key, absent) != config.get(key, absent))
    if differ:
        raise FeatgenderError(
            f"{last}: a checkpoint of a different fine-tune run ({', '.join(differ)} differ); delete it or change --out"
        )
    net.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    logger.info("%s: resuming after epoch %d", last, len(saved["history"]))
    return saved["history"], BestEpoch(saved["best"]["loss"], saved["best"]["epoch"], saved["best_state"])


def _test(net: GenderNet, parts: list[TrainingData], run: _Run) -> dict:
    """Each dataset's test split evaluated (pooled too, with several); {} without test images."""
    evaluations = {}
    for part in parts:
        rows = part.split("test")
        if len(rows):
            _, _, scores = run.scores(net, run.loader(TrainingImages(rows, part.backbone)))
            evaluations[part.dataset.name] = {**evaluate_scores(rows, scores), "split": "test"}
    if len(evaluations) <= 1:
        return next(iter(evaluations.values()), {})
    return pool_evaluations(evaluations, "test")


def _save(path: Path, content: dict) -> None:
    """torch.save, atomically (:func:`featgender.files.atomic_write`)."""
    with atomic_write(path, kind=CHECKPOINT) as tmp:
        torch.save(content, tmp)


def load_finetuned(path: str | Path, *, device: str = "auto") -> tuple[GenderNet, Backbone, dict]:
    """A fine-tuned checkpoint as (network in eval mode, its backbone, the checkpoint dict)."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or not weights-only loadable
        raise FeatgenderError(
            f"--model {path}: not a featgender fine-tuned checkpoint ({type(error).__name__})"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise FeatgenderError(f"--model {path}: not a featgender fine-tuned checkpoint")
    # every weight is in the checkpoint; a face-aligning backbone aligns as in training
    built = build_backbone(
        saved["backbone"], weights="none", layer=saved.get("layer"), face_box=saved["config"].get("face_box")
    )
    net = GenderNet(built)
    net.load_state_dict(saved["state_dict"])
    return net.to(resolve_device(device)).eval(), built, saved
