"""DCDH: Deep Center-Based Dual-Constrained Hashing (Zhang, Zhe, Chen, Yan, Pattern Recognition
117, 107976, 2021, Sec. 3, Eqs. 3-10). Reference code: mzhang367/DCDH-PyTorch.

    L = L_pull + lambda * L_push + eta * L_quant

* ``pull_loss``   — Eq. 4-5: Gaussian class-center likelihood, ``-mean log p_iy``, via log_softmax.
* ``push_loss``   — Eq. 6-7: pairwise separation of L2-normalised centers, computed in blocks of
  centers (``_BlockedPairSoftplus``): memory O(C x block), never a C x C tensor; time O(C^2 K).
  ``push_loss_reference`` is the whole-matrix form it replaced (tests, benchmarks).
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

from .base import FLOAT32, LOGIT_TENSORS, HashingMethod, Hyper, check_batch


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


PUSH_BLOCK_ELEMENTS = {"cpu": 2 ** 22, "other": 2 ** 24}
"""Working-set budget of the blocked push term, ``block * C`` elements per block tensor: 16 MiB
in float32 on the CPU, 64 MiB on an accelerator (fewer, larger kernels; not measured here). On
the 2-core CPU at C = 8,631 (forward + backward, same process): with one thread 2^20 to 2^22
took 0.43-0.52 s and 2^24 0.86 s (the reference 1.81 s); with two threads on a loaded machine
(load 5) small blocks paid for thread synchronisation, 2^21 2.60 s, 2^22 1.62 s, 2^24 1.18 s
(the reference 1.87 s). 2^22 is fast in both."""
PUSH_MIN_BLOCK = 64
"""Fewest center rows per block: below about K rows, re-reading all C centers per block costs
more than the block's own work."""


