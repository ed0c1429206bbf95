"""DPSH (methods/dpsh.py): the loss against a double loop over the paper's objective, hand-derived
values, gradcheck, no host reads in a step, and the memory bank (update, checkpoint, restore)."""
import math

import pytest
import torch

import methods.dpsh as dpsh_module
from host_reads import HostReads
from methods.dpsh import DPSH, pairwise_likelihood, quantization_error

N, C, K, B = 10, 3, 6, 4


def case(seed):
    """A small training set (N labels), a random bank, a batch (codes, labels, index); float64."""
    g = torch.Generator().manual_seed(seed)
    train_labels = torch.randint(0, C, (N,), generator=g)
    train_labels[:C] = torch.arange(C)  # every class present
    bank = torch.randn(N, K, generator=g, dtype=torch.float64)
    index = torch.randperm(N, generator=g)[:B]
    codes = torch.randn(B, K, generator=g, dtype=torch.float64)
    return train_labels, bank, index, codes


def make(train_labels, bank=None, **hparams):
    method = DPSH(C, K, train_labels=train_labels, **hparams).double()
    if bank is not None:
        method.bank.copy_(bank)
    return method


def paper_objective(codes, index, bank, train_labels, eta):
    """The paper's J restricted to the batch rows, as plain loops (float64):
    sum_ij [log(1 + exp(Theta_ij)) - s_ij Theta_ij] + eta sum_i ||b_i - u_i||^2,
    Theta_ij = 1/2 u_i^T U_j, with the bank rows of the batch replaced by the batch codes."""
    u = codes.tolist()
    rows = bank.tolist()
    for i, j in enumerate(index.tolist()):
        rows[j] = u[i]
    labels = train_labels.tolist()
    likelihood = 0.0
    for i in range(len(u)):
        yi = labels[index[i]]
        for j in range(len(rows)):
            theta = 0.5 * sum(a * b for a, b in zip(u[i], rows[j]))
            s = 1.0 if yi == labels[j] else 0.0
            likelihood += math.log(1.0 + math.exp(theta)) - s * theta
    quant = 0.0
    for i in range(len(u)):
        for a in u[i]:
            b = 1.0 if a > 0 else -1.0
            quant += (b - a) ** 2
    return likelihood, quant, likelihood + eta * quant


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eta", [10.0, 0.5])
def test_terms_equal_paper_double_loop(seed, eta):
    train_labels, bank, index, codes = case(seed)
    method = make(train_labels, bank, eta=eta)
    terms = method(codes, train_labels[index], index)
    likelihood, quant, objective = paper_objective(codes, index, bank, train_labels, eta)
    # documented normalisation: the batch part of J divided by B * N
    assert terms["likelihood"].item() == pytest.approx(likelihood / (B * N), rel=1e-12)
    assert terms["quant"].item() == pytest.approx(quant / B, rel=1e-12)
    assert terms["total"].item() == pytest.approx(objective / (B * N), rel=1e-12)
    assert set(terms) == {"likelihood", "quant", "total"}
    assert all(t.dim() == 0 for t in terms.values())


def test_hand_derived_values():
    # N = 3: samples 0 and 1 share identity 0, sample 2 is identity 1; batch = sample 0.
    train_labels = torch.tensor([0, 0, 1])
    method = DPSH(2, 4, train_labels=train_labels).double()
    method.bank.copy_(torch.tensor([[0.0] * 4, [1.0] * 4, [-1.0] * 4], dtype=torch.float64))
    u = torch.ones(1, 4, dtype=torch.float64)
    terms = method(u, torch.tensor([0]), torch.tensor([0]))
    # Theta = 1/2 * 4 = 2 with itself (s=1) and sample 1 (s=1): log(1+e^2) - 2 = log(1+e^-2);
    # Theta = -2 with sample 2 (s=0): log(1+e^-2). All three pairs give log(1+e^-2) = 0.126928...
    assert terms["likelihood"].item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-14)
    assert terms["quant"].item() == 0.0
    assert terms["total"].item() == pytest.approx(0.12692801104297263, rel=1e-12)
    # batch = sample 1 (identity 0) with u = 0.5: ||b - u||^2 = 4 * 0.25 = 1. Row 1 then holds u:
    # Theta_11 = 1/2 * 4 * 0.25 = 0.5 (s=1); row 0 is zero and row 2 orthogonal to u: Theta = 0 -> log 2
    method.bank.copy_(torch.tensor([[0.0] * 4, [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]],
                                   dtype=torch.float64))
    u = torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    terms = method(u, torch.tensor([0]), torch.tensor([1]))
    expected = (math.log1p(math.exp(0.5)) - 0.5 + 2 * math.log(2.0)) / 3
    assert terms["likelihood"].item() == pytest.approx(expected, rel=1e-14)
    assert terms["quant"].item() == pytest.approx(1.0, rel=1e-14)
    assert terms["total"].item() == pytest.approx(expected + 10.0 / 3 * 1.0, rel=1e-14)


