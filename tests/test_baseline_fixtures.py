"""Each baseline's loss against its reference implementation: the value and the gradient with
respect to the codes (float64) that the reference code computes on fixed inputs
(``../shared/fixtures/baselines/*.npz``; repositories, commits and hyperparameter mappings in the
README there), reproduced by this project's ``methods/*.py`` after the stated mappings.

Agreement is to 1e-12 relative (gradients: max abs difference over max |reference gradient|),
except where the float64 arithmetic itself differs, each bounded and explained where it is used:
``F.softplus`` returns x for x > 20 (an error below e^-20 per term) and CSQ's reference computes
``(1 + tanh u) / 2``, whose rounding grows as eps e^{2|u|} (the project's logits form does not).
"""
import os

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from methods.csq import CSQ, hadamard_applies, hadamard_centers
from methods.dcwh import DCWH
from methods.ddah import DDAH
from methods.ddh import DDH
from methods.dpsh import DPSH
from methods.dsdh import DSDH
from methods.dtsh import DTSH, triplet_loss
from methods.orthohash import OrthoHash

BASELINES = os.path.join(FIXTURES, "baselines")
pytestmark = pytest.mark.skipif(
    not os.path.isdir(BASELINES),
    reason=f"{BASELINES} is absent: the reference implementations' outputs are only in the development "
           "checkout's ../shared")

RTOL = 1e-12
SOFTPLUS_RTOL = 1e-9
"""For cases with a softplus argument above 20, where ``F.softplus`` is linear (error < e^-20)."""
EPS = np.finfo(np.float64).eps


def load(name):
    """(npz, sorted case tags) of a fixture file; a case tag is the first part of its keys."""
    z = np.load(os.path.join(BASELINES, name))
    return z, sorted({k.split("/")[0] for k in z.files if k.count("/") >= 1})


def getter(z, prefix):
    def get(key):
        return torch.from_numpy(z[f"{prefix}/{key}"])
    return get


def assert_close(value, grad, ref_value, ref_grad, rtol=RTOL):
    """Value to ``rtol`` relative; gradient to ``rtol`` of the reference gradient's largest entry."""
    value, ref_value = float(torch.as_tensor(value).detach()), float(ref_value)
    assert abs(value - ref_value) <= rtol * abs(ref_value), (value, ref_value)
    grad, ref_grad = np.asarray(grad), np.asarray(ref_grad)
    assert grad.shape == ref_grad.shape
    assert np.abs(grad - ref_grad).max() <= rtol * np.abs(ref_grad).max()


def value_and_grad(method, codes, labels, index=None, term="total"):
    """The method's ``term`` at ``codes`` (float64) and its gradient w.r.t. the codes."""
    u = codes.clone().requires_grad_(True)
    terms = method(u, labels, index)
    (g,) = torch.autograd.grad(terms[term], u)
    return terms, g


# ------------------------------------------------------------------------------ DPSH


def test_dpsh_matches_jiangqy_and_deephash():
    z, cases = load("dpsh.npz")
    assert len(cases) == 3
    for case in cases:
        get = getter(z, case)
        n, k = get("train_labels").shape[0], get("codes").shape[1]
        c = int(case.split("_C")[1].split("_")[0])
        # jiangqy: eta = lamda (both divide by num_train x batch); DeepHash: eta = alpha N / K
        for setting, eta in (("jiangqy_lamda10", 10.0), ("jiangqy_lamda50", 50.0), ("deephash_alpha0.1", 0.1 * n / k)):
            m = DPSH(c, k, train_labels=get("train_labels"), eta=eta).double()
            m.bank.copy_(get("bank0"))
            terms, g = value_and_grad(m, get("codes"), get("labels"), get("index"))
            theta = 0.5 * get("codes") @ m.bank.t()
            rtol = SOFTPLUS_RTOL if theta.abs().max() > 20 else RTOL
            assert_close(terms["total"], g, z[f"{case}/{setting}/loss"], z[f"{case}/{setting}/grad"], rtol)


# ------------------------------------------------------------------------------ DSDH


def dsdh_state(get, c, k, **hparams):
    m = DSDH(c, k, train_labels=get("train_labels"), **hparams).double()
    m.U.copy_(get("bank0"))
    m.B.copy_(get("B_state"))
    m.W.copy_(get("W_state"))
    return m


