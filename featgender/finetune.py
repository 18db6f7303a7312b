"""End-to-end fine-tuning, the baseline that frozen features + a head are compared against.

The backbone's classifier is replaced by dropout + one logit; all but the last N parameter
blocks stay frozen (N=0: head only; 'all': everything). Training uses AdamW and
BCEWithLogitsLoss on augmented images (flip, shear, RandomResizedCrop zoom), validates every
epoch, stops when the valid loss has not improved for ``patience`` epochs and keeps the
best epoch. A checkpoint after every epoch makes the run resumable. Checkpoints hold only
tensors and plain values, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from featgender.backbones import Backbone, build_backbone
from featgender.data import FaceDataset, load_dataset
from featgender.errors import FeatgenderError
from featgender.files import atomic_write
from featgender.extract import default_workers, detects_on_loader, resolve_device, resolve_precision, worker_init
from featgender.extraction import resolve_face_box
from featgender.images import load_image

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "featgender-finetuned"
CHECKPOINT_VERSION = 1


class GenderNet(nn.Module):
    """A backbone's embedding followed by dropout and a single logit (male)."""

    def __init__(self, backbone: Backbone, dropout: float = 0.2):
        super().__init__()
        self.embedding = backbone.model.body  # the graph up to the embedding layer
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(backbone.config.feature_dim, 1)
        self.frozen: list[nn.Module] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding(images)["embedding"]
        if embedding.ndim == 4:
            embedding = nn.functional.adaptive_avg_pool2d(embedding, 1)
        return self.logit(self.dropout(embedding.flatten(1))).squeeze(1)

    def train(self, mode: bool = True) -> "GenderNet":
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
        count = int(unfreeze_last)
        if count < 0:
            raise FeatgenderError(f"--unfreeze-last {unfreeze_last}: use 0, a positive number or all")
        trainable = blocks[len(blocks) - count:] if count else []
    modules = dict(net.embedding.named_modules())
    net.frozen = [modules[block] for block in blocks if block not in trainable and block in modules]
    for name, parameter in net.embedding.named_parameters():
        parameter.requires_grad_(any(name == block or name.startswith(block + ".") for block in trainable))
    return trainable


class TrainingImages(Dataset):
    """uint8 images with labels; training images get flip, shear and zoom augmentations.

    ``backbone``'s loader step, if any (face alignment), runs first: its chips are the
    network's input size already, and are augmented as they are."""

    def __init__(self, dataset: FaceDataset, indices: np.ndarray, backbone: Backbone, augment: bool):
        from torchvision.transforms import v2

        self.paths = [dataset.paths[i] for i in indices]
        self.labels = dataset.labels[indices].astype(np.float32)
        self.min_side = backbone.config.resize_size
        self.loader_step = backbone.transform.loader_step
        size = backbone.config.input_size
        resize = size if self.loader_step is not None else backbone.config.resize_size
        if augment:
            self.transform = v2.Compose([
                v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=0, shear=10),
            ])
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
class FinetuneResult:
    """What :func:`finetune` did: best epoch, per-epoch history, test evaluation, files."""

    checkpoint: Path
    best_epoch: int
    history: list[dict]
    test: dict
    resumed_from: int = 0


def _loader(images: TrainingImages, batch_size: int, shuffle: bool, workers: int, seed: int, pin: bool):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(images, batch_size=batch_size, shuffle=shuffle, num_workers=workers, pin_memory=pin,
                      generator=generator, drop_last=False, worker_init_fn=worker_init() if workers else None)


