"""Networks: the authors' parameter names and shapes, their outputs, and backbone inference."""
import json

import numpy as np
import pytest
import torch

from conftest import CELEBA_DDH, FIXTURES, needs_celeba_ddh, needs_fixtures
from models import BACKBONES, build_model, check_image_size, infer_backbone
from methods.dcdh import DCDH


@needs_fixtures
@pytest.mark.parametrize("name,factory", [
    ("DFHNet(12)", lambda: build_model("dfhnet", 12)),
    ("DFHNet(48)", lambda: build_model("dfhnet", 48)),
    ("SphereNet_hashing(num_layers=20, hashing_bits=48)", lambda: build_model("spherenet20", 48)),
    ("DualClasswiseLoss(num_classes=299, feat_dim=12)", lambda: DCDH(299, 12)),
])
def test_state_dict_names_and_shapes_match_authors(name, factory):
    ref = json.load(open(f"{FIXTURES}/reference_values.json"))["state_dict_shapes"][name]
    got = {k: list(v.shape) for k, v in factory().state_dict().items()}
    assert got == ref


@pytest.mark.parametrize("backbone,size,bits", [
    ("dfhnet", 32, 12), ("spherenet20", 112, 36), ("resnet18", 32, 24), ("alexnet", 64, 48)])
def test_output_shape_and_inference(backbone, size, bits):
    model = build_model(backbone, bits).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, bits) and out.dtype == torch.float32
    assert infer_backbone(model.state_dict()) == (backbone, bits)


@pytest.mark.parametrize("backbone", ["spherenet64", "resnet50"])
def test_infer_deep_backbones(backbone):
    assert infer_backbone(build_model(backbone, 24).state_dict()) == (backbone, 24)


def test_spherenet_depths_have_20_and_64_layers():
    for depth in (20, 64):
        convs = [m for m in build_model(f"spherenet{depth}", 12).modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == depth  # 4 stage convs + 2 per residual unit


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_model("vgg", 12)
    with pytest.raises(ValueError, match="positive integer"):
        build_model("dfhnet", 0)
    with pytest.raises(ValueError, match="takes 32x32"):
        check_image_size("dfhnet", 64)
    with pytest.raises(ValueError, match=">= 63"):
        check_image_size("alexnet", 32)
    with pytest.raises(ValueError, match="matches none"):
        infer_backbone({"foo.weight": torch.zeros(1)})
    assert set(BACKBONES) >= {"dfhnet", "spherenet20", "spherenet64", "resnet18", "resnet50", "alexnet"}


def test_pretrained_without_cache_is_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local torch cache"):
        build_model("resnet18", 12, pretrained=True)


@needs_fixtures
@needs_celeba_ddh
def test_seed_checkpoint_outputs_match_authors():
    from data import build_datasets
    ckpt = torch.load(f"{FIXTURES}/seed_format_dfhnet12.tar", map_location="cpu", weights_only=True)
    model = build_model("dfhnet", 12)
    model.load_state_dict(ckpt["backbone"])
    model.eval()
    _, queries, _ = build_datasets("ddh", CELEBA_DDH)
    images, labels = queries.__getitems__(list(range(16)))
    ref = np.load(f"{FIXTURES}/seed_format_dfhnet12_outputs.npz")
    with torch.no_grad():
        out = model(images).numpy()
    np.testing.assert_allclose(out, ref["test_real_valued"], atol=1e-4)
    np.testing.assert_array_equal(labels.numpy(), ref["test_labels"])
