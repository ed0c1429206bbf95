"""DTSH: Deep Supervised Hashing with Triplet Labels (Wang, Shi, Kitani, ACCV 2016, Sec. 3: the
triplet-label likelihood and its relaxed objective with a quantization regulariser). Reference
code read (not copied): Minione/DTSH (the authors' MatConvNet code: ``DTSH.m``,
``train_triplet.m``, ``tripletSampling.m``) and swuxyj/DeepHash-pytorch ``DTSH.py``.

The paper maximises the likelihood of triplets (q, p, n) — q and p share a label, n does not —
``p(T | B) = prod sigma(Theta_qp - Theta_qn - alpha)``, ``Theta_ij = 1/2 b_i^T b_j``, and after
relaxing ``b`` to the network outputs ``u`` minimises::

    L = - sum_m [ (Theta_qp - Theta_qn - alpha) - log(1 + exp(Theta_qp - Theta_qn - alpha)) ]
        + lambda * sum_n ||b_n - u_n||^2

(equation numbers are not given here: the paper's text was not available while writing this).
Each summand of the first sum is ``softplus(-(Theta_qp - Theta_qn - alpha))`` = ``-log sigma(.)``,
evaluated stably with ``torch.nn.functional.softplus``.

As implemented (one mini-batch; ``u`` the batch codes, ``U`` a memory bank of all N training
codes, as in the authors' code)::

    U[index] <- u.detach()                                    # first, as the authors' code does
    for every anchor a of the batch: draw M1 positives p (same identity as a, not a itself) and
        M2 negatives n (other identities) uniformly with replacement from the bank, and use all
        M1 x M2 triplets (a, p, n):  t = 1/2 <u_a, U_p> - 1/2 <u_a, U_n> - alpha
    triplet = mean over the valid anchors of mean over their triplets of softplus(-t)
    quant   = mean_{a in batch} ||b_a - u_a||^2                (b = sign(u), sign(0) = -1)
    total   = triplet + lam * quant

An anchor is valid when its identity has another training sample and some training sample has
another identity; if no anchor of the batch is valid, ``triplet`` is 0. Everything is vectorised
over ``(B, M1, M2)`` with the validity multiplied in as a weight: no boolean-mask indexing,
``nonzero`` or ``.item()``, so the step reads nothing back to the host (the label/index range
checks run only on CPU tensors). Positives and negatives are drawn exactly from their pools
through a class-sorted order of the training set (built once in the constructor), with the
device's default random generator (``self.generator`` may be set to a ``torch.Generator`` on the
codes' device, e.g. in tests).

State: ``bank`` (N, K) float32, persistent (saved in checkpoints, restored on ``--resume``),
zeros at the start as in the authors' code; ``train_labels`` (N,) int64 and the derived
``class_order``, ``class_start``, ``class_count``, ``order_rank`` (int64), non-persistent
buffers (they follow ``.to(device)``, stay out of checkpoints). The bank is a constant for
autograd: gradients reach the anchors only, as in the authors' code (its dJ/dU is per anchor).

Shapes/dtypes: ``forward(codes float (B, K), labels int64 (B,), index int64 (B,))`` ->
``{"triplet", "quant", "total"}``, 0-d tensors of ``codes``' dtype. ``labels`` must equal
``train_labels[index]`` (not checked: that would be a host read on a GPU).

Raises ValueError: ``train_labels`` missing, not 1-D integer, empty or outside [0, C); ``codes``
not (B, K) with K = ``bits``; ``labels``/``index`` of the wrong shape or dtype; ``index``
missing; labels or index out of range (checked on CPU only); bad hyperparameters.

Hyperparameter defaults and their sources:

* ``alpha_per_bit`` 0.5, i.e. the margin ``alpha = K/2``: the authors' ``DTSH.m`` passes
  ``codelens / 2`` as the margin (with ``Theta = 1/2 u.u``). DeepHash-pytorch uses ``alpha = 5``
  with ``u.u`` (no 1/2), whatever K: its argument is ``u_a.u_p - u_a.u_n - 5 =
  2 (Theta_ap - Theta_an - 2.5)``, i.e. a margin of 2.5 on this scale with a sigmoid twice as
  steep (it equals this module's ``triplet_loss`` of ``sqrt(2) u`` at ``alpha = 5``).
* ``positives`` 50 and ``negatives`` 450: the authors sample, per anchor, M1 = 50 positives and,
  for each of CIFAR-10's 9 other classes, M2 = 50 negatives, all combined: 50 x 450 = 22,500
  triplets per anchor. With hundreds of identities a per-class quota does not fit, so the 450
  negatives are drawn from all other identities together.
* ``lam`` = 100 / 22,500 (about 0.00444): the authors' ``eta = 100`` weights
  ``||b - u||^2`` against the *sum* over an anchor's 22,500 triplets (their gradient is
  ``sum_t (1 - sigma_t)(U_p - U_n) - 4 eta (u - b)``, i.e. -2 x the gradient of
  ``sum_t softplus(-t) + eta ||b - u||^2``); here the triplet term is a *mean* over an anchor's
  triplets, so the same balance is ``lam = 100 / 22,500``. (DeepHash-pytorch: ``lambda = 1``
  on the mean over the B*K entries, a per-sample weight of 1/K.)

Differences from the paper and the reference code (all deliberate, all stated):

* Triplets: the paper sums over a given set of triplets; the authors' code samples them against
  the bank (above); DeepHash-pytorch takes all in-batch (positive, negative) pairs of every
  anchor with at least one of each, without a bank. With a shuffled batch over hundreds of
  identities, few anchors have an in-batch positive, so the bank scheme is kept. Changes from
  the authors' sampling: with replacement (YouTube Faces has 40 images per identity, fewer than
  50), only the anchor itself is excluded from the pools (the authors exclude the whole batch),
  and negatives are drawn over all other identities, not 50 per class.
* Normalisation: mean over triplets and over the batch (the authors sum over an anchor's
  triplets and average over the batch; ``lam`` is restated accordingly, above).
* Optimizer: the paper fine-tunes an ImageNet-pretrained VGG-F (authors' code: lr 5e-4 decayed
  by 2/3 every 20 of 100 epochs, weight decay 5e-4, batch 128; DeepHash: RMSprop lr 1e-5). That
  recipe is for a pretrained ImageNet network and does not fit the from-scratch DFHNet/SphereNet
  here, so ``recipe = {}``: the harness's shared recipe is used for every method (a stated change).
* The random draws use the device's global generator, so DTSH consumes random numbers that
  other methods do not (runs stay reproducible for a given seed).
* Multi-process training (DDP) is refused: each process would fill only its own shard's bank rows.
"""
import torch
import torch.nn.functional as F

