"""DCWH (methods/dcwh.py): terms against a naive loop from the paper's equations, the reference's
scaling, gradcheck, no host reads, the mean-center schedule, and state restored on resume."""
import io
import math

import pytest
import torch

import methods.dcwh
from host_reads import HostReads
from methods.dcdh import pull_loss
from methods.dcwh import DCWH, cubic_loss, vertex_loss

# a hand-made case: 5 samples, 3 classes, 4 bits; values beyond +-1.1 on both sides and an exact 0
CODES = [[0.5, -1.5, 1.2, 0.0],
         [1.3, 0.7, -0.2, -1.1],
         [-0.9, 2.0, 0.1, 0.4],
         [0.3, -0.3, -1.25, 1.05],
         [-2.2, 0.6, 0.9, -0.8]]
LABELS = [0, 2, 1, 0, 2]
CENTERS = [[1.0, -1.0, 1.0, -1.0],
           [-1.0, 1.0, 0.0, 1.0],
           [0.5, 0.5, -0.5, -0.5]]


def naive_terms(codes, labels, centers, inv_var=0.5, bound=1.1):
    """The paper's terms as plain loops: p_iy = N(u_i; m_y, s^2 I) / sum_c N(u_i; m_c, s^2 I) with
    s^2 = 1/inv_var; cubic = sum_k max(0, |u_ik| - bound); vertex = ||sgn(u_i) - u_i||^2; means over i."""
    s2 = 1.0 / inv_var
    pull = cubic = vertex = 0.0
    for u, y in zip(codes, labels):
        dens = [math.exp(-sum((a - m) ** 2 for a, m in zip(u, c)) / (2 * s2)) for c in centers]
        pull -= math.log(dens[y] / sum(dens))
        cubic += sum(max(0.0, abs(a) - bound) for a in u)
        vertex += sum(((1.0 if a > 0 else -1.0) - a) ** 2 for a in u)
    n = len(codes)
    return pull / n, cubic / n, vertex / n


def authors_transcription(codes, bound=1.1):
    """The reference's arithmetic, literally: (10 * loss_cubic + 0.01 * loss_l3) / B with
    loss_cubic = sum relu(-1.1 - u) + sum relu(u - 1.1) / B and loss_l3 = sum (sign u - u)^2 / B.
    Returns (loss_cubic / B, loss_l3 / B) — what multiplies 10 and 0.01 in its total."""
    n = len(codes)
    lower = sum(max(0.0, -bound - a) for u in codes for a in u)
    upper = sum(max(0.0, a - bound) for u in codes for a in u)
    l3 = sum((math.copysign(1.0, a) - a) ** 2 for u in codes for a in u) / n  # no zeros in its case
    return (lower + upper / n) / n, l3 / n


def make(mode, **kw):
    torch.manual_seed(0)
    method = DCWH(3, 4, centers=mode, **kw).double()
    with torch.no_grad():
        method.centers.copy_(torch.tensor(CENTERS, dtype=torch.float64))
    return method


@pytest.mark.parametrize("mode", ["mean", "learned"])
def test_terms_equal_naive_loop(mode):
    method = make(mode)
    terms = method(torch.tensor(CODES, dtype=torch.float64), torch.tensor(LABELS))
    pull, cubic, vertex = naive_terms(CODES, LABELS, CENTERS)
    assert set(terms) == {"pull", "cubic", "vertex", "total"}
    assert all(t.dim() == 0 for t in terms.values())
    assert terms["pull"].item() == pytest.approx(pull, rel=1e-12)
    assert terms["cubic"].item() == pytest.approx(cubic, rel=1e-12)
    assert terms["vertex"].item() == pytest.approx(vertex, rel=1e-12)
    assert terms["total"].item() == pytest.approx(pull + 10 * cubic + 0.01 * vertex, rel=1e-12)
    # the hand values: cubic = (0.4 + 0.1 + 0.2 + 0.9 + 1.1 + 0.15) / 5, the 0 counts as -1 in vertex
    assert cubic == pytest.approx(2.85 / 5)


def test_inv_var_is_pull_loss_sigma_and_other_weights():
    method = make("learned", inv_var=2.0, weight_cubic=3.0, weight_vertex=0.5, cubic_bound=1.0)
    terms = method(torch.tensor(CODES, dtype=torch.float64), torch.tensor(LABELS))
    pull, cubic, vertex = naive_terms(CODES, LABELS, CENTERS, inv_var=2.0, bound=1.0)
    assert terms["pull"].item() == pytest.approx(pull, rel=1e-12)
    assert terms["pull"].item() == pytest.approx(pull_loss(torch.tensor(CODES, dtype=torch.float64),
                                                           torch.tensor(LABELS),
                                                           torch.tensor(CENTERS, dtype=torch.float64),
                                                           2.0).item(), rel=1e-12)
    assert terms["total"].item() == pytest.approx(pull + 3 * cubic + 0.5 * vertex, rel=1e-12)


