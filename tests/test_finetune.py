import numpy as np
import pytest
import torch

import featgender
from featgender.backbones import build_backbone
from featgender.errors import FeatgenderError
from featgender.finetune import GenderNet, finetune, freeze_all_but_last, parameter_blocks

OPTIONS = dict(backbone="mobilenet_v3_small", weights="none", batch_size=8, workers=0, progress=False)


def test_unfreeze_last_counts_blocks_from_the_top():
    net = GenderNet(build_backbone("resnet18", weights="none"))
    blocks = parameter_blocks(net.embedding)
    assert blocks[:2] == ["conv1", "bn1"] and blocks[-1] == "layer4.1"
    assert freeze_all_but_last(net, 1) == ["layer4.1"]
    trainable = {name for name, p in net.embedding.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("layer4.1.") for name in trainable)
    assert freeze_all_but_last(net, 0) == []
    assert not any(p.requires_grad for p in net.embedding.parameters())
    assert all(p.requires_grad for p in net.logit.parameters())
    assert freeze_all_but_last(net, "all") == blocks


def test_one_epoch_saves_a_weights_only_checkpoint_that_predicts(csv_dataset, tmp_path):
    out = tmp_path / "ft.pt"
    result = finetune(csv_dataset, epochs=1, unfreeze_last=1, out=out, **OPTIONS)
    assert len(result.history) == 1 and result.best_epoch == 1
    assert result.test["n"] == 4 and "ci95" in result.test and "race" in result.test["subgroups"]
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "featgender-finetuned" and saved["trainable_blocks"]
    predictions = featgender.load(out).predict(sorted((csv_dataset / "images").glob("*.jpg"))[:3])
    assert all(p.label in ("male", "female") and 0 <= p.probability <= 1 for p in predictions)


def test_early_stopping_on_a_plateau_keeps_the_best_epoch(csv_dataset, tmp_path):
    result = finetune(csv_dataset, epochs=10, lr=0.0, patience=2, out=tmp_path / "ft.pt", **OPTIONS)
    assert len(result.history) == 3  # epoch 1 is best; 2 and 3 do not improve: stop
    assert result.best_epoch == 1


def test_resume_continues_where_it_stopped(csv_dataset, tmp_path):
    straight = finetune(csv_dataset, epochs=2, patience=5, out=tmp_path / "a.pt", **OPTIONS)
    finetune(csv_dataset, epochs=1, patience=5, out=tmp_path / "b.pt", **OPTIONS)
    resumed = finetune(csv_dataset, epochs=2, patience=5, out=tmp_path / "b.pt", **OPTIONS)
    assert resumed.resumed_from == 1 and len(resumed.history) == 2
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["valid_loss"] == b["valid_loss"] and a["train_loss"] == b["train_loss"]
    best_a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    best_b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(best_a[key], best_b[key]) for key in best_a)
    with pytest.raises(FeatgenderError, match=r"b\.pt\.last\.pt: a checkpoint of a different .* \(lr differ\)"):
        finetune(csv_dataset, epochs=3, patience=5, lr=0.5, out=tmp_path / "b.pt", **OPTIONS)


def test_several_datasets_train_one_network_drawn_balanced_and_each_is_tested(csv_dataset, celeba_official, tmp_path):
    out = tmp_path / "mix.pt"
    result = finetune(
        [csv_dataset, celeba_official], epochs=1, balance="dataset,gender", samples_per_epoch=24, out=out, **OPTIONS
    )
    assert set(result.test["datasets"]) == {"csvset", "celeba"}
    assert result.test["n"] == sum(own["n"] for own in result.test["datasets"].values())
    assert "race" in result.test["datasets"]["csvset"]["group_gender"]
    config = torch.load(out, weights_only=True)["config"]
    assert config["datasets"] == ["csvset", "celeba"] and config["balance"] == ["dataset", "gender"]
    assert config["samples_per_epoch"] == 24 and len(config["dataset_fingerprint"]) == 2
    assert featgender.load(out).predict(sorted((csv_dataset / "images").glob("*.jpg"))[:2])[0].label


def test_balanced_draws_give_each_dataset_and_gender_the_same_share(csv_dataset, celeba_official):
    from featgender.backbones import build_backbone
    from featgender.finetune import _loader, load_training_data
    from featgender.mixing import balance_weights

    built = build_backbone("mobilenet_v3_small", weights="none")
    parts = load_training_data(
        [csv_dataset, celeba_official], built, face_box="auto", format="auto", limit=None, seed=0
    )
    train = [part.split("train") for part in parts]
    sizes = [len(rows.labels) for rows in train]
    assert sizes[0] != sizes[1]  # 24 and 18 training images
    images = torch.utils.data.ConcatDataset([part.images("train") for part in parts])
    loader = _loader(images, 8, 0, 0, False, weights=balance_weights(train, "dataset,gender"), samples=8000)
    drawn = np.array(list(loader.sampler))
    assert len(drawn) == 8000
    dataset = (drawn >= sizes[0]).astype(int)
    labels = np.concatenate([rows.labels for rows in train])[drawn]
    for cell in [(d, g) for d in (0, 1) for g in (0, 1)]:
        share = np.mean((dataset == cell[0]) & (labels == cell[1]))
        assert abs(share - 0.25) < 0.03, (cell, share)