def test_dsdh_gradient_matches_the_authors_matlab_treezzz_and_deephash():
    z, cases = load("dsdh.npz")
    assert len(cases) == 2
    for case in cases:
        get = getter(z, case)
        n, k = get("train_labels").shape[0], get("codes").shape[1]
        c = get("W_state").shape[1]
        codes, labels, index = get("codes"), get("labels"), get("index")
        theta = 0.5 * codes @ torch.cat([get("bank0"), codes]).t()
        rtol = SOFTPLUS_RTOL if theta.abs().max() > 20 else RTOL
        # train.m: -dJ/dU / (B N) with the batch's B = the stored codes at index
        for eta in (55.0, 1.0):
            _, g = value_and_grad(dsdh_state(get, c, k, eta=eta), codes, labels, index)
            ref = z[f"{case}/matlab_eta{eta:g}/grad"]
            assert np.abs(g.numpy() - ref).max() <= rtol * np.abs(ref).max()
        # TreezzZ: half the gradient with eta_p = 2 N eta_T / K; its value is likelihood + eta_T quant / K
        for eta_t in (0.01, 55.0):
            eta_p = 2 * n * eta_t / k
            terms, g = value_and_grad(dsdh_state(get, c, k, eta=eta_p), codes, labels, index)
            value = terms["likelihood"] + eta_p * terms["quant"] / (2 * n)
            assert_close(value, g / 2, z[f"{case}/treezzz_eta{eta_t:g}/loss"], z[f"{case}/treezzz_eta{eta_t:g}/grad"],
                         rtol)
        # DeepHash (no quantization term): half the gradient at eta = 0; its value adds the
        # classification term and ||W||^2 as element means (constants for the codes)
        terms, g = value_and_grad(dsdh_state(get, c, k, eta=0.0), codes, labels, index)
        value = terms["likelihood"] + terms["classify"] / c + terms["reg"] / (k * c)
        assert_close(value, g / 2, z[f"{case}/deephash/loss"], z[f"{case}/deephash/grad"], rtol)


def test_dsdh_epoch_end_matches_treezzz_dcc_and_w_step():
    z, cases = load("dsdh.npz")
    for case in cases:
        get = getter(z, case)
        k, c = get("codes").shape[1], get("W_state").shape[1]
        # mu 1, nu 0.1, eta 55 (the project's defaults) and one DCC sweep per epoch, as TreezzZ runs
        m = dsdh_state(get, c, k, dcc_iter=1).train()
        m(get("codes"), get("labels"), get("index"))  # writes the batch into the bank
        m.epoch_end()
        assert torch.equal(m.B, get("treezzz_dcc_B"))
        assert (m.W - get("treezzz_W")).abs().max() <= RTOL * get("treezzz_W").abs().max()


# ------------------------------------------------------------------------------ DTSH


def test_dtsh_matches_the_authors_matlab_on_the_same_triplets():
    z, cases = load("dtsh.npz")
    assert len(cases) == 2
    for case in cases:
        get = getter(z, case)
        pos, neg = get("pos_idx"), get("neg_idx")
        b, k = get("codes").shape
        c = int(case.split("_C")[1].split("_")[0])
        per_anchor = pos.shape[1] * neg.shape[1]
        # the triplets the reference used are every (anchor, positive, negative) of these pools
        # (per anchor, negative-major)
        m1, m2 = pos.shape[1], neg.shape[1]
        expect = torch.stack([get("index")[:, None, None].expand(-1, m2, m1), pos[:, None, :].expand(-1, m2, -1),
                              neg[:, :, None].expand(-1, -1, m1)], -1).reshape(-1, 3)
        assert torch.equal(expect, get("triplets"))
        m = DTSH(c, k, train_labels=get("train_labels"), lam=100.0 / per_anchor,  # lam = eta / T
                 positives=pos.shape[1], negatives=neg.shape[1]).double()
        m.bank.copy_(get("bank0"))
        m.sample_triplets = lambda labels, index, generator=None: (pos, neg, torch.ones(b, dtype=torch.float64))
        terms, g = value_and_grad(m, get("codes"), get("labels"), get("index"))
        bank = m.bank
        t = 0.5 * (torch.einsum("bk,bmk->bm", get("codes"), bank[pos])[:, :, None]
                   - torch.einsum("bk,bmk->bm", get("codes"), bank[neg])[:, None, :]) - m.alpha
        rtol = SOFTPLUS_RTOL if t.abs().max() > 20 else RTOL
        assert abs(terms["triplet"].item() - z[f"{case}/matlab/triplet"]) <= rtol * z[f"{case}/matlab/triplet"]
        assert abs(terms["quant"].item() - z[f"{case}/matlab/quant"]) <= RTOL * z[f"{case}/matlab/quant"]
        ref = z[f"{case}/matlab/grad_eta100_scaled"]  # -dJ/dU / (2 B T) of train_triplet.m
        assert np.abs(g.numpy() - ref).max() <= rtol * np.abs(ref).max()


