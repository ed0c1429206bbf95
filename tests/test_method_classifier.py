"""The classifier-code baseline: the loss against a naive loop, gradcheck, the codewords (CSQ's
construction), and the encode step (exactly one code per class: the predicted class's codeword),
also when rebuilt from a checkpoint (``methods.checkpoint_encoder``)."""
import math

import pytest
import torch

from methods import HashingMethod, build_method, checkpoint_encoder
from methods.classifier import Classifier
from methods.csq import gilbert_varshamov, make_centers, min_hamming_distance
from utils.metrics import binarize

WORDS = torch.tensor([[1., 1., -1., -1.], [-1., 1., -1., 1.], [1., -1., 1., 1.]], dtype=torch.float64)
CODES = torch.tensor([[0.3, -1.2, 0.0, 2.5], [-0.7, 0.4, -3.0, 0.9], [1.1, 0.2, -0.5, -0.1],
                      [-2.0, -0.3, 0.8, 1.7], [0.05, 1.5, -1.1, -0.6]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 2, 1, 0])


def make(**hp):
    method = Classifier(3, 4, **hp).double()
    method.codewords.copy_(WORDS)
    return method


def naive_ce(u, labels, words, scale):
    """mean_i -log softmax(scale <u_i, w_c> / sqrt(K))_{y_i}, by loops."""
    total = 0.0
    for i in range(u.shape[0]):
        scores = [scale * sum(float(u[i, j]) * float(w[j]) for j in range(u.shape[1])) / math.sqrt(u.shape[1])
                  for w in words]
        top = max(scores)
        log_z = top + math.log(sum(math.exp(s - top) for s in scores))
        total += log_z - scores[int(labels[i])]
    return total / u.shape[0]


@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_loss_equals_naive_loop(scale):
    terms = make(scale=scale)(CODES, LABELS)
    assert set(terms) == {"ce", "total"} and all(t.dim() == 0 for t in terms.values())
    assert terms["total"].item() == pytest.approx(naive_ce(CODES, LABELS, WORDS, scale), rel=1e-12)


def test_gradcheck_float64():
    method = make(scale=2.0)
    u = CODES.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: method(x, LABELS)["total"], (u,), eps=1e-6, atol=1e-8)


def test_codewords_are_csq_centers_and_far_apart():
    for c, k, kind in ((8, 16, "auto"), (40, 12, "auto"), (40, 12, "bernoulli")):
        m = Classifier(c, k, centers=kind, seed=3)
        assert torch.equal(m.codewords, make_centers(kind, c, k, 3))
        assert m.min_distance == min_hamming_distance(m.codewords)
    assert Classifier(8, 16).min_distance == 8          # Hadamard rows: K/2 apart
    assert Classifier(40, 12).min_distance >= gilbert_varshamov(40, 12) >= 3   # the greedy far-apart construction


def test_encode_gives_exactly_one_code_per_class():
    torch.manual_seed(0)
    m = Classifier(30, 20, seed=1)
    # each codeword as input scores its own class highest (<w, w> = K > <w, w'>): its own code
    assert torch.equal(m.encode(m.codewords * 0.3), m.codewords)
    assert len({tuple(r) for r in m.encode(m.codewords).tolist()}) == 30
    # any output: the codeword of the argmax class, so at most one distinct code per class
    u = torch.randn(500, 20)
    codes = m.encode(u)
    best = (u @ m.codewords.t()).argmax(1)
    assert torch.equal(codes, m.codewords[best])
    assert len({tuple(r) for r in codes.tolist()}) == len(set(best.tolist())) <= 30
    assert torch.equal(Classifier(30, 20, seed=1, scale=9.0).encode(u), codes)     # scale changes no code
    assert codes.dtype == u.dtype and set(codes.unique().tolist()) == {-1.0, 1.0}
    # a tie goes to the lowest class index
    two = Classifier(2, 4)
    two.codewords.copy_(torch.tensor([[1., 1., 1., 1.], [1., 1., -1., -1.]]))
    assert two.encode(torch.tensor([[1., 1., 0., 0.]])).tolist() == [[1., 1., 1., 1.]]


def test_checkpoint_encoder_rebuilds_the_saved_codewords():
    m = build_method("classifier", 6, 8, seed=2)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    saved["codewords"] = -saved["codewords"]              # the file's codewords win over a rebuilt set
    config = {"method": "classifier", "method_args": dict(m.hparams), "num_classes": 6, "bits": 8}
    encode = checkpoint_encoder(config, saved)
    u = torch.randn(40, 8)
    best = (u @ saved["codewords"].t()).argmax(1)
    assert torch.equal(encode(u), saved["codewords"][best])
    # methods keeping the default encode are not rebuilt: sign, 0 -> -1
    assert Classifier.encode is not HashingMethod.encode
    for name in ("dcdh", "dpsh", "future_method"):
        assert checkpoint_encoder({"method": name}, {}) is binarize
    with pytest.raises(ValueError, match="does not fit classifier"):
        checkpoint_encoder(config, {"codewords": torch.ones(5, 8)})
    with pytest.raises(ValueError, match="no num_classes"):
        checkpoint_encoder({"method": "classifier", "bits": 8}, saved)