def test_the_same_dataset_twice_is_refused(csv_dataset, tmp_path):
    with pytest.raises(FeatgenderError, match="the same dataset is given twice"):
        finetune([csv_dataset, csv_dataset], epochs=1, out=tmp_path / "ft.pt", **OPTIONS)
    with pytest.raises(FeatgenderError, match="--samples-per-epoch 0"):
        finetune(csv_dataset, epochs=1, samples_per_epoch=0, out=tmp_path / "ft.pt", **OPTIONS)


def test_bfloat16_training_steps_run_on_the_weights_they_updated():
    """Under autocast, each step must see the previous step's update (autocast caches its
    bfloat16 weight copies until its context exits: a context around the whole epoch froze the
    forward pass at the first step's weights while AdamW moved the real ones)."""
    from featgender.finetune import _run_epoch

    torch.manual_seed(0)
    net = GenderNet(build_backbone("mobilenet_v3_small", weights="none"), dropout=0.0)
    freeze_all_but_last(net, 0)  # the backbone frozen in eval mode: only the logit trains
    batch = [(torch.rand(8, 3, 64, 64), torch.ones(8))]  # all male: the logit's bias alone learns it
    device, same = torch.device("cpu"), lambda images, dtype: images
    before, _, _ = _run_epoch(net, batch, device, same, autocast=True)
    optimizer = torch.optim.AdamW(net.logit.parameters(), lr=0.05)
    during, _, _ = _run_epoch(net, batch * 8, device, same, autocast=True, optimizer=optimizer)
    after, _, _ = _run_epoch(net, batch, device, same, autocast=True)
    assert during < before - 0.05 and after < during


def test_frozen_batch_norm_keeps_the_pretrained_statistics_while_scale_and_shift_train():
    """One training step of every block: live statistics move towards the batch's, frozen ones
    stay where they were, and in both the batch-norm layers' affine weights learn."""
    from featgender.finetune import _run_epoch, freeze_batch_norm_statistics

    batch = [(torch.rand(8, 3, 64, 64) * 3 + 2, (torch.arange(8) % 2).float())]  # far from the init statistics
    device, same = torch.device("cpu"), lambda images, dtype: images
    moved = {}
    for frozen in (False, True):
        torch.manual_seed(0)
        net = GenderNet(build_backbone("mobilenet_v3_small", weights="none"))
        freeze_all_but_last(net, "all")
        if frozen:
            freeze_batch_norm_statistics(net)
        norm = next(m for m in net.embedding.modules() if isinstance(m, torch.nn.BatchNorm2d))
        mean, weight = norm.running_mean.clone(), norm.weight.detach().clone()
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.01)
        _run_epoch(net, batch, device, same, autocast=False, optimizer=optimizer)
        assert not torch.equal(norm.weight, weight)
        moved[frozen] = not torch.equal(norm.running_mean, mean)
    assert moved == {False: True, True: False}


def test_layerwise_rates_fall_block_by_block_and_the_cosine_schedule_warms_up_then_ends_at_zero():
    from featgender.finetune import layerwise_groups, lr_factor

    net = GenderNet(build_backbone("resnet18", weights="none"))
    freeze_all_but_last(net, 2)
    groups = layerwise_groups(net, 1e-3, 0.5)
    assert [group["lr"] for group in groups] == pytest.approx([1e-3, 5e-4, 2.5e-4])  # logit, layer4.1, layer4.0
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sum(len(group["params"]) for group in groups) == len(trainable)
    factors = [lr_factor("cosine", step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.2) and max(factors) == factors[4] > 0.99
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False)) and factors[-1] < 0.001
    assert {lr_factor("constant", step, 100) for step in range(100)} == {1.0}
    with pytest.raises(FeatgenderError, match="--schedule 'steps'"):
        lr_factor("steps", 0, 100)


class Unchanged(torch.nn.Module):
    """A backbone transform for images that are the network's input already."""

    def forward(self, images, dtype=torch.float32):
        return images


def test_head_first_starts_the_logit_from_a_fit_on_the_frozen_embedding():
    """Images whose class shows in their brightness: the logit fitted on the frozen embedding
    tells them apart at once, where the random one does not."""
    from featgender.finetune import _Run, fit_head_first

    torch.manual_seed(0)
    net = GenderNet(build_backbone("resnet18", weights="none"), dropout=0.0)  # its random features vary
    freeze_all_but_last(net, 0)
    labels = torch.arange(64) % 2
    images = torch.rand(64, 3, 64, 64) * 0.5 + 0.4 * labels.view(-1, 1, 1, 1)
    batches = [(images[i : i + 16], labels[i : i + 16].float()) for i in range(0, 64, 16)]
    run = _Run(torch.device("cpu"), "float32", Unchanged(), 16, 0, 0, False)
    before, _, _ = run.scores(net, batches)
    assert fit_head_first(net, batches, run) == 1.0
    after, _, scores = run.scores(net, batches)
    assert after < before - 0.1 and np.array_equal(scores >= 0.5, labels.numpy() == 1)


