"""DDH's loss against naive loops, its gradient, its recipe, and whole steps on DDHNet and DFHNet
(and DCDH on DDHNet) with no host read."""
import math

import pytest
import torch

import methods.base
from engine.loop import training_step
from engine.recipes import build_optimizer, learning_rate, resolve_recipe
from host_reads import HostReads
from methods import METHODS, build_method
from methods.ddh import DDH
from models import build_model


def _naive_loss(codes, labels, weight, bias, weight_quant):
    b, k = len(codes), len(codes[0])
    ce = 0.0
    for i in range(b):
        scores = [sum(weight[c][j] * codes[i][j] for j in range(k)) + bias[c] for c in range(len(bias))]
        top = max(scores)
        ce += -(scores[labels[i]] - top - math.log(sum(math.exp(s - top) for s in scores)))
    quant = sum(abs(abs(codes[i][j]) - 1) for i in range(b) for j in range(k)) / (b * k)
    return ce / b, quant, ce / b + weight_quant * quant


def test_loss_matches_naive_loops():
    torch.manual_seed(0)
    method = DDH(5, 6, weight_quant=0.3).double()
    with torch.no_grad():
        method.classifier.bias.normal_()
    codes = torch.tanh(2 * torch.randn(7, 6, dtype=torch.float64))
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    terms = method(codes, labels)
    softmax, quant, total = _naive_loss(codes.tolist(), labels.tolist(), method.classifier.weight.tolist(),
                                        method.classifier.bias.tolist(), 0.3)
    assert terms["softmax"].item() == pytest.approx(softmax, rel=1e-12)
    assert terms["quant"].item() == pytest.approx(quant, rel=1e-12)
    assert terms["total"].item() == pytest.approx(total, rel=1e-12)
    assert DDH(5, 6).weight_quant == 0.01  # the reference's LOSS_01_LAYER_PARAMS


def test_gradcheck_codes_and_classifier():
    torch.manual_seed(1)
    method = DDH(4, 5).double()
    codes = (torch.rand(6, 5, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()  # away from the kinks at 0, +-1
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    assert torch.autograd.gradcheck(lambda c: method(c, labels)["total"], (codes,))
    method(codes, labels)["total"].backward()
    assert method.classifier.weight.grad.abs().sum() > 0  # the classifier trains with the method group


def test_recipe_is_the_references():
    r = resolve_recipe("ddhnet", DDH.recipe)
    assert (r["optimizer"], r["lr"], r["weight_decay"], r["epochs"], r["patience"]) == ("adam", 0.001, 1e-4, 200, 50)
    assert learning_rate(r, 0) == learning_rate(r, 199) == 0.001  # constant (Keras Adam, no schedule)
    r = resolve_recipe("dfhnet", DDH.recipe, epochs=30)  # the recipe follows the method to DFHNet
    assert (r["lr"], r["epochs"], r["patience"]) == (0.001, 30, 50)


def test_bad_batches():
    method = DDH(3, 4)
    with pytest.raises(ValueError, match="4 columns"):
        method(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        method(torch.zeros(2, 4), torch.tensor([0, 3]))


@pytest.mark.parametrize("name,backbone", [("ddh", "ddhnet"), ("ddh", "dfhnet"), ("dcdh", "ddhnet")])
def test_whole_step_reads_nothing_back(monkeypatch, name, backbone):
    """The loss on DDH's own network, on DFHNet, and DCDH on DDHNet: one step each in fp32 and bf16."""
    monkeypatch.setattr(methods.base, "CHECK_VALUES", False)
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16) % 4
    model = build_model(backbone, 12).to(memory_format=torch.channels_last)
    method = build_method(name, 4, 12)
    opt = build_optimizer(resolve_recipe(backbone, METHODS[name].recipe), model, method)
    training_step(model, method, opt, images, labels)
    before = [p.detach().clone() for p in model.parameters()]
    with HostReads() as seen:
        for amp in (False, True):
            terms = training_step(model, method, opt, images, labels, amp=amp)
    assert seen.found == []
    assert torch.isfinite(terms["total"])
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