def test_dtsh_triplet_loss_matches_deephash():
    """DeepHash-pytorch: in-batch positives (self included) and negatives, ``u.u`` with alpha 5,
    plus ``(u - sign u)^2`` as a mean over B x K: ``triplet_loss(sqrt(2) u, sqrt(2) u, 5)`` per
    anchor averaged over the anchors that have both, plus ``quant / K``."""
    z, cases = load("dtsh.npz")
    for case in cases:
        get = getter(z, case)
        b, k = get("codes").shape
        labels = get("labels")
        for bank_detached, key in ((True, "grad_anchor_only"), (False, "grad_full")):
            u = get("codes").clone().requires_grad_(True)
            bank = (2 ** 0.5) * (u.detach() if bank_detached else u)
            losses, largest = [], 0.0
            for a in range(b):
                same = labels == labels[a]
                if same.all():
                    continue
                pos, neg = torch.nonzero(same).flatten()[None], torch.nonzero(~same).flatten()[None]
                losses.append(triplet_loss((2 ** 0.5) * u[a:a + 1], bank, pos, neg, torch.ones(1).double(), 5.0))
                inner = u.detach()[a] @ u.detach().t()  # the softplus argument is -(u.u_p - u.u_n - 5)
                largest = max(largest, (inner[pos][0, :, None] - inner[neg][0, None, :] - 5.0).abs().max().item())
            quant = (u - torch.where(u > 0, 1.0, -1.0)).pow(2).sum(1).mean()
            value = torch.stack(losses).mean() + quant / k
            (g,) = torch.autograd.grad(value, u)
            rtol = SOFTPLUS_RTOL if largest > 20 else RTOL
            assert_close(value, g, z[f"{case}/deephash/loss"], z[f"{case}/deephash/{key}"], rtol)


# ------------------------------------------------------------------------------ CSQ


def csq_exact_grad(codes, labels, centers, lam):
    """d total / d u of CSQ in 40-digit arithmetic (mpmath): ``[2 (sigmoid(2u) - t) +
    lam 2 (|tanh u| - 1) sign(u) (1 - tanh^2 u)] / (B K)``, t = (c + 1) / 2."""
    import mpmath
    mpmath.mp.dps = 40
    b, k = codes.shape
    t = (centers[labels] + 1) / 2
    out = np.empty((b, k))
    for i in range(b):
        for j in range(k):
            u = mpmath.mpf(float(codes[i, j]))
            th = mpmath.tanh(u)
            g = 2 * (1 / (1 + mpmath.exp(-2 * u)) - float(t[i, j])) \
                + lam * 2 * (abs(th) - 1) * mpmath.sign(u) * (1 - th ** 2)
            out[i, j] = float(g / (b * k))
    return out


def test_csq_matches_the_authors_and_deephash_where_their_tanh_form_is_exact():
    z, cases = load("csq.npz")
    assert len(cases) == 5
    for case in cases:
        get = getter(z, case)
        codes, labels, centers = get("codes"), get("labels"), get("centers")
        c, k = centers.shape
        b = codes.shape[0]
        if hadamard_applies(c, k):  # the reference's Sylvester centers are the project's auto ones
            assert torch.equal(hadamard_centers(c, k).double(), centers)
        # the reference's (1 + tanh u) / 2 carries an absolute rounding error of about eps: a
        # relative one of eps e^{2|u|} in the BCE and its gradient, per entry (divided by B K)
        rounding = 4 * EPS * np.exp(2 * np.abs(codes.numpy())) / (b * k)
        trusted = EPS * np.exp(2 * np.abs(codes.numpy())) < 1e-6  # fewer than 10 digits lost
        exact = None
        for setting, lam in (("authors_lambda2_0.0001", 1e-4), ("authors_lambda2_0.001", 1e-3),
                             ("authors_lambda2_0.05", 0.05), ("deephash", 1e-4)):
            m = CSQ(c, k, lambda_q=lam, centers="bernoulli").double()
            m.centers.copy_(centers)
            terms, g = value_and_grad(m, codes, labels)
            ref_value, ref_grad = float(z[f"{case}/{setting}/loss"]), z[f"{case}/{setting}/grad"]
            assert abs(terms["total"].item() - ref_value) <= RTOL * ref_value + rounding.sum()
            err = np.abs(g.numpy() - ref_grad)
            assert (err <= RTOL * np.abs(ref_grad).max() + rounding)[trusted].all()
            if not trusted.all():  # where the reference has lost its digits: the exact gradient
                exact = csq_exact_grad(codes.numpy(), labels.numpy(), centers.numpy(), lam)
                assert np.abs(g.numpy() - exact).max() <= RTOL * np.abs(exact).max()
    assert exact is not None  # the saturating case (scale 6) was met


# ------------------------------------------------------------------------------ DCWH