from .base import FLOAT32, HashingMethod, Hyper
from .dpsh import as_train_labels, check_inputs, quantization_error

AUTHORS_ETA = 100.0
"""The authors' quantization weight (``DTSH.m``), against a per-anchor sum of triplets."""
AUTHORS_TRIPLETS_PER_ANCHOR = 50 * 50 * 9
"""M1 * M2 * (classes - 1) in the authors' ``train_triplet.m`` on CIFAR-10."""


TRIPLET_TENSORS = 4
"""float32 (B, M1, M2) tensors alive at the peak of a DTSH step (t, -t, softplus, gradients; about
3.2 measured with a 200,000-image bank, 256 x 48, beside the gathered rows)."""


def triplet_loss(codes, bank, pos_idx, neg_idx, valid, alpha):
    """Mean negative log triplet likelihood over valid anchors and their M1 x M2 triplets.

    ``t[a, i, j] = 1/2 <u_a, U[pos_idx[a, i]]> - 1/2 <u_a, U[neg_idx[a, j]]> - alpha``, loss
    ``softplus(-t) = -(t) + log(1 + exp(t))`` (the paper's summand), averaged over (i, j) per anchor,
    then over the anchors with ``valid`` weight 1 (0 when none is valid).

    Args: codes float (B, K) (differentiable); bank float (N, K) (treated as given: pass it
    detached); pos_idx, neg_idx int64 (B, M1), (B, M2) rows of the bank; valid float (B,) of 0/1;
    alpha float. Returns: 0-d tensor.
    """
    theta_pos = 0.5 * torch.einsum("bk,bmk->bm", codes, bank[pos_idx])
    theta_neg = 0.5 * torch.einsum("bk,bmk->bm", codes, bank[neg_idx])
    t = theta_pos[:, :, None] - theta_neg[:, None, :] - alpha
    per_anchor = F.softplus(-t).mean(dim=(1, 2))
    valid = valid.to(per_anchor.dtype)
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1.0)


def _draw(count, shape, generator, device):
    """Uniform integers in [0, count[b]) per row b (0 where count is 0), no host read.

    Args: count int64 (B,); shape (B, M). Returns int64 (B, M).
    """
    r = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    k = (r * count[:, None].to(torch.float64)).floor().long()
    return torch.minimum(k, (count - 1).clamp_min(0)[:, None])


