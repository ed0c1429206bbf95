"""OrthoHash: the loss against a naive loop over the reference's formulas (cos and arc margins,
the three quantization terms), gradcheck, no host reads, the codebook (seeded, persistent) and
the optional method-owned BatchNorm."""
import math

import pytest
import torch
import torch.nn as nn

import methods.base
from host_reads import HostReads
from methods.csq import min_hamming_distance
from methods.orthohash import OrthoHash, cosine_logits, margin_logits, quantization_error
from utils.metrics import binarize

# a hand-made case: 3 classes, 4 bits
CODEBOOK = torch.tensor([[1., 1., -1., -1.], [-1., 1., -1., 1.], [1., -1., 1., 1.]], dtype=torch.float64)
CODES = torch.tensor([[0.3, -1.2, 0.1, 2.5], [-0.7, 0.4, -3.0, 0.9], [1.1, 0.2, -0.5, -0.1],
                      [-2.0, -0.3, 0.8, 1.7], [0.05, 1.5, -1.1, -0.6]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 1, 0])


def naive_terms(v, labels, codebook, s, m, margin_type, quan_type):
    """Cross-entropy over margin logits and the quantization term, by loops over samples/classes."""
    b, k = v.shape
    c = codebook.shape[0]
    ce = quant = 0.0
    for i in range(b):
        vi = [float(x) for x in v[i]]
        norm = math.sqrt(sum(x * x for x in vi))
        logits = []
        for j in range(c):
            oj = [float(x) for x in codebook[j]]
            cos = sum(a * o for a, o in zip(vi, oj)) / (norm * math.sqrt(sum(o * o for o in oj)))
            if margin_type == "cos":
                logits.append(s * (cos - (m if j == labels[i] else 0.0)))
            else:
                cos = max(-0.99999, min(0.99999, cos))
                logits.append(s * math.cos(math.acos(cos) + (m if j == labels[i] else 0.0)))
        top = max(logits)
        ce += top + math.log(sum(math.exp(z - top) for z in logits)) - logits[labels[i]]
        sign = [1.0 if x > 0 else -1.0 for x in vi]
        if quan_type == "cs":
            quant += 1 - sum(a * t for a, t in zip(vi, sign)) / (norm * math.sqrt(k))
        elif quan_type == "l1":
            quant += sum(abs(a - t) for a, t in zip(vi, sign)) / k
        else:
            quant += sum((a - t) ** 2 for a, t in zip(vi, sign)) / k
    return ce / b, quant / b


def make(**hp):
    method = OrthoHash(3, 4, **hp).double()
    method.codebook.copy_(CODEBOOK)
    return method


@pytest.mark.parametrize("margin_type", ["cos", "arc"])
@pytest.mark.parametrize("quan_type", ["cs", "l1", "l2"])
def test_terms_equal_naive_loop(margin_type, quan_type):
    ce, quant = naive_terms(CODES, LABELS, CODEBOOK, 8.0, 0.2, margin_type, quan_type)
    terms = make(margin_type=margin_type, quan_type=quan_type, quan=0.5)(CODES, LABELS)
    assert set(terms) == {"ce", "quant", "total"} and all(t.dim() == 0 for t in terms.values())
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert terms["quant"].item() == pytest.approx(quant, rel=1e-12)
    assert terms["total"].item() == pytest.approx(ce + 0.5 * quant, rel=1e-12)


def test_defaults_are_the_reference_ones():
    method = OrthoHash(3, 4)
    assert method.hparams == {"scale": 8.0, "margin": 0.2, "margin_type": "cos", "quan": 0.0, "quan_type": "cs",
                              "codebook": "bernoulli", "seed": 0, "method_bn": False}
    assert method.bn is None and not list(method.parameters()) and OrthoHash.recipe == {}
    terms = make()(CODES, LABELS)
    assert terms["total"].item() == terms["ce"].item()   # quan = 0: one loss


def test_margin_only_on_the_true_class():
    cos = cosine_logits(CODES, CODEBOOK)
    logits = margin_logits(cos, LABELS, 8.0, 0.2)
    shift = torch.zeros_like(cos)
    shift[torch.arange(5), LABELS] = 1.6
    torch.testing.assert_close(logits, 8.0 * cos - shift)
    torch.testing.assert_close(margin_logits(cos, LABELS, 8.0, 0.0, "arc"), 8.0 * cos.clamp(-0.99999, 0.99999))
    assert torch.equal(cosine_logits(torch.zeros(1, 4, dtype=torch.float64), CODEBOOK),
                       torch.zeros(1, 3, dtype=torch.float64))   # no NaN for a zero code


@pytest.mark.parametrize("hp", [dict(quan=0.5), dict(margin_type="arc", quan=0.3, quan_type="l2"),
                                dict(method_bn=True, quan=0.2)])