def push_block_rows(num_classes, block=None, device="cpu"):
    """Rows of centers per block of the push term: ``block`` when given (clipped to [1, C]), else
    the device's ``PUSH_BLOCK_ELEMENTS // C`` clipped to [``PUSH_MIN_BLOCK``, C]."""
    if block is None:
        kind = "cpu" if torch.device(device).type == "cpu" else "other"
        block = max(PUSH_MIN_BLOCK, PUSH_BLOCK_ELEMENTS[kind] // max(num_classes, 1))
    return max(1, min(int(block), num_classes))


def _push_block(unit, start, stop, scale):
    """``theta = scale * unit[start:stop] @ unit^T`` (rows start..stop-1, all C columns) with the
    block's diagonal entries ``theta[i, start + i]`` set to -inf in place through a strided view
    (no mask tensor, no boolean indexing, no host read). Returns float (stop - start, C)."""
    theta = torch.mm(unit[start:stop], unit.t()).mul_(scale)
    theta[:, start:stop].diagonal().fill_(-math.inf)
    return theta


class _BlockedPairSoftplus(torch.autograd.Function):
    """``S(U) = sum_{j != k} softplus(scale <U_j, U_k>)`` over the rows of U (C, K), in blocks of
    ``block`` rows, without ever holding a C x C tensor.

    Per block: ``theta`` (block, C) with its diagonal at -inf (``softplus(-inf) = 0`` exactly),
    summed. theta is symmetric, so ``dS/dU_j = 2 scale sum_{k != j} sigmoid(theta_jk) U_k``, i.e.
    ``2 scale sigmoid(theta) @ U`` with ``sigmoid(-inf) = 0`` on the diagonal.

    ``with_grad`` True (the caller needs a gradient): the gradient is accumulated block by block
    in the forward pass, from the same theta, into a (C, K) tensor, and backward only scales it by
    the incoming gradient (S is a scalar): one product per block instead of two or three.
    False (no gradient needed): the blocks are only summed; a backward pass then recomputes the
    blocks (same result). Memory O(C x block + C K) either way; time O(C^2 K) as before.
    Autocast is switched off inside: the term always runs in the dtype of U.
    """

    @staticmethod
    def forward(ctx, unit, scale, block, with_grad):
        c = unit.shape[0]
        ctx.scale, ctx.block = scale, block
        with torch.autocast(unit.device.type, enabled=False):
            total = unit.new_zeros(())
            grad = torch.empty_like(unit) if with_grad else None
            for start in range(0, c, block):
                stop = min(start + block, c)
                theta = _push_block(unit, start, stop, scale)
                total = total + F.softplus(theta).sum()
                if with_grad:
                    torch.mm(theta.sigmoid_(), unit, out=grad[start:stop])
        ctx.save_for_backward(grad if with_grad else unit)
        ctx.precomputed = with_grad
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        if ctx.precomputed:
            return saved * (grad_output * (2.0 * scale)), None, None, None
        unit, c = saved, saved.shape[0]
        with torch.autocast(unit.device.type, enabled=False):
            grad = torch.empty_like(unit)
            for start in range(0, c, block):
                stop = min(start + block, c)
                torch.mm(_push_block(unit, start, stop, scale).sigmoid_(), unit, out=grad[start:stop])
        return grad * (grad_output * (2.0 * scale)), None, None, None


def push_loss(centers, authors_constant=False, block=None):
    """Push term (Eq. 7): ``sum_{j!=k} log(1 + exp(K/2 <m~_j, m~_k>)) / (C (C-1))``.

    Computed in blocks of ``block`` centers (see ``_BlockedPairSoftplus``): memory O(C x block)
    instead of O(C^2), time O(C^2 K) as before; value and gradients are those of
    ``push_loss_reference`` (tested to 1e-6 relative).

    Args: centers float (C, K) with C >= 2; authors_constant: add ``log 2 / (C-1)``
    (the authors' diagonal artefact); block: center rows per block (default
    ``push_block_rows(C, device=centers.device)``: 2^22 / C on the CPU, 2^24 / C on a GPU,
    at least ``PUSH_MIN_BLOCK``).
    Returns a scalar tensor. Raises: ValueError if C < 2.
    """
    c, k = centers.shape
    if c < 2:
        raise ValueError(f"the push term needs at least 2 class centers, got {c}")
    unit = F.normalize(centers, dim=1)  # outside the Function: autograd differentiates it
    with_grad = torch.is_grad_enabled() and unit.requires_grad
    loss = _BlockedPairSoftplus.apply(unit, 0.5 * k, push_block_rows(c, block, centers.device),
                                      with_grad) / (c * (c - 1))
    if authors_constant:
        loss = loss + math.log(2.0) / (c - 1)
    return loss


def push_loss_reference(centers, authors_constant=False):
    """The push term with the whole C x C matrix (the implementation before the blocked one):
    about 3.3 float32 C x C tensors and a C x C boolean mask per step. For tests and
    ``benchmarks/class_scale.py``; same arguments and value as ``push_loss``."""
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

    @classmethod
    def memory_estimate(cls, num_classes, bits, num_train, batch_size, hparams=None):
        """Bytes of DCDH's own memory for one step (see ``HashingMethod.memory_estimate``): the
        centers with gradient and two Adam moments (4 C K floats), the normalised centers, their
        gradients (the push term's is kept from the forward pass) and the regression sums (5 C K),
        three push blocks of
        ``push_block_rows(C)`` x C (the accelerator's larger block, an upper bound on the CPU)
        and ``LOGIT_TENSORS`` B x C tensors of the pull term. Linear in C."""
        c, k, b = int(num_classes), int(bits), int(batch_size)
        block = push_block_rows(c, device="cuda")
        return FLOAT32 * (9 * c * k + 3 * block * c + LOGIT_TENSORS * b * c)

    def forward(self, codes, labels, index=None):
        check_batch(codes, labels, self.num_classes, index)
        pull = pull_loss(codes, labels, self.centers, self.sigma)
        push = push_loss(self.centers, self.authors_push_constant)
        quant = quantization_loss(codes, labels, self.num_classes, self.eta, self.all_reduce)
        total = pull + self.inner_param * push + self.eta * quant
        return {"pull": pull, "push": push, "quant": quant, "total": total}
