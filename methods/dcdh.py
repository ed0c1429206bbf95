"""DCDH: Deep Center-Based Dual-Constrained Hashing (Zhang, Zhe, Chen, Yan, Pattern Recognition
117, 107976, 2021, Sec. 3, Eqs. 3-10). Reference code: mzhang367/DCDH-PyTorch.

    L = L_pull + lambda * L_push + eta * L_quant

* ``pull_loss``   — Eq. 4-5: Gaussian class-center likelihood, ``-mean log p_iy``, via log_softmax.
* ``push_loss``   — Eq. 6-7: pairwise separation of L2-normalised centers.
* ``quantization_loss`` — Eq. 8-10: regression from one-hot labels to binary codes
  (W = per-class mean of sign(h), which equals pinv(Y^T Y) Y^T sign(h) for one-hot Y),
  B = sign(Y W + eta h), ``||h - B||^2 / batch``; W and B carry no gradient.

Differences from the authors' code (documented, tested in ``tests/test_dcdh_loss.py``):
the pull term uses ``log_softmax`` instead of ``log(exp(.)/sum exp(.) + 1e-6)`` (theirs
underflows to a constant loss with zero gradient when all distances are large); the push
term sums only over j != k, while theirs also passes the zeroed diagonal through
``log(1 + exp(0))``, adding the constant ``log 2 / (C - 1)``.  ``authors_push_constant=True``
adds that constant back so printed losses compare with the authors' logs; gradients are equal.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.metrics import binarize

from .base import HashingMethod, Hyper, check_batch


def squared_distances(codes, centers):
    """Squared Euclidean distances ``||h_i - m_c||^2``.

    Args: codes float (B, K); centers float (C, K). Returns float (B, C), >= 0.
    """
    d = codes.pow(2).sum(1, keepdim=True) + centers.pow(2).sum(1) - 2.0 * codes @ centers.t()
    return d.clamp_min(0.0)


def pull_loss(codes, labels, centers, sigma):
    """Pull term (Eq. 5): ``-mean_i log softmax_c(-sigma/2 d_ic)[y_i]``.

    Args: codes float (B, K); labels int64 (B,) in [0, C); centers float (C, K); sigma float > 0.
    Returns: scalar tensor. Differentiable w.r.t. codes and centers.
    """
    logits = -0.5 * sigma * squared_distances(codes, centers)
    return F.cross_entropy(logits, labels)


def push_loss(centers, authors_constant=False):
    """Push term (Eq. 7): ``sum_{j!=k} log(1 + exp(K/2 <m~_j, m~_k>)) / (C (C-1))``.

    Args: centers float (C, K) with C >= 2; authors_constant: add ``log 2 / (C-1)``
    (the authors' diagonal artefact). Returns a scalar tensor.
    Raises: ValueError if C < 2.
    """
    c, k = centers.shape
    if c < 2:
        raise ValueError(f"the push term needs at least 2 class centers, got {c}")
    unit = F.normalize(centers, dim=1)
    theta = 0.5 * k * unit @ unit.t()
    # masked_fill, not boolean indexing: no data-dependent shape, so no host sync on a GPU
    diagonal = torch.eye(c, dtype=torch.bool, device=centers.device)
    loss = F.softplus(theta).masked_fill(diagonal, 0.0).sum() / (c * (c - 1))
    if authors_constant:
        loss = loss + math.log(2.0) / (c - 1)
    return loss


@torch.no_grad()
def regression_codes(codes, labels, num_classes, eta, all_reduce=None):
    """Label-regression targets (Eqs. 8-9), computed without a pseudo-inverse.

    ``W[c] = mean of sign(h_i) over the batch samples of class c`` (0 for classes absent
    from the batch) — exactly ``pinv(Y^T Y) Y^T sign(h)`` for one-hot ``Y`` — and
    ``B = sign(Y W + eta * h)`` with sign(0) = -1.

    Args: codes float (B, K); labels int64 (B,) in [0, C); num_classes C; eta float;
    all_reduce: None, or a function summing a tensor in place over the processes of a
    distributed run, so that W is the per-class mean over the whole global batch.
    Returns: (W float (C, K), B float (B, K) of +-1), both detached.
    """
    signs = binarize(codes)
    sums = codes.new_zeros(num_classes, codes.shape[1]).index_add_(0, labels, signs)
    # index_add_ rather than bincount, which reads labels.max() back to the host on a GPU
    counts = codes.new_zeros(num_classes).index_add_(0, labels, codes.new_ones(labels.shape[0]))
    if all_reduce is not None:
        all_reduce(sums)
        all_reduce(counts)
    w = sums / counts.clamp_min(1.0)[:, None]
    return w, binarize(w[labels] + eta * codes)


def quantization_loss(codes, labels, num_classes, eta, all_reduce=None):
    """Quantization term (Eq. 10): ``||h - B||^2 / batch_size`` with B from ``regression_codes``.

    Args: codes float (B, K); labels int64 (B,); num_classes C; eta float; all_reduce: see
    ``regression_codes``. Returns a scalar tensor.
    """
    _, target = regression_codes(codes, labels, num_classes, eta, all_reduce)
    return (codes - target).pow(2).sum() / codes.shape[0]


class DCDH(HashingMethod):
    """DCDH loss with learnable class centers (the authors' ``DualClasswiseLoss`` plus Eq. 10).

    The only state is the parameter ``centers`` (C, K), initialised N(0, 1), so
    ``state_dict()`` is the authors' checkpoint entry ``centers``.

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.  train_labels: unused.
        sigma (float): Gaussian width (paper 0.25).  inner_param (float): lambda, push weight (0.1).
        eta (float): quantization weight and regression mixing (0.01).
        authors_push_constant (bool): add the authors' constant to the push term.

    ``forward(codes, labels, index=None)``: codes float (B, K), labels int64 (B,) in [0, C)
    -> dict of scalar tensors ``pull``, ``push``, ``quant``, ``total``
    (``total = pull + inner_param * push + eta * quant``, Eq. 3).

    ``all_reduce`` (attribute, default None): in a distributed run, a function summing a tensor
    in place across processes; the regression W is then computed over the global batch.

    Raises: ValueError on bad sizes, shapes or labels out of range (labels checked on CPU).
    """
    name = "dcdh"
    hyperparameters = {
        "sigma": Hyper(0.25, "Gaussian width of the pull term (Eq. 4)", positive=True),
        "inner_param": Hyper(0.1, "lambda, weight of the center push term (Eq. 3)", minimum=0.0),
        "eta": Hyper(0.01, "weight of the quantization term and regression mixing (Eqs. 3, 9)", minimum=0.0),
        "authors_push_constant": Hyper(False, "add the authors' constant log2/(C-1) to the push term"),
    }

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        self.sigma, self.inner_param = self.hparams["sigma"], self.hparams["inner_param"]
        self.eta, self.authors_push_constant = self.hparams["eta"], self.hparams["authors_push_constant"]
        self.centers = nn.Parameter(torch.randn(self.num_classes, self.bits))

    def forward(self, codes, labels, index=None):
        check_batch(codes, labels, self.num_classes, index)
        pull = pull_loss(codes, labels, self.centers, self.sigma)
        push = push_loss(self.centers, self.authors_push_constant)
        quant = quantization_loss(codes, labels, self.num_classes, self.eta, self.all_reduce)
        total = pull + self.inner_param * push + self.eta * quant
        return {"pull": pull, "push": push, "quant": quant, "total": total}