def test_web_augmentation_lowers_resolution_and_unknown_options_are_refused(csv_dataset, tmp_path):
    from featgender.augment import LowResolution, training_transform

    torch.manual_seed(0)
    image = (torch.rand(3, 150, 150) * 255).to(torch.uint8)  # noise: all high frequencies
    blurred = LowResolution(p=1.0, sides=(0.25, 0.25))(image)
    assert blurred.shape == image.shape and blurred.dtype == torch.uint8
    assert blurred.float().std() < 0.5 * image.float().std()
    assert torch.equal(LowResolution(p=0.0)(image), image)
    assert training_transform(112, "web")(image).shape == (3, 112, 112)
    with pytest.raises(FeatgenderError, match="--augment 'noise'"):
        finetune(csv_dataset, augment="noise", out=tmp_path / "ft.pt", **OPTIONS)
    with pytest.raises(FeatgenderError, match="--layer-decay 0"):
        finetune(csv_dataset, layer_decay=0, out=tmp_path / "ft.pt", **OPTIONS)
    with pytest.raises(FeatgenderError, match="--batch-norm 'fixed'"):
        finetune(csv_dataset, batch_norm="fixed", out=tmp_path / "ft.pt", **OPTIONS)
    for option, bad in (
        ("epochs", 0),
        ("batch_size", 0),
        ("patience", 0),
        ("lr", -1.0),
        ("unfreeze_last", "x"),
        ("workers", -1),
    ):
        with pytest.raises(FeatgenderError, match=f"--{option.replace('_', '-')} {bad}: "):
            finetune(csv_dataset, out=tmp_path / "ft.pt", **{**OPTIONS, option: bad})
    with pytest.raises(FeatgenderError, match=f"{tmp_path}: is a folder"):
        finetune(csv_dataset, out=tmp_path, **OPTIONS)
    assert not list(tmp_path.glob("ft.pt*")) and not list(tmp_path.glob("*.tmp"))


def test_a_recipe_is_finetunes_options_and_a_pass_per_epoch_on_a_few_faces():
    import inspect

    from featgender.finetune import recipe

    assert recipe("dlib_resnet")["samples_per_epoch"] == 12_000
    assert recipe("dlib_resnet", limit=300)["samples_per_epoch"] is None
    assert recipe("mobilenet_v3_small") == {}
    inspect.signature(finetune).bind("data", **recipe("dlib_resnet"))  # every key an option


def test_a_fine_tuned_network_is_frozen_again_as_a_backbone_for_extraction(csv_dataset, tmp_path):
    """``extract --weights models/ft.pt``: the backbone built from a fine-tune's checkpoint
    embeds as the fine-tuned network does; another backbone refuses the file, naming it."""
    from featgender.finetune import load_finetuned

    out = tmp_path / "ft.pt"
    finetune(csv_dataset, epochs=1, unfreeze_last="all", lr=0.01, out=out, **OPTIONS)
    net, _, _ = load_finetuned(out, device="cpu")
    refrozen = build_backbone("mobilenet_v3_small", weights=str(out))
    untrained = build_backbone("mobilenet_v3_small", weights="none")
    images = torch.rand(4, 3, 224, 224)
    with torch.no_grad():
        tuned = net.features(images)
        assert torch.allclose(refrozen.model(images), tuned, atol=1e-5)
        assert not torch.allclose(untrained.model(images), tuned, atol=1e-3)
    with pytest.raises(FeatgenderError, match=r"ft\.pt: a fine-tuned mobilenet_v3_small, not resnet18"):
        build_backbone("resnet18", weights=str(out))


def test_a_fine_tune_read_at_a_lower_layer_is_saved_loaded_and_frozen_again_at_it(csv_dataset, tmp_path):
    """``finetune --layer``: the logit reads that node, pooled; the checkpoint loads at it and
    ``extract --weights ft.pt --layer`` embeds as the fine-tuned network does."""
    from featgender.finetune import load_finetuned

    out = tmp_path / "ft.pt"
    finetune(csv_dataset, layer="features.6", epochs=1, unfreeze_last="all", lr=0.01, out=out, **OPTIONS)
    net, built, saved = load_finetuned(out, device="cpu")
    assert saved["config"]["layer"] == built.config.layer and net.logit.in_features == 40  # features.6's channels
    refrozen = build_backbone("mobilenet_v3_small", weights=str(out), layer="features.6")
    images = torch.rand(4, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(refrozen.model(images), net.features(images), atol=1e-5)
    predictions = featgender.load(out).predict(sorted((csv_dataset / "images").glob("*.jpg"))[:2])
    assert all(p.label in ("male", "female") for p in predictions)