def test_authors_scaling_reproduces_the_reference_arithmetic():
    codes = [[a if a != 0 else 0.25 for a in row] for row in CODES]  # torch.sign(0) = 0 there
    method = make("mean", authors_scaling=True)
    terms = method(torch.tensor(codes, dtype=torch.float64), torch.tensor(LABELS))
    cubic, vertex = authors_transcription(codes)
    pull, ours_cubic, ours_vertex = naive_terms(codes, LABELS, CENTERS)
    assert terms["cubic"].item() == pytest.approx(cubic, rel=1e-12)
    assert terms["vertex"].item() == pytest.approx(vertex, rel=1e-12)
    assert terms["total"].item() == pytest.approx(pull + 10 * cubic + 0.01 * vertex, rel=1e-12)
    assert vertex == pytest.approx(ours_vertex / 5)        # vertex weight 0.01 / B in effect
    assert cubic != pytest.approx(ours_cubic)              # the upper side is divided by B again
    x = torch.tensor([[2.0, -2.0]], dtype=torch.float64).repeat(4, 1)   # B = 4, 0.9 over on each side
    assert cubic_loss(x, 1.1, True).item() == pytest.approx(0.9 + 0.9 / 4)
    assert cubic_loss(x, 1.1).item() == pytest.approx(1.8)
    assert vertex_loss(x, True).item() == pytest.approx(vertex_loss(x).item() / 4)