def _run_epoch(net, loader, device, normalise, autocast, optimizer=None) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass; trains when ``optimizer`` is given. Returns mean loss, labels, P(male)."""
    loss_function = nn.BCEWithLogitsLoss(reduction="sum")
    net.train(optimizer is not None)
    total, labels, scores = 0.0, [], []
    with torch.set_grad_enabled(optimizer is not None), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        for images, targets in loader:
            images = normalise(images.to(device, non_blocking=True), torch.float32)
            targets = targets.to(device, non_blocking=True)
            logits = net(images).float()
            loss = loss_function(logits, targets)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                (loss / len(targets)).backward()
                optimizer.step()
            total += float(loss.detach())
            labels.append(targets.cpu().numpy())
            scores.append(torch.sigmoid(logits).detach().cpu().numpy())
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    return total / max(len(labels), 1), labels.astype(int), scores


def finetune(
    data: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str = "default",
    epochs: int = 10,
    unfreeze_last: int | str = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 2,
    dropout: float = 0.2,
    out: str | Path | None = None,
    device: str = "auto",
    workers: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    format: str = "auto",
    face_box: str | tuple = "auto",
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``backbone`` end to end on ``data`` and report test metrics: ``featgender finetune``.

    ``face_box``: for a face-aligning backbone (dlib_resnet), where to find the face, as
    ``featgender extract --face-box`` (:func:`featgender.extraction.resolve_face_box`).
    Writes ``out`` (default ``models/<backbone>-ft.pt``: the best epoch) and
    ``<out>.last.pt`` (the latest epoch): rerunning the same command resumes from it, and
    rerunning with more ``epochs`` trains on.
    """
    from tqdm.auto import tqdm

    from featgender.evaluate import evaluate_scores, public_result

    dataset = load_dataset(data, format=format, limit=limit, seed=seed)
    splits = {name: np.flatnonzero(dataset.splits == code) for code, name in enumerate(("train", "valid", "test"))}
    if not len(splits["train"]) or not len(splits["valid"]):
        raise FeatgenderError(f"--data {data}: fine-tuning needs train and valid images")
    face_box = resolve_face_box(face_box, backbone, dataset.paths, dataset.name)
    built = build_backbone(backbone, weights=weights, face_box=face_box)
    torch.manual_seed(seed)
    net = GenderNet(built, dropout)
    trainable = freeze_all_but_last(net, unfreeze_last)
    device = resolve_device(device)
    autocast = resolve_precision("auto", device) == "bfloat16"
    net = net.to(device).to(memory_format=torch.channels_last)
    normalise = built.transform.to(device)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    out = Path(out) if out is not None else Path("models") / f"{backbone}-ft.pt"
    last = out.with_name(out.name + ".last.pt")
    config = {"backbone": backbone, "weights": built.weights.name, "weights_sha256": built.weights.sha256 or "",
              "face_box": list(face_box) if face_box else None,
              "unfreeze_last": str(unfreeze_last), "lr": lr, "batch_size": batch_size, "dropout": dropout,
              "dataset_fingerprint": dataset.fingerprint(), "seed": seed}
    history, best = [], {"loss": float("inf"), "epoch": 0, "state": None}
    start_epoch = 0
    if last.is_file():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        if saved.get("config") != config:
            raise FeatgenderError(f"{last}: a checkpoint of a different fine-tune run; delete it or change --out")
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, best = saved["history"], {**saved["best"], "state": saved["best_state"]}
        start_epoch = len(history)
        logger.info("%s: resuming after epoch %d", last, start_epoch)
    workers = default_workers(device, loader_bound=detects_on_loader(built)) if workers is None else workers
    pin = device.type == "cuda"
    train_loader = _loader(TrainingImages(dataset, splits["train"], built, True), batch_size, True,
                           workers, seed, pin)
    valid_loader = _loader(TrainingImages(dataset, splits["valid"], built, False), batch_size, False,
                           workers, seed, pin)
    stale = len(history) - best["epoch"]
    for epoch in tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs, unit="epoch",
                      disable=not progress, desc=f"fine-tune {backbone}"):
        if stale >= patience:
            break
        torch.manual_seed(seed + epoch)  # same shuffle and augmentations whether or not the run was resumed
        train_loader.generator.manual_seed(seed + epoch)
        train_loss, _, _ = _run_epoch(net, train_loader, device, normalise, autocast, optimizer)
        valid_loss, valid_labels, valid_scores = _run_epoch(net, valid_loader, device, normalise, autocast)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "valid_loss": valid_loss,
                        "valid_accuracy": float(((valid_scores >= 0.5) == valid_labels).mean())})
        if valid_loss < best["loss"]:
            best = {"loss": valid_loss, "epoch": epoch + 1, "state": copy.deepcopy(net.state_dict())}
        stale = epoch + 1 - best["epoch"]
        _save(last, {"config": config, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "history": history, "best": {"loss": best["loss"], "epoch": best["epoch"]},
                     "best_state": best["state"]})
    net.load_state_dict(best["state"])
    test = {}
    if len(splits["test"]):
        test_loader = _loader(TrainingImages(dataset, splits["test"], built, False), batch_size, False,
                              workers, seed, pin)
        _, _, test_scores = _run_epoch(net, test_loader, device, normalise, autocast)
        test = evaluate_scores(dataset.subset(splits["test"]), test_scores)
        test["split"] = "test"
    from featgender.cache import library_versions

    _save(out, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "config": config,
                "backbone": backbone, "layer": built.config.layer, "feature_dim": built.config.feature_dim,
                "weights_path": built.weights.path or "", "trainable_blocks": trainable,
                "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "history": history,
                "best_epoch": best["epoch"],
                "metrics": public_result(test), "versions": library_versions()})
    return FinetuneResult(out, best["epoch"], history, test, start_epoch)


def _save(path: Path, content: dict) -> None:
    """torch.save, atomically (:func:`featgender.files.atomic_write`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(content, tmp)


def load_finetuned(path: str | Path, *, device: str = "auto") -> tuple[GenderNet, Backbone, dict]:
    """A fine-tuned checkpoint as (network in eval mode, its backbone, the checkpoint dict)."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or not weights-only loadable
        raise FeatgenderError(f"--model {path}: not a featgender fine-tuned checkpoint ({type(error).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise FeatgenderError(f"--model {path}: not a featgender fine-tuned checkpoint")
    # every weight is in the checkpoint; a face-aligning backbone aligns as in training
    built = build_backbone(saved["backbone"], weights="none", face_box=saved["config"].get("face_box"))
    net = GenderNet(built)
    net.load_state_dict(saved["state_dict"])
    return net.to(resolve_device(device)).eval(), built, saved
