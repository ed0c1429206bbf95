"""The DCDH loss against the authors' values, a naive per-sample loop, and gradcheck."""
import math

import numpy as np
import pytest
import torch

from conftest import FIXTURES, needs_fixtures
from methods.dcdh import (DCDH, pull_loss, push_loss, quantization_loss, regression_codes,
                              squared_distances)


def naive_terms(x, labels, centers, sigma, eta):
    """Eqs. 5, 7, 8-10 written as plain loops over samples and class pairs (float64)."""
    x, centers = x.double(), centers.double()
    n, k = x.shape
    c = centers.shape[0]
    pull = 0.0
    for i in range(n):
        d = [float(((x[i] - centers[j]) ** 2).sum()) for j in range(c)]
        logits = [-sigma / 2 * dj for dj in d]
        m = max(logits)
        log_z = m + math.log(sum(math.exp(l - m) for l in logits))
        pull -= logits[int(labels[i])] - log_z
    pull /= n
    unit = [centers[j] / centers[j].norm() for j in range(c)]
    push = 0.0
    for a in range(c):
        for b in range(c):
            if a != b:
                push += math.log1p(math.exp(k / 2 * float(unit[a] @ unit[b])))
    push /= c * (c - 1)
    s = torch.where(x > 0, 1.0, -1.0).double()
    y = torch.zeros(n, c, dtype=torch.float64)
    y[torch.arange(n), labels] = 1
    w = torch.linalg.pinv(y.t() @ y) @ y.t() @ s
    b = torch.where(y @ w + eta * x > 0, 1.0, -1.0).double()
    quant = float(((x - b) ** 2).sum()) / n
    return pull, push, quant, w, b


def case(seed=0, n=10, c=4, k=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    centers = torch.randn(c, k, generator=g, dtype=torch.float64)
    return x, labels, centers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_terms_equal_naive_loop(seed):
    x, labels, centers = case(seed)
    pull, push, quant, w, b = naive_terms(x, labels, centers, 0.25, 0.01)
    assert pull_loss(x, labels, centers, 0.25).item() == pytest.approx(pull, rel=1e-10)
    assert push_loss(centers).item() == pytest.approx(push, rel=1e-10)
    assert quantization_loss(x, labels, 4, 0.01).item() == pytest.approx(quant, rel=1e-10)
    w2, b2 = regression_codes(x, labels, 4, 0.01)
    torch.testing.assert_close(w2, w)   # per-class mean == pinv(Y^T Y) Y^T sign(h)
    torch.testing.assert_close(b2, b)


def test_per_class_mean_equals_pinv_with_absent_class():
    x = torch.tensor([[0.5, -1.0], [0.2, 0.3], [-0.4, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2])          # class 1 absent from the batch
    w, _ = regression_codes(x, labels, 3, 0.01)
    # hand-derived: class 0 -> mean([1,-1],[1,1]) = [1, 0]; class 1 -> 0; class 2 -> [-1, 1]
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]], dtype=torch.float64))
    _, _, _, w_pinv, _ = naive_terms(x, labels, torch.randn(3, 2, dtype=torch.float64), 0.25, 0.01)
    torch.testing.assert_close(w, w_pinv)


def test_gradcheck():
    x, labels, centers = case(3, n=6, c=3, k=5)
    x.requires_grad_(True)
    centers.requires_grad_(True)

    def f(x, centers):
        return (pull_loss(x, labels, centers, 0.25) + 0.1 * push_loss(centers)
                + 0.01 * quantization_loss(x, labels, 3, 0.01))
    assert torch.autograd.gradcheck(f, (x, centers))


def test_push_constant_is_authors_diagonal():
    _, _, centers = case(4, c=5)
    diff = push_loss(centers, authors_constant=True) - push_loss(centers)
    assert diff.item() == pytest.approx(math.log(2) / 4, rel=1e-12)


def test_pull_is_stable_for_far_centers():
    # The authors' exp()/sum form underflows to a constant here; log_softmax keeps a gradient.
    x = torch.full((4, 12), 30.0, requires_grad=True)
    centers = -torch.full((3, 12), 30.0) + torch.arange(3.0)[:, None]
    loss = pull_loss(x, torch.tensor([0, 1, 2, 0]), centers, 0.25)
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad.abs().sum() > 0


def test_squared_distances_nonnegative():
    x = torch.randn(5, 3)
    torch.testing.assert_close(squared_distances(x, x), torch.cdist(x, x) ** 2, atol=1e-4, rtol=1e-4)
    assert (squared_distances(x, x) >= 0).all()


def test_labels_out_of_range_is_clear_error():
    crit = DCDH(3, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        crit(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="at least 2"):
        DCDH(1, 4)


def test_state_dict_is_authors_format():
    sd = DCDH(299, 12).state_dict()
    assert list(sd) == ["centers"] and tuple(sd["centers"].shape) == (299, 12)


@needs_fixtures
def test_matches_authors_loss_case():
    z = np.load(f"{FIXTURES}/loss_case.npz")
    c = len(z["centers"])
    crit = DCDH(c, z["x"].shape[1], sigma=float(z["sigma"]), inner_param=float(z["inner_param"]),
                    eta=float(z["eta"]), authors_push_constant=True)
    with torch.no_grad():
        crit.centers.copy_(torch.from_numpy(z["centers"]))
    x = torch.tensor(z["x"], requires_grad=True)
    labels = torch.from_numpy(z["labels"])
    terms = crit(x, labels)
    # the authors' value is pull + lambda * push (their DualClasswiseLoss); quant is separate
    dual = terms["pull"] + crit.inner_param * terms["push"]
    assert dual.item() == pytest.approx(float(z["loss"]), abs=1e-5)
    assert terms["quant"].item() == pytest.approx(float(z["quant"]), abs=1e-5)
    w, b = regression_codes(x.detach(), labels, c, float(z["eta"]))
    np.testing.assert_allclose(w.numpy(), z["W"], atol=1e-6)
    np.testing.assert_allclose(b.numpy(), z["B"], atol=0)
    dual.backward()
    np.testing.assert_allclose(x.grad.numpy(), z["grad_x"], atol=1e-5)
    np.testing.assert_allclose(crit.centers.grad.numpy(), z["grad_centers"], atol=1e-5)
    # without the authors' constant the value differs by exactly lambda * log 2 / (C - 1)
    plain = DCDH(c, z["x"].shape[1], inner_param=float(z["inner_param"]))
    with torch.no_grad():
        plain.centers.copy_(crit.centers)
        t2 = plain(x, labels)
    gap = float(z["loss"]) - (t2["pull"] + plain.inner_param * t2["push"]).item()
    assert gap == pytest.approx(0.1 * math.log(2) / (c - 1), abs=1e-5)
