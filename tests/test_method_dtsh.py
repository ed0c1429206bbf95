"""DTSH (methods/dtsh.py): the loss against a triple loop over the paper's triplet likelihood,
hand-derived values, the triplet sampler, gradcheck, no host reads in a step, and the memory bank."""
import math

import pytest
import torch

import methods.dtsh as dtsh_module
from host_reads import HostReads
from methods.dpsh import quantization_error
from methods.dtsh import DTSH, triplet_loss

N, C, K, B = 10, 3, 8, 5
TRAIN_LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 2])


def make(train_labels=TRAIN_LABELS, bank=None, **hparams):
    method = DTSH(C, K, train_labels=train_labels, **hparams).double()
    if bank is not None:
        method.bank.copy_(bank)
    return method


def case(seed):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(N, K, generator=g, dtype=torch.float64)
    index = torch.randperm(N, generator=g)[:B]
    codes = torch.randn(B, K, generator=g, dtype=torch.float64)
    return bank, index, codes


def paper_triplet_mean(codes, bank, pos_idx, neg_idx, valid, alpha):
    """-(Theta_qp - Theta_qn - alpha) + log(1 + exp(Theta_qp - Theta_qn - alpha)), Theta_ij = 1/2 u_i^T U_j,
    as plain loops, averaged over each valid anchor's triplets and then over the valid anchors."""
    u, rows = codes.tolist(), bank.tolist()
    per_anchor = []
    for a in range(len(u)):
        if not valid[a]:
            continue
        total, count = 0.0, 0
        for p in pos_idx[a].tolist():
            for n in neg_idx[a].tolist():
                theta_qp = 0.5 * sum(x * y for x, y in zip(u[a], rows[p]))
                theta_qn = 0.5 * sum(x * y for x, y in zip(u[a], rows[n]))
                t = theta_qp - theta_qn - alpha
                total += -t + math.log(1.0 + math.exp(t))
                count += 1
        per_anchor.append(total / count)
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def naive_quant(codes):
    return sum((((1.0 if x > 0 else -1.0) - x) ** 2) for row in codes.tolist() for x in row) / len(codes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_terms_equal_paper_triple_loop(seed):
    bank, index, codes = case(seed)
    method = make(bank=bank, positives=3, negatives=4, lam=0.25)
    method.generator = torch.Generator().manual_seed(100 + seed)
    terms = method(codes, TRAIN_LABELS[index], index)
    # the same draws again, from the same seed, against the bank as forward left it
    pos_idx, neg_idx, valid = method.sample_triplets(TRAIN_LABELS[index], index,
                                                     torch.Generator().manual_seed(100 + seed))
    expected_bank = bank.clone()
    expected_bank[index] = codes
    torch.testing.assert_close(method.bank, expected_bank, rtol=0, atol=0)  # updated before the loss
    triplet = paper_triplet_mean(codes, expected_bank, pos_idx, neg_idx, valid.tolist(), K / 2)
    assert valid.tolist() == [1.0] * B
    assert terms["triplet"].item() == pytest.approx(triplet, rel=1e-12)
    assert terms["quant"].item() == pytest.approx(naive_quant(codes), rel=1e-12)
    assert terms["total"].item() == pytest.approx(triplet + 0.25 * naive_quant(codes), rel=1e-12)
    assert set(terms) == {"triplet", "quant", "total"}


def test_triplet_loss_equals_loop_with_invalid_anchors():
    bank, _, codes = case(3)
    g = torch.Generator().manual_seed(0)
    pos_idx, neg_idx = torch.randint(0, N, (B, 2), generator=g), torch.randint(0, N, (B, 3), generator=g)
    valid = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    got = triplet_loss(codes, bank, pos_idx, neg_idx, valid, 1.5)
    assert got.item() == pytest.approx(paper_triplet_mean(codes, bank, pos_idx, neg_idx, valid, 1.5), rel=1e-12)
    assert triplet_loss(codes, bank, pos_idx, neg_idx, torch.zeros(B), 1.5).item() == 0.0


def test_hand_derived_value():
    # N = 3: samples 0 and 1 share identity 0, sample 2 is identity 1. The only triplet of anchor 0
    # is (0, 1, 2) whatever is drawn. u_0 = U_1 = (1,1,1,1), U_2 = -u_0, K = 4, alpha = K/2 = 2:
    # Theta_qp = 2, Theta_qn = -2, t = 2 + 2 - 2 = 2, loss = -2 + log(1 + e^2) = log(1 + e^-2).
    method = DTSH(2, 4, train_labels=torch.tensor([0, 0, 1])).double()
    method.bank.copy_(torch.tensor([[0.0] * 4, [1.0] * 4, [-1.0] * 4], dtype=torch.float64))
    terms = method(torch.ones(1, 4, dtype=torch.float64), torch.tensor([0]), torch.tensor([0]))
    assert terms["triplet"].item() == pytest.approx(0.12692801104297263, rel=1e-12)
    assert terms["quant"].item() == 0.0
    assert terms["total"].item() == pytest.approx(0.12692801104297263, rel=1e-12)
    # u = 0.5: Theta_qp = 1, Theta_qn = -1, t = 0 -> log 2; quant = 4 * 0.25 = 1; lam = 100 / 22500
    terms = method(torch.full((1, 4), 0.5, dtype=torch.float64), torch.tensor([0]), torch.tensor([0]))
    assert terms["triplet"].item() == pytest.approx(math.log(2.0), rel=1e-14)
    assert terms["quant"].item() == pytest.approx(1.0, rel=1e-14)
    assert terms["total"].item() == pytest.approx(math.log(2.0) + 100 / 22500, rel=1e-14)


def test_sampler_draws_from_the_right_pools_uniformly():
    method = make(positives=400, negatives=600)
    index = torch.arange(N)
    labels = TRAIN_LABELS
    pos_idx, neg_idx, valid = method.sample_triplets(labels, index, torch.Generator().manual_seed(0))
    assert pos_idx.shape == (N, 400) and neg_idx.shape == (N, 600) and valid.tolist() == [1.0] * N
    for a in range(N):
        same = {j for j in range(N) if TRAIN_LABELS[j] == TRAIN_LABELS[a] and j != a}
        other = {j for j in range(N) if TRAIN_LABELS[j] != TRAIN_LABELS[a]}
        assert set(pos_idx[a].tolist()) == same        # every eligible positive, and nothing else
        assert set(neg_idx[a].tolist()) == other       # every eligible negative, and nothing else
        # uniform: each of m eligible samples gets about draws / m (tolerance ~ 6 sigma)
        for idx, pool in ((pos_idx[a], same), (neg_idx[a], other)):
            draws, m = idx.numel(), len(pool)
            counts = torch.bincount(idx, minlength=N)[sorted(pool)].double()
            sigma = math.sqrt(draws * (1 / m) * (1 - 1 / m))
            assert (counts - draws / m).abs().max().item() < 6 * sigma


def test_sampler_marks_anchors_without_a_positive_invalid():
    # identity 2 has a single sample (index 4): no positive other than itself
    train_labels = torch.tensor([0, 0, 1, 1, 2])
    method = DTSH(C, K, train_labels=train_labels)
    index = torch.tensor([4, 0, 2])
    pos_idx, neg_idx, valid = method.sample_triplets(train_labels[index], index, torch.Generator().manual_seed(1))
    assert valid.tolist() == [0.0, 1.0, 1.0]
    assert (pos_idx >= 0).all() and (pos_idx < 5).all() and (neg_idx >= 0).all() and (neg_idx < 5).all()
    assert set(pos_idx[1].tolist()) == {1} and set(pos_idx[2].tolist()) == {3}
    # a batch with no valid anchor: triplet term 0, finite gradient from the quantization term
    only = DTSH(2, K, train_labels=torch.tensor([0, 1])).double()
    u = torch.randn(2, K, dtype=torch.float64, requires_grad=True)
    terms = only(u, torch.tensor([0, 1]), torch.tensor([0, 1]))
    terms["total"].backward()
    assert terms["triplet"].item() == 0.0 and torch.isfinite(u.grad).all()


def test_gradcheck_wrt_codes():
    bank, index, codes = case(4)
    codes = codes + 0.2 * codes.sign()  # keep away from sign(u) jumps at 0
    g = torch.Generator().manual_seed(2)
    pos_idx, neg_idx = torch.randint(0, N, (B, 3), generator=g), torch.randint(0, N, (B, 4), generator=g)
    valid = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])

    def total(u):
        return triplet_loss(u, bank, pos_idx, neg_idx, valid, K / 2) + 0.3 * quantization_error(u)

    assert torch.autograd.gradcheck(total, (codes.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


def test_step_reads_nothing_back_to_the_host(monkeypatch):
    # the label/index range checks read only CPU tensors (skipped on a GPU); everything else must not read
    monkeypatch.setattr(dtsh_module, "check_inputs", lambda *a: None)
    method = DTSH(C, K, train_labels=TRAIN_LABELS)
    _, index, codes = case(5)
    u = codes.float().requires_grad_()
    with HostReads() as seen:
        terms = method(u, TRAIN_LABELS[index], index)
        terms["total"].backward()
    assert seen.found == []
    assert torch.isfinite(terms["total"]) and torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0


def test_memory_bank_update_checkpoint_and_restore():
    bank, index, codes = case(6)
    method = make(bank=bank)
    method(codes, TRAIN_LABELS[index], index)
    expected = bank.clone()
    expected[index] = codes
    torch.testing.assert_close(method.bank, expected, rtol=0, atol=0)
    state = method.state_dict()
    assert list(state) == ["bank"]          # labels and the class tables are non-persistent buffers
    assert {"train_labels", "class_order", "class_start", "class_count", "order_rank"} <= set(
        dict(method.named_buffers()))
    fresh = make()
    assert fresh.bank.abs().sum() == 0
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.bank, expected, rtol=0, atol=0)
    nxt, other = torch.randn(3, K, dtype=torch.float64), torch.tensor([1, 4, 8])
    method.generator, fresh.generator = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert method(nxt, TRAIN_LABELS[other], other)["total"].item() == \
        fresh(nxt, TRAIN_LABELS[other], other)["total"].item()


def test_class_tables():
    method = DTSH(C, K, train_labels=TRAIN_LABELS)
    assert method.class_count.tolist() == [4, 3, 3]
    assert method.class_start.tolist() == [0, 4, 7]
    assert TRAIN_LABELS[method.class_order].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert method.class_order[method.order_rank].tolist() == list(range(N))


def test_defaults_and_declarations():
    assert DTSH.name == "dtsh"
    h = DTSH.hyperparameters
    assert h["alpha_per_bit"].default == 0.5 and h["positives"].default == 50 and h["negatives"].default == 450
    assert h["lam"].default == pytest.approx(100 / 22500)
    assert DTSH.recipe == {} and set(DTSH.unsupported) == {"ddp"}
    assert DTSH(C, 12, train_labels=TRAIN_LABELS).alpha == 6.0


def test_errors():
    with pytest.raises(ValueError, match="train_labels"):
        DTSH(C, K)
    with pytest.raises(ValueError, match="positives"):
        DTSH(C, K, train_labels=TRAIN_LABELS, positives=0)
    method = DTSH(C, K, train_labels=TRAIN_LABELS)
    codes, y = torch.randn(2, K), TRAIN_LABELS[:2]
    with pytest.raises(ValueError, match="needs index"):
        method(codes, y)
    with pytest.raises(ValueError, match="index must lie"):
        method(codes, y, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="columns"):
        method(torch.randn(2, K - 1), y, torch.tensor([0, 1]))