def safe_codes(seed, n=4, k=4):
    """Codes away from the kinks of relu(|u| - 1.1), |u| and sign (so finite differences are valid)."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.where(torch.rand(n, k, generator=g) < 0.5,
                      0.2 + 0.7 * torch.rand(n, k, generator=g), 1.3 + 0.7 * torch.rand(n, k, generator=g))
    sign = torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).double()


@pytest.mark.parametrize("authors_scaling", [False, True])
def test_gradcheck_codes_mean_mode(authors_scaling):
    torch.manual_seed(1)
    method = DCWH(3, 4, centers="mean", authors_scaling=authors_scaling).double().eval()  # no accumulation
    labels = torch.tensor([0, 1, 2, 0])
    codes = safe_codes(0).requires_grad_()
    f = lambda u: tuple(method(u, labels)[k] for k in ("pull", "cubic", "vertex", "total"))
    assert torch.autograd.gradcheck(f, (codes,))
    assert not method.centers.requires_grad


def test_gradcheck_codes_and_centers_learned_mode():
    torch.manual_seed(1)
    method = DCWH(3, 4, centers="learned").double()
    labels = torch.tensor([0, 1, 2, 0])
    codes = safe_codes(2).requires_grad_()
    centers = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(u, m):
        terms = torch.func.functional_call(method, {"centers": m}, (u, labels))
        return terms["pull"], terms["total"]
    assert torch.autograd.gradcheck(f, (codes, centers))
    terms = method(codes, labels)
    terms["total"].backward()
    assert method.centers.grad is not None and torch.isfinite(method.centers.grad).all()


@pytest.mark.parametrize("mode", ["mean", "learned"])
def test_forward_backward_and_epoch_end_read_nothing_back(monkeypatch, mode):
    # the label-range check reads labels only when they are on the CPU; on a GPU it is skipped
    monkeypatch.setattr(methods.dcwh, "check_batch", lambda *a: None)
    torch.manual_seed(0)
    method = DCWH(8, 12, centers=mode)
    codes = torch.randn(16, 12, requires_grad=True)
    labels = torch.randint(0, 8, (16,))
    with HostReads() as seen:
        terms = method(codes, labels, torch.arange(16))
        terms["total"].backward()
        with torch.no_grad():
            method.epoch_end()
            method.epoch_end()
    assert seen.found == []
    assert codes.grad is not None and torch.isfinite(terms["total"])


def run_epoch(method, batches):
    for codes, labels in batches:
        method(codes, labels)["total"].backward()
    with torch.no_grad():
        method.epoch_end()


def epoch_batches(seed, classes=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        labels = torch.tensor(classes)[torch.randint(0, len(classes), (7,), generator=g)]
        out.append((torch.randn(7, 4, generator=g, requires_grad=True), labels))
    return out


def naive_means(batches, num_classes=3):
    sums = [[0.0] * 4 for _ in range(num_classes)]
    counts = [0] * num_classes
    for codes, labels in batches:
        for u, y in zip(codes.tolist(), labels.tolist()):
            counts[y] += 1
            sums[y] = [s + a for s, a in zip(sums[y], u)]
    return [[s / counts[c] for s in sums[c]] if counts[c] else None for c in range(num_classes)]


@pytest.mark.parametrize("update_every", [1, 2, 3])
def test_mean_centers_updated_at_the_right_epochs(update_every):
    torch.manual_seed(0)
    method = DCWH(3, 4, centers="mean", update_every=update_every)
    assert dict(method.named_parameters()) == {}
    for epoch in range(1, 7):
        before = method.centers.clone()
        # class 2 is absent in epochs 2 and 5: its center must be kept
        batches = epoch_batches(epoch, classes=(0, 1) if epoch in (2, 5) else (0, 1, 2))
        run_epoch(method, batches)
        assert int(method.epochs_done) == epoch
        assert float(method.class_sums.abs().sum()) == 0 and float(method.class_counts.sum()) == 0
        if epoch % update_every == 0:
            for c, mean in enumerate(naive_means(batches)):
                expected = before[c] if mean is None else torch.tensor(mean)
                torch.testing.assert_close(method.centers[c], expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(method.centers, before)


def test_eval_mode_does_not_accumulate():
    method = DCWH(3, 4, centers="mean")
    method.eval()
    codes, labels = epoch_batches(0)[0]
    method(codes, labels)
    assert float(method.class_counts.sum()) == 0


def test_all_reduce_sums_the_accumulators_before_the_means():
    torch.manual_seed(0)
    method = DCWH(3, 4, centers="mean", update_every=1)
    other_sums, other_counts = torch.randn(3, 4), torch.tensor([2.0, 0.0, 5.0])  # "another process"
    calls = []

    def fake_all_reduce(t):
        calls.append(t.shape)
        t.add_(other_sums if t.dim() == 2 else other_counts)

    method.all_reduce = fake_all_reduce
    batches = epoch_batches(3, classes=(0, 1))
    mine_sums = torch.zeros(3, 4)
    mine_counts = torch.zeros(3)
    for codes, labels in batches:
        mine_sums.index_add_(0, labels, codes.detach())
        mine_counts.index_add_(0, labels, torch.ones(len(labels)))
    before = method.centers.clone()
    run_epoch(method, batches)
    assert sorted(calls) == sorted([torch.Size([3, 4]), torch.Size([3])])
    total_counts = mine_counts + other_counts
    expected = (mine_sums + other_sums) / total_counts[:, None]
    torch.testing.assert_close(method.centers[[0, 1, 2]], expected[[0, 1, 2]])
    assert total_counts[2] > 0 and not torch.equal(method.centers[2], before[2])


def test_state_dict_round_trip_restores_accumulators_and_counter():
    torch.manual_seed(0)
    method = DCWH(3, 4, centers="mean", update_every=2)
    run_epoch(method, epoch_batches(1))
    for codes, labels in epoch_batches(2):          # half-way through epoch 2
        method(codes, labels)
    state = method.state_dict()
    assert set(state) == {"centers", "class_sums", "class_counts", "epochs_done"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    resumed = DCWH(3, 4, centers="mean", update_every=2)
    assert not torch.equal(resumed.centers, method.centers)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert int(resumed.epochs_done) == 1 and float(resumed.class_counts.sum()) == 14
    last = epoch_batches(3)
    for m in (method, resumed):
        for codes, labels in last:
            m(codes, labels)
        with torch.no_grad():
            m.epoch_end()                               # end of epoch 2: an update on both
    torch.testing.assert_close(resumed.centers, method.centers, rtol=0, atol=0)
    assert int(resumed.epochs_done) == 2
    assert set(DCWH(3, 4, centers="learned").state_dict()) == {"centers"}


def test_declarations_and_errors():
    assert DCWH.name == "dcwh" and DCWH.recipe == {} and DCWH.unsupported == {}
    method = DCWH(3, 4)
    assert method.hparams == {"inv_var": 0.5, "weight_cubic": 10.0, "weight_vertex": 0.01, "cubic_bound": 1.1,
                              "centers": "mean", "update_every": 2, "authors_scaling": False}
    with pytest.raises(ValueError, match="centers"):
        DCWH(3, 4, centers="fixed")
    with pytest.raises(ValueError, match="update_every"):
        DCWH(3, 4, update_every=0)
    with pytest.raises(ValueError, match="inv_var"):
        DCWH(3, 4, inv_var=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        DCWH(1, 4)
    with pytest.raises(ValueError, match="labels must lie"):
        method(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="codes must have shape"):
        method(torch.randn(4), torch.tensor([0, 1, 2, 0]))
