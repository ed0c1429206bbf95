"""DSDH (methods/dsdh.py): loss terms against the paper's sums written as loops, the paper's
gradient, gradcheck, the DCC B-step and the closed-form W-step, host reads, state round trip."""
import itertools
import math

import pytest
import torch

import methods.dsdh as dsdh
from host_reads import HostReads
from methods.dsdh import (DSDH, classify_loss, dcc, dcc_bit_step, discrete_objective, pair_likelihood,
                          quantization_loss, ridge_weights)


def small_method(seed=0, n=6, classes=3, bits=4, **hparams):
    torch.manual_seed(seed)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1][:n]) % classes
    return DSDH(classes, bits, labels, **hparams), labels


# ---------------------------------------------------------------- loss terms, by hand


def naive_terms(codes, labels, bank, bank_labels, targets, weights, mu, nu, eta):
    """The paper's sums over the batch rows, written as plain Python loops."""
    b, n, k = len(codes), len(bank), len(codes[0])
    c = len(weights[0])
    pair = 0.0
    for i in range(b):
        for j in range(n):
            theta = 0.5 * sum(codes[i][q] * bank[j][q] for q in range(k))
            s = 1.0 if labels[i] == bank_labels[j] else 0.0
            pair += math.log(1.0 + math.exp(theta)) - s * theta
    fit = quant = 0.0
    for i in range(b):
        for col in range(c):
            y = 1.0 if labels[i] == col else 0.0
            fit += (y - sum(weights[q][col] * targets[i][q] for q in range(k))) ** 2
        quant += sum((targets[i][q] - codes[i][q]) ** 2 for q in range(k))
    reg = sum(w * w for row in weights for w in row)
    likelihood, classify, quant = pair / (b * n), fit / b, quant / b
    total = 2 * likelihood + (mu * classify + eta * quant + nu * reg / n) / n
    return {"likelihood": likelihood, "classify": classify, "quant": quant, "reg": reg, "total": total}


def test_pair_likelihood_hand_case():
    # one sample against a bank of two: theta = 1/2 <u, U_j> = 1 and -1; s = 1 then 0
    codes = torch.tensor([[1.0, 1.0]])
    bank = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    value = pair_likelihood(codes, torch.tensor([0]), bank, torch.tensor([0, 1]), 2)
    expected = ((math.log(1 + math.e) - 1.0) + math.log(1 + math.exp(-1.0))) / 2
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_forward_terms_equal_the_papers_sums():
    mu, nu, eta = 0.7, 0.3, 2.5
    method, train_labels = small_method(mu=mu, nu=nu, eta=eta)
    gen = torch.Generator().manual_seed(3)
    method.U.copy_(torch.randn(6, 4, generator=gen))
    method.B.copy_(torch.where(torch.randn(6, 4, generator=gen) > 0, 1.0, -1.0))
    method.W.copy_(torch.randn(4, 3, generator=gen))
    codes = torch.randn(3, 4, generator=gen)
    index = torch.tensor([4, 0, 2])
    labels = train_labels[index]
    method.train()
    terms = method(codes, labels, index)
    bank = method.U.clone()
    assert torch.equal(bank[index], codes)  # the memory bank took the batch's codes
    expected = naive_terms(codes.tolist(), labels.tolist(), bank.tolist(), train_labels.tolist(),
                           method.B[index].tolist(), method.W.tolist(), mu, nu, eta)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].dim() == 0
        assert terms[key].item() == pytest.approx(value, rel=1e-5), key


