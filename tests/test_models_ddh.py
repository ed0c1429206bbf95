"""DDH's and DDAH's networks: output shapes, parameter counts against the architecture, the locally
connected layer and the divide-and-encode module against naive loops, backbone inference."""
import pytest
import torch

from models import DEFAULT_IMAGE_SIZE, build_model, check_image_size, infer_backbone
from models.ddahnet import DDAHNet
from models.ddhnet import DDHNet, DivideAndEncode, LocallyConnected2d


def _trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _conv(cin, cout, k):
    return cin * cout * k * k + cout


def _linear(n_in, n_out):
    return n_in * n_out + n_out


BN = 2  # scale and shift per channel


@pytest.mark.parametrize("bits", [12, 48])
def test_ddhnet_parameter_count_matches_the_architecture(bits):
    group = 4
    expected = (_conv(3, 20, 3) + BN * 20                 # conv1 + BN
                + _conv(20, 40, 2) + BN * 40              # conv2 + BN
                + _conv(40, 60, 2) + BN * 60              # conv3 + BN
                + 2 * 2 * (60 * 2 * 2) * 80 + 80 * 2 * 2  # locally connected: 4 positions' filters, bias per position
                + BN * 80                                 # its BN
                + _linear(60 * 3 * 3 + 80 * 2 * 2, group * bits) + BN * group * bits  # merged 860 -> 4K
                + bits * (group + 1)                      # divide-and-encode: K Linear(4, 1)
                + BN * bits)                              # hash BN
    assert expected == 90980 + 3459 * bits  # the figure in models/ddhnet.py
    assert _trainable(DDHNet(bits)) == expected
    assert {12: 132488, 48: 257012}[bits] == expected


@pytest.mark.parametrize("bits", [12, 48])
def test_ddahnet_parameter_count_matches_the_architecture(bits):
    net = DDAHNet(bits)
    deconv = _conv  # ConvTranspose2d(cin, cout, 3): cin * cout * 9 + cout as well
    attention = (_conv(3, 32, 2) + BN * 32 + _conv(32, 64, 2) + BN * 64 + _conv(64, 128, 2) + BN * 128
                 + _conv(128, 128, 1) + BN * 128
                 + deconv(128, 64, 3) + BN * 64 + deconv(64, 32, 3) + BN * 32 + deconv(32, 16, 3)
                 + _conv(16, 1, 1))                       # bn3 (16 channels) is frozen and unused
    trunk = (_conv(3, 32, 3) + BN * 32 + _conv(32, 64, 2) + BN * 64 + _conv(64, 128, 2) + BN * 128
             + _conv(128, 256, 2) + BN * 256
             + _linear(1152, 512) + _linear(512, 128) + _linear(1024, 512) + _linear(512, 256)
             + _linear(2176, 1024) + BN * 1024 + _linear(1024, bits) + BN * bits)
    parts = net.branch_parameters()
    assert sum(p.numel() for p in parts["attention"]) == attention == 155873
    assert sum(p.numel() for p in parts["trunk"]) == trunk == 3717760 + 1027 * bits
    assert _trainable(net) == attention + trunk
    # the two parts split the trainable parameters, each once
    ids = [id(p) for p in parts["attention"] + parts["trunk"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters() if p.requires_grad}


def test_locally_connected_matches_a_naive_loop():
    torch.manual_seed(0)
    layer = LocallyConnected2d(5, 7, 2, input_size=4).double()
    layer.bias.data.normal_()
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (3, 7, 3, 3)
    naive = torch.zeros_like(out)
    for i in range(3):
        for j in range(3):
            patch = x[:, :, i:i + 2, j:j + 2]                  # (B, in, k, k)
            w = layer.weight[i, j]                            # (out, in, k, k): this position's own filters
            for o in range(7):
                naive[:, o, i, j] = (patch * w[o]).sum((1, 2, 3)) + layer.bias[o, i, j]
    torch.testing.assert_close(out, naive, rtol=1e-12, atol=1e-12)
    # channels_last input (the training loop's layout) gives the same result
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), naive)
    small = LocallyConnected2d(2, 3, 2, input_size=3).double()
    assert torch.autograd.gradcheck(small, (torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True),))


def test_locally_connected_does_not_share_weights():
    layer = LocallyConnected2d(1, 1, 1, input_size=2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1, 1, 1, 1))
        layer.bias.zero_()
    out = layer(torch.ones(1, 1, 2, 2))
    assert out.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 2, 2\)"):
        layer(torch.ones(1, 1, 3, 3))


def test_divide_and_encode_matches_a_naive_loop():
    torch.manual_seed(1)
    module = DivideAndEncode(5, 4).double()
    module.bias.data.normal_()
    x = torch.randn(6, 20, dtype=torch.float64)
    naive = torch.stack([x[:, 4 * k:4 * k + 4] @ module.weight[k] + module.bias[k] for k in range(5)], 1)
    torch.testing.assert_close(module(x), naive, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backbone", ["ddhnet", "ddahnet"])
def test_shapes_dtypes_and_inference(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, 12)
    x = torch.randn(4, 3, 32, 32)
    train_out = model.train()(x)
    assert train_out.dtype == torch.float32
    assert train_out.shape == ((4, 24) if backbone == "ddahnet" else (4, 12))  # DDAH: both branches
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (4, 12) and out.dtype == torch.float32
    if backbone == "ddhnet":
        assert out.abs().max() < 1  # tanh
    assert infer_backbone(model.state_dict()) == (backbone, 12)
    assert DEFAULT_IMAGE_SIZE[backbone] == 32
    check_image_size(backbone, 32)
    with pytest.raises(ValueError, match="takes 32x32 inputs"):
        check_image_size(backbone, 64)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, 32, 32\)"):
        model(torch.randn(2, 3, 28, 28))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(x[:2].contiguous(memory_format=torch.channels_last)).float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ddahnet_eval_output_is_the_attention_branch():
    torch.manual_seed(0)
    net = DDAHNet(8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        mask = net.attention_map(x)
        assert mask.shape == (3, 1, 32, 32)
        flat = mask.flatten(1)
        torch.testing.assert_close(flat.amin(1), torch.zeros(3))
        torch.testing.assert_close(flat.amax(1), torch.ones(3))
        torch.testing.assert_close(net(x), net.hash_codes(x * mask))


def test_bad_code_lengths():
    for cls in (DDHNet, DDAHNet):
        for bits in (0, -3, 1.5, True):
            with pytest.raises(ValueError, match="positive integer"):
                cls(bits)