def test_gradcheck_float64(hp):
    method = make(**hp)
    u = CODES.clone().requires_grad_()
    fast = method.bn is not None   # BatchNorm couples the batch: the full Jacobian check is slow
    assert torch.autograd.gradcheck(lambda x: method(x, LABELS)["total"], (u,), eps=1e-6, atol=1e-8,
                                    fast_mode=fast)


@pytest.mark.parametrize("method_bn", [False, True])
def test_forward_backward_reads_nothing_back(monkeypatch, method_bn):
    monkeypatch.setattr(methods.base, "CHECK_VALUES", False)  # the CPU-only label range check reads
    method = OrthoHash(40, 24, quan=0.1, method_bn=method_bn)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(16, 24, generator=g).requires_grad_()
    labels = torch.randint(0, 40, (16,), generator=g)
    with HostReads() as seen:
        terms = method(u, labels, torch.arange(16))
        terms["total"].backward()
    assert seen.found == []
    assert torch.isfinite(terms["total"]) and u.grad.abs().sum() > 0


def test_training_drives_sign_to_the_codewords():
    method = OrthoHash(10, 24, codebook="maxmin")
    labels = torch.arange(40) % 10
    u = (0.1 * torch.randn(40, 24, generator=torch.Generator().manual_seed(1))).requires_grad_()
    opt = torch.optim.SGD([u], lr=20.0)
    for _ in range(20):
        opt.zero_grad()
        method(u, labels)["total"].backward()
        opt.step()
    # the cosine to the own codeword keeps rising (CE with s = 8 never saturates): every code is
    # nearest to its class's codeword in Hamming distance, and almost every bit already agrees
    bits = binarize(u.detach())
    assert torch.equal((bits @ method.codebook.t()).argmax(1), labels)
    assert (bits == method.codebook[labels]).float().mean() > 0.95


def test_codebook_is_seeded_bernoulli_and_persistent():
    a, b, c = OrthoHash(299, 24), OrthoHash(299, 24), OrthoHash(299, 24, seed=1)
    assert a.codebook.shape == (299, 24) and a.codebook.dtype == torch.float32
    assert set(a.codebook.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a.codebook, b.codebook) and not torch.equal(a.codebook, c.codebook)
    assert abs(a.codebook.mean().item()) < 0.05                      # Bernoulli(0.5) bits
    assert a.min_distance == min_hamming_distance(a.codebook)
    state = a.state_dict()
    assert list(state) == ["codebook"]
    c.load_state_dict(state)
    assert torch.equal(c.codebook, a.codebook) and c.min_distance == a.min_distance


def test_maxmin_codebook_is_farther_apart():
    plain, spaced = OrthoHash(299, 24), OrthoHash(299, 24, codebook="maxmin")
    assert spaced.min_distance >= 7 > plain.min_distance
    dup = OrthoHash(299, 12)   # 12 bits: random codewords collide (about 11 pairs expected)
    assert dup.min_distance == 0 and OrthoHash(299, 12, codebook="maxmin").min_distance == 2


def test_method_bn_is_a_trainable_parameter_set_saved_with_the_codebook():
    method = OrthoHash(5, 12, method_bn=True)
    assert isinstance(method.bn, nn.BatchNorm1d) and method.bn.momentum == 0.1
    assert [n for n, _ in method.named_parameters()] == ["bn.weight", "bn.bias"]
    assert set(method.state_dict()) == {"codebook", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                        "bn.num_batches_tracked"}
    u = 3.0 + 2.0 * torch.randn(32, 12, generator=torch.Generator().manual_seed(2))
    method(u, torch.arange(32) % 5)
    assert method.bn.running_mean.abs().sum() > 0                     # statistics follow training batches
    twin = OrthoHash(5, 12, method_bn=True)
    twin.load_state_dict(method.state_dict())
    torch.testing.assert_close(twin.bn.running_mean, method.bn.running_mean)


def test_hyperparameter_errors():
    with pytest.raises(ValueError, match="expected one of"):
        OrthoHash(10, 12, margin_type="sphere")
    with pytest.raises(ValueError, match="must be > 0"):
        OrthoHash(10, 12, scale=0.0)
    with pytest.raises(ValueError, match="expected one of"):
        OrthoHash(10, 12, codebook="O")
    with pytest.raises(ValueError, match="columns"):
        OrthoHash(10, 12)(torch.zeros(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown quantization type"):
        quantization_error(CODES, "l3")
    with pytest.raises(ValueError, match="unknown margin type"):
        margin_logits(cosine_logits(CODES, CODEBOOK), LABELS, 8.0, 0.2, "sphere")


@pytest.mark.parametrize("hp", [{}, dict(method_bn=True, margin_type="arc", quan=0.1)])
def test_loss_traces_without_graph_breaks(monkeypatch, hp):
    monkeypatch.setattr(methods.base, "CHECK_VALUES", False)
    method = OrthoHash(6, 12, **hp)
    explained = torch._dynamo.explain(lambda u, y: method(u, y)["total"])(
        torch.randn(16, 12, requires_grad=True), torch.arange(16) % 6)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
