"""DSDH: Deep Supervised Discrete Hashing (Qi Li, Zhenan Sun, Ran He, Tieniu Tan, NeurIPS 2017,
pp. 2482-2491; arXiv:1705.10999). Reference code read (not copied): the authors' MATLAB
liqi-casia/DSDH-HashingCode (``train.m``, ``update.m``, ``RRC.m``, ``main.m``) and
TreezzZ/DSDH_PyTorch (``dsdh.py``, ``models/dsdh_loss.py``, ``run.py``).

Equation and subsection numbers: the paper's text could not be read from here, so they are not
cited; its Sec. 3 gives the objective and its alternating optimisation (the gradient with respect
to ``u``, ``W`` in closed form, ``B`` by discrete cyclic coordinate descent), referred to below as
"the paper's objective / gradient / W-step / B-step". What is checked against text is the two
reference codes above.

Objective (paper, Sec. 3), over the N training samples, with ``Theta_ij = 1/2 u_i^T u_j`` and
``s_ij = 1`` when i and j share an identity, else 0::

    J = sum_{i,j} [log(1 + exp(Theta_ij)) - s_ij Theta_ij]       (DPSH pairwise likelihood)
        + mu  sum_i ||y_i - W^T b_i||^2 + nu ||W||_F^2              (linear classifier on the codes)
        + eta sum_i ||b_i - u_i||^2,        b_i in {-1, +1}^K       (quantization)

``y_i`` is one-hot (C,), ``W`` (K, C), ``B`` (N, K) holds the discrete codes ``b_i`` of the whole
training set and ``U`` (N, K) the network outputs ``u_i``.

What is implemented
-------------------
``forward(codes, labels, index)``: codes float (B, K), the batch's ``u``; labels int64 (B,) in
[0, C), equal to ``train_labels[index]`` (not checked: that would read the device); index int64
(B,), positions in the training set (required). In training mode the memory
bank is first updated, ``U[index] = codes.detach()``; then, with ``b_i = B[index]`` (the stored
discrete codes) and the bank ``U`` a constant::

    likelihood = mean over (i in batch, j in 0..N-1) of softplus(Theta_ij) - s_ij Theta_ij,
                 Theta_ij = 1/2 u_i^T U_j
    classify   = mean_i ||y_i - W^T b_i||^2             quant = mean_i ||b_i - u_i||^2
    reg        = ||W||_F^2
    total      = 2 likelihood + (mu classify + eta quant + nu reg / N) / N

``total`` is the batch's part of J divided by (batch size x N), with the likelihood counted twice
because every pair enters J as (i, j) and as (j, i) while the bank is a constant here. So
``d total / d u_i = [sum_j (sigma(Theta_ij) - s_ij) U_j + 2 eta (u_i - b_i)] / (B N)``: the
paper's gradient scaled by 1/(B N), exactly what the authors' ``train.m``/``update.m``
apply (``(S - A) U - 2 eta (U0 - B)``, divided by ``batch_size * N``). ``classify`` and ``reg``
carry no gradient (``B`` and ``W`` are discrete / closed-form variables); they are there so that
``total`` is the objective. Returns a dict of 0-d tensors ``likelihood``, ``classify``, ``quant``,
``reg``, ``total``. No op in forward or backward reads a value back to the host.

``epoch_end()`` (called under ``torch.no_grad()`` after each epoch):

* B-step (the paper's): with ``W`` fixed, minimise ``mu ||Y - B W||^2 + eta ||B - U||^2`` over
  ``B in {-1,+1}^{N x K}``, i.e. ``||B W||^2 - 2 tr(B^T P)`` with ``P = Y W^T + (eta/mu) U``, by
  discrete cyclic coordinate descent: bit k of every sample at once,
  ``B[:, k] = sign(P[:, k] - B' W' w_k)`` (``B'``, ``W'`` without bit k, ``w_k = W[k]``),
  computed as ``P[:, k] - B G[:, k] + G[k, k] B[:, k]`` with ``G = W W^T``. A tie (argument 0)
  keeps the current bit. Each bit step is an exact minimiser, so the objective never increases.
  Up to ``dcc_iter`` sweeps over the K bits, stopping early after a sweep that changes no bit.
* W-step (the paper's): ``W = (B^T B + (nu/mu) I)^-1 B^T Y``, solved in float64 (``B^T Y`` by
  ``index_add``; no dense N x C one-hot matrix is formed).

Vectorised over samples (a Python loop over bits and sweeps only; a bit is a contiguous row of
``B^T``). Cost at the FaceScrub size (N = 67,177, C = 530, K = 48), measured on this project's
2-core CPU while other jobs ran (load average about 6), min of 5: one DCC sweep (48 bit steps)
0.16 s; one ``epoch_end`` 0.21 s warm (1 sweep) and 0.34 s from random codes (2 sweeps; a bank of
class-clustered codes converges in 1-2 sweeps), the W-step 0.02 s, all with 1 thread (with 2
threads under that load: 0.75 s per sweep, 0.9-1.0 s per hook). At most ``dcc_iter`` = 10 sweeps,
so at most about 1.6 s. ``forward`` + backward at that size, batch 256: 0.31 s on 1 thread, about
700 MB peak resident (the (256, N) ``Theta``).

State (all buffers): ``U`` float (N, K) memory bank, zeros at start; ``B`` float (N, K) of +-1,
initialised to ``sign(randn)`` from torch's global RNG (so a seeded run is reproducible); ``W``
float (K, C), the ridge solution for the initial ``B``. ``U``, ``B``, ``W`` are persistent (in
``state_dict``, restored on ``--resume``); ``train_labels`` int64 (N,) is a non-persistent buffer
(it comes from the data).

Defaults: ``mu = 1``, ``nu = 0.1``, ``eta = 55``, ``dcc_iter = 10``. Source: the authors' code
(``main.m``, formerly ``setup.m``, runs eta = 55; ``train.m`` solves W with ridge ``lambda = 0.1 = nu/mu`` and builds
``Q = eta * U0 + Y W^T``, i.e. ``P`` with ``mu = 1``, and runs at most 10 DCC sweeps with early
stopping). The paper's experiments section could not be read here to cross-check them.
TreezzZ/DSDH_PyTorch uses mu = 1e-2, nu = 1, eta = 1e-2 with losses averaged differently (element
means), so its values do not carry over.

Optimisation recipe: the paper fine-tunes an ImageNet-pretrained CNN-F (VGG-F): the authors'
code runs 150 epochs of plain SGD, learning rate log-spaced from 1e-2 to 1e-6, weight decay
5e-4, batch 128 (TreezzZ: RMSprop, lr 1e-5, weight decay 1e-5, pretrained AlexNet). That recipe
is for a pretrained network and does not fit DFHNet trained from scratch, so ``recipe = {}``: the
shared recipe of the backbone is used instead (a stated change).

Differences from the paper and the reference code (every one)
-------------------------------------------------------------
1. Schedule: ``B`` and ``W`` of the whole training set are updated once per epoch, after the
   network's pass (as TreezzZ's current ``dsdh.py``; the paper alternates network, ``W`` and ``B``
   steps). The authors' MATLAB code instead re-solves, for every minibatch, ``W`` by ridge on that
   batch's ``sign(u)`` and ``B`` for that batch only (from zeros, up to 10 sweeps), and keeps no
   ``B`` across batches.
2. DCC starts from the current ``B`` (TreezzZ), not from zeros (authors, whose ``sign(0) = 0``
   leaves zero bits when an argument is 0); a tie here keeps the current bit, so codes stay +-1.
   Early stop: no bit changed in a sweep (the authors' ``||B - B0||_F < 1e-6 ||B0||_F`` is the
   same test for +-1 codes of fewer than 4 x 10^12 entries). TreezzZ runs one sweep per epoch.
3. Order within the hook: B-step, then W-step. Since ``B`` changes only here and ``W`` is always
   the ridge solution for the current ``B``, this equals TreezzZ's W-step-then-B-step sequence;
   it also keeps the stored ``(B, W)`` pair consistent for the ``classify`` term.
4. Normalisation: ``total`` is the batch's part of J over (batch x N), likelihood counted twice
   (see above); gradient identical to the authors' code. TreezzZ averages every term over its
   elements (pairs, B x K) and omits the factor 2; DeepHash-pytorch's DSDH drops the
   quantization term from the network loss.
5. ``Theta`` is not clamped; ``softplus`` is used (exact, stable). TreezzZ clamps it to
   [-100, 50], which zeroes the gradient beyond. The ``s_ij Theta_ij`` part is computed through
   per-class sums of the bank, ``1/2 u_i^T sum_{j: y_j = y_i} U_j`` (the same value, O(N K)
   instead of an (B, N) similarity matrix).
6. Initialisation: ``B = sign(randn)`` (TreezzZ; authors: zeros), ``U = 0`` (both), ``W`` the
   ridge solution of the initial ``B`` (the value of TreezzZ's first W-step).
7. The memory bank is written only in training mode (``self.training``), so a loss evaluated in
   eval mode does not overwrite training codes.
8. Network: ``u`` is the backbone's output (DFHNet or SphereNet-20 with its K-unit layer), not
   CNN-F's ``M^T phi(x) + v``; recipe as stated above.
9. Distributed training is not supported (``unsupported``): the bank and ``B`` are per process.

Errors: ``ValueError`` for C < 2, K < 1, bad hyperparameters, ``train_labels`` missing, not 1-D
integer, empty or out of [0, C); in ``forward`` for bad shapes, labels out of range (checked on
CPU only), a missing ``index``, an index not int64 or out of [0, N) (checked on CPU only) or codes
whose width is not K.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FLOAT32, HashingMethod, Hyper, check_batch


PAIR_TENSORS = 2
"""float32 (B, N) tensors alive at the peak of a DSDH step (theta, softplus; 1.7 measured with a
200,000-image bank, 256 x 48, by the increase of the peak resident set)."""


def class_sums(bank, bank_labels, num_classes):
    """Per-class sums of the bank's rows: ``M[c] = sum_{j: y_j = c} U_j``.

    Args: bank float (N, K); bank_labels int64 (N,) in [0, C); num_classes C.
    Returns: float (C, K) (zeros for classes with no sample).
    """
    return bank.new_zeros(num_classes, bank.shape[1]).index_add_(0, bank_labels, bank)


def pair_likelihood(codes, labels, bank, bank_labels, num_classes):
    """DPSH negative log-likelihood of the batch against the bank, averaged over the B x N pairs.

    ``mean_{i, j} softplus(Theta_ij) - s_ij Theta_ij`` with ``Theta_ij = 1/2 u_i^T U_j`` and
    ``s_ij = [labels_i == bank_labels_j]``; the ``s Theta`` part is
    ``1/2 u_i^T M[labels_i]`` with ``M = class_sums(bank, ...)``.

    Args: codes float (B, K); labels int64 (B,) in [0, C); bank float (N, K) (a constant here:
    pass it detached); bank_labels int64 (N,) in [0, C); num_classes C.
    Returns: 0-d tensor, differentiable w.r.t. codes (and bank, if it requires grad).
    """
    theta = 0.5 * codes @ bank.t()
    similar = 0.5 * (codes * class_sums(bank, bank_labels, num_classes).index_select(0, labels)).sum()
    return (F.softplus(theta).sum() - similar) / theta.numel()


def classify_loss(targets, labels, weights):
    """``mean_i ||y_i - W^T b_i||^2`` for one-hot ``y_i``, without forming the one-hot matrix.

    Args: targets float (B, K) (the codes b_i); labels int64 (B,) in [0, C); weights W float (K, C).
    Returns: 0-d tensor.
    """
    scores = targets @ weights
    own = scores.gather(1, labels[:, None]).squeeze(1)
    return (scores.pow(2).sum(1) - 2.0 * own + 1.0).mean()


def quantization_loss(codes, targets):
    """``mean_i ||b_i - u_i||^2``. Args: codes, targets float (B, K). Returns: 0-d tensor."""
    return (targets - codes).pow(2).sum(1).mean()


def ridge_weights(codes, labels, num_classes, ratio):
    """W-step: ``W = (B^T B + ratio I)^-1 B^T Y`` (ratio = nu/mu), solved in float64.

    Args: codes B float (N, K) of +-1; labels int64 (N,) in [0, C); num_classes C; ratio > 0.
    Returns: float (K, C) in the dtype of ``codes``.
    """
    b = codes.double()
    bty = b.new_zeros(num_classes, b.shape[1]).index_add_(0, labels, b).t()  # (K, C) = B^T Y
    gram = b.t() @ b + ratio * torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
    return torch.linalg.solve(gram, bty).to(codes.dtype)


def dcc_bit_step(codes_t, k, gram, target_t):
    """One DCC step: the exact minimiser of ``||B W||^2 - 2 tr(B^T P)`` over bit k of every sample,
    the other bits fixed: ``sign(P[:, k] - B' W' w_k) = sign(P[:, k] - B G[:, k] + G[k, k] B[:, k])``;
    a zero argument keeps the current bit.

    Args (transposed, so that a bit is a contiguous row): codes_t ``B^T`` float (K, N) of +-1;
    k bit index; gram ``G = W W^T`` float (K, K), symmetric; target_t ``P^T`` float (K, N).
    Returns: float (N,) of +-1, the new bit k of every sample (``codes_t`` is not changed).
    """
    row = codes_t[k]
    arg = target_t[k] - gram[k] @ codes_t + gram[k, k] * row
    return torch.where(arg > 0, torch.ones_like(row), torch.where(arg < 0, -torch.ones_like(row), row))


def dcc(codes, weights, target, sweeps):
    """B-step by discrete cyclic coordinate descent, bit by bit, vectorised over samples.

    Args: codes B float (N, K) of +-1 (start point); weights W float (K, C); target
    ``P = Y W^T + (eta/mu) U`` float (N, K); sweeps >= 1, the most passes over the K bits
    (stops after a pass that changes no bit).
    Returns: (new codes float (N, K) of +-1, number of sweeps run). ``codes`` is not changed.
    """
    codes_t, target_t = codes.t().contiguous(), target.t().contiguous()
    gram = weights @ weights.t()
    done = 0
    for done in range(1, sweeps + 1):
        changed = codes.new_zeros((), dtype=torch.int64)
        for k in range(codes_t.shape[0]):
            row = dcc_bit_step(codes_t, k, gram, target_t)
            changed += (row != codes_t[k]).sum()
            codes_t[k] = row
        if int(changed) == 0:  # one host read per sweep, in the epoch hook only
            break
    return codes_t.t().contiguous(), done


def discrete_objective(codes, weights, labels, bank, mu, nu, eta):
    """The (B, W) part of J: ``mu ||Y - B W||^2 + nu ||W||^2 + eta ||B - U||^2`` (for tests and logs).

    Args: codes B (N, K); weights W (K, C); labels int64 (N,); bank U (N, K); mu, nu, eta floats.
    Returns: 0-d tensor.
    """
    scores = codes @ weights
    own = scores.gather(1, labels[:, None]).squeeze(1)
    fit = (scores.pow(2).sum(1) - 2.0 * own + 1.0).sum()
    return mu * fit + nu * weights.pow(2).sum() + eta * (codes - bank).pow(2).sum()


def check_inputs(codes, labels, index, num_classes, bits, num_train):
    """``base.check_batch`` for a memory-bank method: ``index`` required, in [0, N); codes K wide.
    Raises ValueError naming the problem."""
    check_batch(codes, labels, num_classes, index, num_train=num_train, bits=bits)


class DSDH(HashingMethod):
    """DSDH loss with a memory bank ``U``, discrete codes ``B`` and classifier ``W`` of the whole
    training set (see the module docstring for the loss, the updates and every difference).

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.
        train_labels (int64 tensor (N,), or anything ``torch.as_tensor`` takes): the class of
            every training sample, by index; required.
        mu (float): weight of the classification term (1).  nu (float): weight of ||W||^2 (0.1).
        eta (float): weight of the quantization term (55).  dcc_iter (int): most DCC sweeps per
            epoch (10).

    ``forward(codes, labels, index)`` -> dict of 0-d tensors ``likelihood``, ``classify``,
    ``quant``, ``reg``, ``total``. ``epoch_end()``: B-step by DCC, then W-step.

    Raises: ValueError as listed in the module docstring.
    """
    name = "dsdh"
    hyperparameters = {
        "mu": Hyper(1.0, "mu, weight of the classification term ||y - W^T b||^2", positive=True),
        "nu": Hyper(0.1, "nu, weight of the classifier regulariser ||W||^2", positive=True),
        "eta": Hyper(55.0, "eta, weight of the quantization term ||b - u||^2", minimum=0.0),
        "dcc_iter": Hyper(10, "most discrete cyclic coordinate descent sweeps per epoch", minimum=1),
    }
    recipe = {}
    unsupported = {"ddp": "DSDH keeps a memory bank and binary codes of the whole training set per "
                          "process; each process would fill them from its own shard only"}

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, None, **hparams)
        self.mu, self.nu = self.hparams["mu"], self.hparams["nu"]
        self.eta, self.dcc_iter = self.hparams["eta"], self.hparams["dcc_iter"]
        labels = self._check_labels(train_labels)
        n = labels.shape[0]
        self.register_buffer("train_labels", labels, persistent=False)
        self.register_buffer("U", torch.zeros(n, self.bits))
        self.register_buffer("B", torch.where(torch.randn(n, self.bits) >= 0, 1.0, -1.0))
        self.register_buffer("W", ridge_weights(self.B, labels, self.num_classes, self.nu / self.mu))
        self.last_sweeps = 0  # DCC sweeps run by the last epoch_end (for logs and tests)

    @classmethod
    def memory_estimate(cls, num_classes, bits, num_train, batch_size, hparams=None):
        """Bytes of DSDH's own memory: the bank ``U`` and codes ``B`` (N, K) float32, ``W`` (K, C),
        the int64 labels (N,); then the larger of a step (``PAIR_TENSORS`` float32 B x N pair
        tensors, the per-class sums (C, K)) and the epoch hook (DCC's transposed copies and target,
        the float64 ridge solve: about 8 float32 N x K). Linear in N and C."""
        n, c, k, b = int(num_train), int(num_classes), int(bits), int(batch_size)
        state = FLOAT32 * (2 * n * k + k * c) + 8 * n
        step = FLOAT32 * (PAIR_TENSORS * b * n + 2 * c * k)
        epoch_end = FLOAT32 * (8 * n * k + 2 * c * k)
        return state + max(step, epoch_end)

    def _check_labels(self, train_labels):
        if train_labels is None:
            raise ValueError("dsdh needs train_labels, the class of every training sample")
        labels = torch.as_tensor(train_labels)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"train_labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"train_labels must be integers, got {labels.dtype}")
        labels = labels.to(device="cpu", dtype=torch.int64).clone()
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"train_labels must lie in [0, {self.num_classes - 1}], got range [{low}, {high}]")
        return labels

    @property
    def num_train(self):
        """N, the number of training samples."""
        return self.train_labels.shape[0]

    def forward(self, codes, labels, index=None):
        check_inputs(codes, labels, index, self.num_classes, self.bits, self.num_train)
        if self.training:
            self.U.index_copy_(0, index, codes.detach().to(self.U.dtype))
        n = self.num_train
        likelihood = pair_likelihood(codes, labels, self.U, self.train_labels, self.num_classes)
        targets = self.B.index_select(0, index)
        quant = quantization_loss(codes, targets)
        classify = classify_loss(targets, labels, self.W)
        reg = self.W.pow(2).sum()
        total = 2.0 * likelihood + (self.mu * classify + self.eta * quant + self.nu * reg / n) / n
        return {"likelihood": likelihood, "classify": classify, "quant": quant, "reg": reg, "total": total}

    def target(self):
        """``P = Y W^T + (eta/mu) U`` (N, K), the linear term of the B-step."""
        return self.W.t().index_select(0, self.train_labels) + (self.eta / self.mu) * self.U

    @torch.no_grad()
    def epoch_end(self):
        """B-step (DCC, up to ``dcc_iter`` sweeps) then W-step, on the whole training set."""
        codes, self.last_sweeps = dcc(self.B, self.W, self.target(), self.dcc_iter)
        self.B.copy_(codes)
        self.W.copy_(ridge_weights(self.B, self.train_labels, self.num_classes, self.nu / self.mu))

    def objective(self):
        """The (B, W) part of J at the current state (float, reads the host)."""
        return float(discrete_objective(self.B, self.W, self.train_labels, self.U, self.mu, self.nu, self.eta))