def test_gradient_is_the_papers():
    # d total / d u_i = [sum_j (sigmoid(Theta_ij) - s_ij) U_j + 2 eta (u_i - b_i)] / (B N)
    eta = 1.5
    method, train_labels = small_method(eta=eta)
    gen = torch.Generator().manual_seed(5)
    method.U.copy_(torch.randn(6, 4, generator=gen))
    codes = torch.randn(2, 4, generator=gen, requires_grad=True)
    index = torch.tensor([1, 3])
    labels = train_labels[index]
    method(codes, labels, index)["total"].backward()
    bank, targets = method.U, method.B[index]
    theta = 0.5 * codes.detach() @ bank.t()
    s = (labels[:, None] == train_labels[None, :]).float()
    paper = (torch.sigmoid(theta) - s) @ bank + 2 * eta * (codes.detach() - targets)
    torch.testing.assert_close(codes.grad, paper / (2 * 6), rtol=1e-5, atol=1e-7)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    bank_labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    labels = torch.tensor([2, 0, 1])
    targets = torch.where(torch.randn(3, 4, generator=gen, dtype=torch.float64) > 0, 1.0, -1.0)
    assert torch.autograd.gradcheck(lambda u: pair_likelihood(u, labels, bank, bank_labels, 3), (codes,))
    assert torch.autograd.gradcheck(lambda u: quantization_loss(u, targets), (codes,))
    # the whole method in eval mode (the bank is not written, so the function of codes is fixed)
    method, train_labels = small_method()
    method = method.double().eval()
    method.U.copy_(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    index = torch.tensor([5, 1, 2])
    assert torch.autograd.gradcheck(lambda u: method(u, train_labels[index], index)["total"], (codes,))


def test_classify_loss_without_one_hot():
    gen = torch.Generator().manual_seed(1)
    targets = torch.where(torch.randn(5, 4, generator=gen) > 0, 1.0, -1.0)
    weights = torch.randn(4, 6, generator=gen)
    labels = torch.tensor([0, 5, 2, 2, 3])
    dense = torch.nn.functional.one_hot(labels, 6).float()
    expected = (dense - targets @ weights).pow(2).sum(1).mean()
    torch.testing.assert_close(classify_loss(targets, labels, weights), expected)


def test_eval_mode_leaves_the_bank_alone():
    method, train_labels = small_method()
    method.eval()
    before = method.U.clone()
    method(torch.randn(2, 4), train_labels[:2], torch.tensor([0, 1]))
    assert torch.equal(method.U, before)


# ---------------------------------------------------------------- W-step


def test_w_step_is_the_ridge_solution():
    gen = torch.Generator().manual_seed(2)
    codes = torch.where(torch.randn(40, 5, generator=gen) > 0, 1.0, -1.0)
    labels = torch.randint(0, 4, (40,), generator=gen)
    ratio = 0.37
    weights = ridge_weights(codes.double(), labels, 4, ratio)
    y = torch.nn.functional.one_hot(labels, 4).double()
    b = codes.double()
    # the same W from the normal equations and from least squares on the augmented system
    torch.testing.assert_close(weights, torch.linalg.solve(b.t() @ b + ratio * torch.eye(5, dtype=b.dtype), b.t() @ y))
    stacked = torch.cat([b, math.sqrt(ratio) * torch.eye(5, dtype=b.dtype)])
    target = torch.cat([y, torch.zeros(5, 4, dtype=b.dtype)])
    torch.testing.assert_close(weights, torch.linalg.lstsq(stacked, target).solution)
    # it minimises mu ||Y - B W||^2 + nu ||W||^2 (ratio = nu/mu): zero gradient there
    w = weights.clone().requires_grad_(True)
    ((y - b @ w).pow(2).sum() + ratio * w.pow(2).sum()).backward()
    assert w.grad.abs().max() < 1e-9
    assert ridge_weights(codes, labels, 4, ratio).dtype == torch.float32


# ---------------------------------------------------------------- B-step (DCC)


def random_problem(seed, n=30, bits=4, classes=3, eta_over_mu=0.8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    bank = torch.randn(n, bits, generator=gen, dtype=dtype)
    weights = torch.randn(bits, classes, generator=gen, dtype=dtype)
    codes = torch.where(torch.randn(n, bits, generator=gen) > 0, 1.0, -1.0).to(dtype)
    target = weights.t()[labels] + eta_over_mu * bank
    return codes, weights, target, labels, bank


def per_sample_objective(codes, weights, target):
    """``||W^T b_i||^2 - 2 b_i^T p_i`` per sample: the B sub-problem, separable over samples."""
    return (codes @ weights).pow(2).sum(1) - 2 * (codes * target).sum(1)


def test_b_step_objective_is_the_papers_up_to_a_constant():
    # mu ||Y - B W||^2 + eta ||B - U||^2 = mu (||B W||^2 - 2 tr(B^T P)) + const, P = Y W^T + eta/mu U
    mu, eta = 0.6, 1.7
    codes, weights, target, labels, bank = random_problem(0, eta_over_mu=eta / mu)
    other = torch.where(torch.randn(codes.shape, generator=torch.Generator().manual_seed(9)) > 0, 1.0, -1.0).double()
    full = [discrete_objective(b, weights, labels, bank, mu, 0.0, eta) for b in (codes, other)]
    reduced = [mu * per_sample_objective(b, weights, target).sum() for b in (codes, other)]
    torch.testing.assert_close(full[0] - full[1], reduced[0] - reduced[1])


def test_each_bit_step_is_its_exact_minimiser():
    codes, weights, target, _, _ = random_problem(1, n=200)
    gram = weights @ weights.t()
    codes_t, target_t = codes.t().contiguous(), target.t().contiguous()
    for k in range(codes.shape[1]):
        row = dcc_bit_step(codes_t, k, gram, target_t)
        assert set(row.unique().tolist()) <= {-1.0, 1.0}
        plus, minus = codes.clone(), codes.clone()
        plus[:, k], minus[:, k] = 1.0, -1.0
        best = torch.minimum(per_sample_objective(plus, weights, target), per_sample_objective(minus, weights, target))
        chosen = codes.clone()
        chosen[:, k] = row
        torch.testing.assert_close(per_sample_objective(chosen, weights, target), best)
        codes_t[k] = row
        codes = chosen


def test_dcc_never_increases_and_ends_at_a_coordinatewise_minimum():
    for seed in range(5):
        codes, weights, target, _, _ = random_problem(seed, n=100, bits=6)
        start = per_sample_objective(codes, weights, target).sum()
        one, _ = dcc(codes, weights, target, 1)
        out, sweeps = dcc(codes, weights, target, 50)
        values = [per_sample_objective(b, weights, target).sum() for b in (one, out)]
        assert values[0] <= start + 1e-9 and values[1] <= values[0] + 1e-9
        assert sweeps < 50  # converged: a sweep changed no bit
        assert set(out.unique().tolist()) == {-1.0, 1.0}
        final = per_sample_objective(out, weights, target)
        for k in range(codes.shape[1]):  # no single-bit flip lowers any sample's objective
            flipped = out.clone()
            flipped[:, k] *= -1
            assert (per_sample_objective(flipped, weights, target) >= final - 1e-9).all()


def brute_force(weights, target):
    """The global minimiser of the B sub-problem over all 2^K codes, per sample."""
    bits = weights.shape[0]
    table = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=weights.dtype)
    cost = (table @ weights).pow(2).sum(1)[None, :] - 2 * target @ table.t()  # (N, 2^K)
    return table[cost.argmin(1)], cost.min(1).values


def test_dcc_against_brute_force_k4():
    # in general DCC reaches a coordinate-wise minimum: never below the global one
    for seed in range(5):
        codes, weights, target, _, _ = random_problem(seed, n=300, bits=4)
        out, _ = dcc(codes, weights, target, 50)
        _, best = brute_force(weights, target)
        assert (per_sample_objective(out, weights, target) >= best - 1e-9).all()
    # when W's rows are orthogonal the bits decouple and one sweep finds the global minimiser
    codes, weights, target, _, _ = random_problem(7, n=300, bits=4, classes=6)
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    weights = (q * torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)).t()  # (4, 6), W W^T diagonal
    target = target + 0.3
    out, _ = dcc(codes, weights, target, 1)
    exact, best = brute_force(weights, target)
    torch.testing.assert_close(per_sample_objective(out, weights, target), best)
    assert torch.equal(out, exact)