def test_gradcheck_wrt_codes():
    train_labels, bank, index, codes = case(3)
    codes = codes + 0.2 * codes.sign()  # keep away from sign(u) jumps at 0
    labels = train_labels[index]
    bank = bank.clone()
    bank[index] = codes.detach()

    def total(u):
        return pairwise_likelihood(u, labels, bank, train_labels) + 10.0 / N * quantization_error(u)

    assert torch.autograd.gradcheck(total, (codes.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


def test_gradient_is_that_of_the_batch_rows_against_a_constant_bank():
    # d/du_i of mean_ij [softplus(Theta_ij) - s_ij Theta_ij] = sum_j (sigmoid(Theta_ij) - s_ij) U_j / (2 B N)
    train_labels, bank, index, codes = case(4)
    method = make(train_labels, bank, eta=0.0)
    u = codes.clone().requires_grad_()
    method(u, train_labels[index], index)["total"].backward()
    full = bank.clone()
    full[index] = codes
    theta = 0.5 * codes @ full.t()
    s = (train_labels[index][:, None] == train_labels[None, :]).double()
    expected = (torch.sigmoid(theta) - s) @ full / (2 * B * N)
    torch.testing.assert_close(u.grad, expected, rtol=1e-12, atol=1e-14)


def test_step_reads_nothing_back_to_the_host(monkeypatch):
    # the label/index range checks read only CPU tensors (skipped on a GPU); everything else must not read
    monkeypatch.setattr(dpsh_module, "check_inputs", lambda *a: None)
    train_labels, _, index, codes = case(5)
    method = DPSH(C, K, train_labels=train_labels)
    u = codes.float().requires_grad_()
    labels = train_labels[index]
    with HostReads() as seen:
        terms = method(u, labels, index)
        terms["total"].backward()
    assert seen.found == []
    assert torch.isfinite(terms["total"]) and torch.isfinite(u.grad).all()


def test_memory_bank_update_checkpoint_and_restore():
    train_labels, bank, index, codes = case(6)
    method = make(train_labels, bank)
    method(codes, train_labels[index], index)
    expected = bank.clone()
    expected[index] = codes
    torch.testing.assert_close(method.bank, expected, rtol=0, atol=0)   # rows at index, others untouched
    state = method.state_dict()
    assert list(state) == ["bank"]                      # train_labels is a non-persistent buffer
    assert "train_labels" in dict(method.named_buffers())
    fresh = make(train_labels)
    assert fresh.bank.abs().sum() == 0                  # zeros at the start, as in the references
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.bank, expected, rtol=0, atol=0)
    # the restored method computes the same loss as the original on the next batch
    nxt = torch.randn(B, K, dtype=torch.float64)
    other = torch.tensor([0, 5, 7, 9])
    a = method(nxt, train_labels[other], other)["total"]
    b = fresh(nxt, train_labels[other], other)["total"]
    assert a.item() == b.item()


def test_bank_follows_dtype_and_labels_stay_int64():
    method = DPSH(C, K, train_labels=torch.arange(N) % C)
    assert method.bank.dtype == torch.float32 and method.bank.shape == (N, K)
    method = method.double()
    assert method.bank.dtype == torch.float64 and method.train_labels.dtype == torch.int64
    # float32 codes against a float64 bank still work (the bank is cast to the codes' dtype)
    terms = method(torch.randn(2, K), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert terms["total"].dtype == torch.float32


def test_stable_for_large_codes():
    train_labels, bank, index, codes = case(7)
    method = make(train_labels, 1e3 * bank)
    u = (1e3 * codes).requires_grad_()
    terms = method(u, train_labels[index], index)
    terms["total"].backward()
    assert torch.isfinite(terms["total"]) and torch.isfinite(u.grad).all()
    assert terms["likelihood"].item() > 1e3    # log(1 + exp(x)) ~ x, not inf


def test_defaults_and_declarations():
    assert DPSH.name == "dpsh"
    assert DPSH.hyperparameters["eta"].default == 10.0
    assert DPSH.recipe == {}
    assert set(DPSH.unsupported) == {"ddp"}


def test_errors():
    labels = torch.arange(N) % C
    with pytest.raises(ValueError, match="train_labels"):
        DPSH(C, K)
    with pytest.raises(ValueError, match="train_labels must lie"):
        DPSH(C, K, train_labels=torch.tensor([0, 1, C]))
    with pytest.raises(ValueError, match="integer"):
        DPSH(C, K, train_labels=torch.zeros(4))
    with pytest.raises(ValueError, match="eta"):
        DPSH(C, K, train_labels=labels, eta=-1.0)
    method = DPSH(C, K, train_labels=labels)
    codes, y = torch.randn(2, K), labels[:2]
    with pytest.raises(ValueError, match="needs index"):
        method(codes, y)
    with pytest.raises(ValueError, match="index must lie"):
        method(codes, y, torch.tensor([0, N]))
    with pytest.raises(ValueError, match="columns"):
        method(torch.randn(2, K + 1), y, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie"):
        method(codes, torch.tensor([0, C]), torch.tensor([0, 1]))