class DTSH(HashingMethod):
    """DTSH loss: batch anchors against triplets sampled from a memory bank (see the module docstring).

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.
        train_labels (int64 tensor (N,)): class of every training sample, by training-set index.
        alpha_per_bit (float): margin alpha = alpha_per_bit * K (authors: K/2).
        lam (float): weight of the quantization term (authors' 100 per 22,500 triplets).
        positives (int): M1, positives drawn per anchor (50).  negatives (int): M2 (450).

    ``forward(codes, labels, index)``: codes float (B, K), labels int64 (B,), index int64 (B,)
    -> dict of 0-d tensors ``triplet``, ``quant``, ``total`` (``triplet + lam * quant``).
    Writes ``codes.detach()`` into ``bank[index]`` before computing the loss.

    Raises: ValueError (constructor) for bad sizes, hyperparameters or train_labels;
    ValueError (forward) for bad shapes, a missing index or out-of-range labels/index (CPU only).
    """
    name = "dtsh"
    hyperparameters = {
        "alpha_per_bit": Hyper(0.5, "triplet margin alpha as a fraction of the code length K "
                                    "(authors' code: alpha = K/2)", minimum=0.0),
        "lam": Hyper(AUTHORS_ETA / AUTHORS_TRIPLETS_PER_ANCHOR,
                     "lambda, weight of ||b - u||^2 against the mean triplet loss (authors' 100 "
                     "against a sum of 22,500 triplets per anchor)", minimum=0.0),
        "positives": Hyper(50, "M1, positives drawn per anchor from the memory bank (authors: 50)",
                           minimum=1),
        "negatives": Hyper(450, "M2, negatives drawn per anchor from the memory bank "
                                "(authors: 50 for each of 9 other classes)", minimum=1),
    }
    recipe = {}
    unsupported = {"ddp": "its memory bank of training codes is per process (no all-gather of codes)"}

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        self.alpha = self.hparams["alpha_per_bit"] * self.bits
        self.lam = self.hparams["lam"]
        self.positives, self.negatives = self.hparams["positives"], self.hparams["negatives"]
        labels = as_train_labels(train_labels, self.num_classes, self.name)
        self.register_buffer("train_labels", labels, persistent=False)
        # the training set sorted by class: class c occupies class_order[start[c] : start[c] + count[c]]
        order = torch.sort(labels, stable=True).indices
        count = torch.zeros(self.num_classes, dtype=torch.long).index_add_(0, labels, torch.ones_like(labels))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        self.register_buffer("class_order", order, persistent=False)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count, persistent=False)
        self.register_buffer("class_count", count, persistent=False)
        self.register_buffer("order_rank", rank, persistent=False)
        self.register_buffer("bank", torch.zeros(labels.numel(), self.bits))
        self.generator = None

    @classmethod
    def memory_estimate(cls, num_classes, bits, num_train, batch_size, hparams=None):
        """Bytes of DTSH's own memory for one step: the bank (N, K) float32 and three int64 (N,)
        index arrays; per step the gathered bank rows (B, M1 + M2, K), the random draws and the
        (B, M1, M2) triplet tensors (``TRIPLET_TENSORS`` float32). Linear in N."""
        h = dict(hparams or {})
        m1 = int(h.get("positives", cls.hyperparameters["positives"].default))
        m2 = int(h.get("negatives", cls.hyperparameters["negatives"].default))
        n, c, k, b = int(num_train), int(num_classes), int(bits), int(batch_size)
        state = FLOAT32 * n * k + 3 * 8 * n + 2 * 8 * c
        step = FLOAT32 * (2 * b * (m1 + m2) * k + TRIPLET_TENSORS * b * m1 * m2) + 3 * 8 * b * (m1 + m2)
        return state + step

    @property
    def num_train(self):
        """N, the number of training samples (rows of the bank)."""
        return self.bank.shape[0]

    def sample_triplets(self, labels, index, generator=None):
        """Draw M1 positives and M2 negatives per anchor, uniformly with replacement, no host read.

        Positives: training samples of the anchor's identity other than the anchor (its position
        ``index``); negatives: samples of any other identity.

        Args: labels int64 (B,) (= train_labels[index]); index int64 (B,); generator: a
        torch.Generator on the labels' device, or None for the default one.
        Returns: (pos_idx int64 (B, M1), neg_idx int64 (B, M2), valid float (B,) of 0/1 — 1 when
        both pools are non-empty; rows of invalid anchors hold arbitrary in-range indices).
        """
        n, device = self.num_train, labels.device
        b = labels.shape[0]
        start, count = self.class_start[labels], self.class_count[labels]
        # positives: offset k among the count - 1 others of the class, skipping the anchor's own slot
        k = _draw(count - 1, (b, self.positives), generator, device)
        own = (self.order_rank[index] - start)[:, None]
        k = torch.minimum(k + (k >= own).long(), (count - 1).clamp_min(0)[:, None])
        pos_idx = self.class_order[start[:, None] + k]
        # negatives: position j among the n - count samples outside the class block
        j = _draw(n - count, (b, self.negatives), generator, device)
        j = j + (j >= start[:, None]).long() * count[:, None]
        neg_idx = self.class_order[j.clamp_max(n - 1)]
        valid = ((count >= 2) & (count < n)).float()
        return pos_idx, neg_idx, valid

    def forward(self, codes, labels, index=None):
        check_inputs(codes, labels, index, self.num_classes, self.bits, self.num_train)
        index = index.long()
        with torch.no_grad():
            self.bank.index_copy_(0, index, codes.detach().to(self.bank.dtype))
        pos_idx, neg_idx, valid = self.sample_triplets(labels.long(), index, self.generator)
        triplet = triplet_loss(codes, self.bank.to(codes.dtype), pos_idx, neg_idx, valid, self.alpha)
        quant = quantization_error(codes)
        return {"triplet": triplet, "quant": quant, "total": triplet + self.lam * quant}

    def extra_repr(self):
        return super().extra_repr() + f", num_train={self.num_train}"