def test_dcc_ties_keep_the_current_bit():
    codes = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    weights = torch.zeros(2, 3)
    out, sweeps = dcc(codes, weights, torch.zeros(2, 2), 10)  # every argument is 0
    assert torch.equal(out, codes) and sweeps == 1


def test_epoch_end_lowers_the_discrete_objective():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (120,))
    method = DSDH(5, 8, labels, mu=1.0, nu=0.1, eta=3.0)
    centers = torch.randn(5, 8)
    method.U.copy_(centers[labels] + 0.3 * torch.randn(120, 8))
    values = [method.objective()]
    for _ in range(3):
        method.epoch_end()
        values.append(method.objective())
        assert 1 <= method.last_sweeps <= method.dcc_iter
    assert all(b <= a + 1e-3 for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]
    assert set(method.B.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(method.W, ridge_weights(method.B, labels, 5, 0.1))
    # with a bank of class-separated codes the codes follow it: B = sign(U) for nearly all bits
    assert (method.B == torch.sign(method.U)).float().mean() > 0.95


# ---------------------------------------------------------------- contract


def test_forward_and_backward_read_nothing_back(monkeypatch):
    # the label and index range checks read them only when they are on the CPU; skipped on a GPU
    monkeypatch.setattr(dsdh, "check_inputs", lambda *a: None)
    method, train_labels = small_method(n=8)
    codes = torch.randn(4, 4, requires_grad=True)
    index = torch.tensor([7, 2, 0, 5])
    with HostReads() as seen:
        terms = method(codes, train_labels[index], index)
        terms["total"].backward()
    assert seen.found == []
    assert torch.isfinite(terms["total"]) and codes.grad.abs().sum() > 0


def test_state_dict_round_trip():
    method, train_labels = small_method(seed=0)
    method.U.copy_(torch.randn(6, 4))
    method.epoch_end()
    state = method.state_dict()
    assert set(state) == {"U", "B", "W"}  # train_labels is non-persistent: it comes from the data
    fresh, _ = small_method(seed=1)
    assert not torch.equal(fresh.B, method.B)
    fresh.load_state_dict(state)
    for key in ("U", "B", "W"):
        assert torch.equal(getattr(fresh, key), getattr(method, key))
    assert torch.equal(fresh.train_labels, train_labels)


def test_seeded_construction_is_reproducible_and_defaults():
    a, _ = small_method(seed=4)
    b, _ = small_method(seed=4)
    assert torch.equal(a.B, b.B) and torch.equal(a.W, b.W)
    assert set(a.B.unique().tolist()) == {-1.0, 1.0} and torch.equal(a.U, torch.zeros(6, 4))
    assert a.hparams == {"mu": 1.0, "nu": 0.1, "eta": 55.0, "dcc_iter": 10}
    assert DSDH.recipe == {} and "ddp" in DSDH.unsupported and DSDH.name == "dsdh"


def test_errors():
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="train_labels"):
        DSDH(3, 4)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        DSDH(3, 4, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integers"):
        DSDH(3, 4, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        DSDH(3, 4, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be > 0"):
        DSDH(3, 4, labels, mu=0.0)
    method = DSDH(3, 4, labels)
    with pytest.raises(ValueError, match="index"):
        method(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="columns"):
        method(torch.randn(2, 5), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        method(torch.randn(2, 4), torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"index must lie in \[0, 2\]"):
        method(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="int64"):
        method(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1], dtype=torch.int32))
    assert DSDH(3, 4, [0, 1, 2, 2]).num_train == 4  # a list of labels is accepted