def test_dcwh_with_authors_scaling_matches_the_reference_as_run():
    z, cases = load("dcwh.npz")
    cases = [c for c in cases if c != "meancenters"]
    assert len(cases) == 3
    for case in cases:
        get = getter(z, case)
        c, k = get("centers").shape
        for inv_var in (1.0, 0.5):  # the reference as run uses 1 (its --inv_var never reaches the loss)
            m = DCWH(c, k, authors_scaling=True, inv_var=inv_var).double()
            m.centers.copy_(get("centers"))
            terms, g = value_and_grad(m, get("codes"), get("labels"))
            key = f"{case}/ref_invvar{inv_var:g}_noeps"  # the reference without its two 1e-6 guards
            assert_close(terms["total"], g, z[f"{key}/loss"], z[f"{key}/grad"])


def test_dcwh_mean_centers_after_two_epochs_match_the_reference():
    z, _ = load("dcwh.npz")
    get = getter(z, "meancenters")
    ref = get("ref_centers")
    c, k = ref.shape
    torch.manual_seed(0)
    m = DCWH(c, k).double().train()
    before = m.centers.clone()
    m.epoch_end()  # epoch 1: no update (every 2 epochs)
    m(get("epoch2_codes"), get("labels"))
    m.epoch_end()
    seen = torch.unique(get("labels"))
    assert torch.equal(seen, torch.arange(c - 1))  # the last class has no sample
    assert (m.centers[seen] - ref[seen]).abs().max() <= RTOL * ref[seen].abs().max()
    assert torch.isnan(ref[c - 1]).all()  # the reference leaves its row uninitialised
    assert torch.equal(m.centers[c - 1], before[c - 1])  # the project keeps the previous center


# ------------------------------------------------------------------------------ DDH, DDAH


def test_ddh_and_ddah_match_their_keras_and_pytorch_references():
    z, cases = load("ddh_ddah.npz")
    cases = sorted({key.split("/")[1] for key in z.files})
    assert len(cases) == 3
    for case in cases:
        get = getter(z, f"DDH/{case}")
        c, k = get("W").shape
        m = DDH(c, k).double()
        with torch.no_grad():
            m.classifier.weight.copy_(get("W"))
            m.classifier.bias.copy_(get("b"))
        # Keras clips the softmax at 1e-7: no true-class probability here is that small
        assert torch.softmax(get("codes") @ get("W").t() + get("b"), 1).gather(1, get("labels")[:, None]).min() > 1e-7
        terms, g = value_and_grad(m, get("codes"), get("labels"))
        assert_close(terms["total"], g, z[f"DDH/{case}/ref_loss"], z[f"DDH/{case}/ref_grad"])

        get = getter(z, f"DDAH/{case}")
        for margin in (0.0, 0.5):
            m = DDAH(c, k, margin=margin).double()
            with torch.no_grad():
                m.classifier.weight.copy_(get("W"))
                m.classifier.bias.copy_(get("b"))
            codes = torch.cat([get("codes_a"), get("codes_b")], 1)
            terms, g = value_and_grad(m, codes, get("labels"))
            key = f"DDAH/{case}/m{margin:g}"
            for branch in ("a", "b"):
                loss = terms[f"softmax_{branch}"] + m.weight_quant * terms[f"quant_{branch}"]
                assert abs(loss.item() - z[f"{key}/loss_{branch}"]) <= RTOL * z[f"{key}/loss_{branch}"]
            assert abs(terms["hinge"].item() - z[f"{key}/hinge"]) <= RTOL * max(z[f"{key}/hinge"], 1.0)
            ref = z[f"{key}/grad_c"]
            assert np.abs(g.numpy() - ref).max() <= RTOL * np.abs(ref).max()
            # the hinge's gradient on branch a, as the optimizer set applies it: (scale - 1) x dL_a/du_a
            hinge_grad = (m.attention_grad_scale - 1) * g[:, :k]
            ref = z[f"{key}/grad_a_hinge"]
            assert np.abs(hinge_grad.numpy() - ref).max() <= RTOL * max(np.abs(ref).max(), 1e-300)


# ------------------------------------------------------------------------------ OrthoHash


def test_orthohash_matches_the_reference():
    z, cases = load("orthohash.npz")
    assert len(cases) == 2
    settings = sorted({key.split("/")[1] for key in z.files if key.count("/") == 2})
    assert len(settings) == 6
    for case in cases:
        get = getter(z, case)
        c, k = get("codebook").shape
        for setting in settings:
            hparams = {} if setting.startswith("defaults") else dict(kv.split("=") for kv in setting.split(","))
            m = OrthoHash(c, k, **hparams).double()
            m.codebook.copy_(get("codebook"))
            terms, g = value_and_grad(m, get("codes"), get("labels"))
            assert_close(terms["total"], g, z[f"{case}/{setting}/loss"], z[f"{case}/{setting}/grad"])
