"""DPSH: Deep Pairwise-Supervised Hashing (Li, Zhao, Kang, "Feature Learning based Deep Supervised
Hashing with Pairwise Labels", IJCAI 2016, Sec. 3: the pairwise-label likelihood and its relaxed,
regularised objective). Reference code read (not copied): jiangqy/DPSH-pytorch
``DPSH_CIFAR_10.py`` (the authors' group) and swuxyj/DeepHash-pytorch ``DPSH.py``.

The paper minimises, over the whole training set (its relaxed problem, ``Theta_ij = 1/2 u_i^T u_j``)::

    J = sum_{i,j} [ log(1 + exp(Theta_ij)) - s_ij Theta_ij ]  +  eta * sum_i ||b_i - u_i||^2

with ``s_ij = 1`` when samples i and j share an identity, else 0, and ``b_i = sign(u_i)``.
(Equation numbers are not given here: the paper's text was not available while writing this,
only the two reference implementations.)

As implemented (one mini-batch, ``u`` the batch codes, ``U`` the memory bank of all N
training codes, B the batch size)::

    U[index] <- u.detach()                                   # first, as both references do
    likelihood = mean_{i in batch, j < N} [ softplus(Theta_ij) - s_ij Theta_ij ],
                 Theta_ij = 1/2 <u_i, U_j>,  s_ij = [y_i == train_labels[j]]
    quant      = mean_{i in batch} ||b_i - u_i||^2            (b = sign(u), sign(0) = -1)
    total      = likelihood + (eta / N) * quant

which is exactly the paper's J restricted to the batch's rows and divided by ``B * N``
(the normalisation of jiangqy/DPSH-pytorch: both its terms are divided by ``num_train * batch``).
``softplus(x) = log(1 + exp(x))`` is evaluated stably (``torch.nn.functional.softplus``, linear
for large x), so huge codes give finite losses and gradients; since ``softplus(x) - x =
softplus(-x)``, each pair costs one softplus: of ``-Theta_ij`` when ``s_ij = 1``, else of ``Theta_ij``.

State: ``bank`` (N, K) float32, a persistent buffer (saved in the checkpoint, restored on
``--resume``), zeros at the start as in both references; ``train_labels`` (N,) int64, a
non-persistent buffer (moves with ``.to(device)``, kept out of checkpoints). The bank is a
constant for autograd: the gradient is that of the batch rows ``u_i`` only (the references'
choice), not of the copy of ``u_i`` the bank holds.

Shapes/dtypes: ``forward(codes float (B, K), labels int64 (B,), index int64 (B,))`` ->
``{"likelihood", "quant", "total"}``, 0-d tensors of ``codes``' dtype. ``labels`` must equal
``train_labels[index]`` (the trainer's batches satisfy this; it is not checked, which would need
a host read on a GPU). The step reads nothing back to the host (no ``.item()``, boolean
indexing or ``nonzero``); the label/index range checks run only on CPU tensors.

Raises ValueError: ``train_labels`` missing, not 1-D integer, empty or outside [0, C);
``codes`` not (B, K) with K = ``bits``; ``labels``/``index`` of the wrong shape or dtype;
``index`` missing; labels or index out of range (checked on CPU only).

Differences from the paper and the reference code (all deliberate, all stated):

* Whole training set vs. mini-batch: the paper's J sums over all N^2 pairs and all N samples
  (optimised by mini-batch SGD over the rows of the batch); here, as in both references, one
  step sees the batch rows against the bank, normalised by ``B * N``, so ``eta`` keeps its
  paper meaning as the ratio of the two sums. The quantization weight per sample is therefore
  ``eta / N`` (e.g. 1.5e-4 on FaceScrub's 67,177 images): small, as in jiangqy/DPSH-pytorch.
  DeepHash-pytorch instead uses ``0.1 * mean over the B*K entries of (u - sign u)^2``, i.e. a
  per-sample weight of ``0.1 / K`` — equivalent to ``eta = 0.1 * N / K`` here.
* Similarity: ``s_ij`` from single identity labels (the references use ``y_i . y_j > 0`` on
  one-hot/multi-hot labels — the same thing for single labels).
* The self-pair (i, i) and the other batch rows are part of the sum, through the bank, as in
  both references.
* eta: 10, the CIFAR-10 value of jiangqy/DPSH-pytorch (``DPSH_CIFAR_10_demo.py``, with the
  normalisation above); the paper chooses eta on a validation set (its exact value for our
  face sets is not given) — a stated choice.
* Optimizer: the paper fine-tunes an ImageNet-pretrained CNN-F (jiangqy: pretrained AlexNet /
  VGG-11, SGD lr 0.05, weight decay 1e-5, lr x0.1 every 50 epochs, 150 epochs, batch 128;
  DeepHash: RMSprop lr 1e-5). That recipe is for a pretrained ImageNet network and does not fit
  the from-scratch DFHNet/SphereNet here, so ``recipe = {}``: the harness's shared recipe is
  used for every method (a stated change).
* Multi-process training (DDP) is refused: each process would fill only its own shard's bank
  rows (no all-gather of codes is implemented).
"""
import torch
import torch.nn.functional as F

from utils.metrics import binarize

from .base import FLOAT32, HashingMethod, Hyper, check_batch


PAIR_TENSORS = 4
"""float32 (B, N) tensors alive at the peak of a DPSH step (3.3 measured with a 200,000-image
bank, 256 x 48, by the increase of the peak resident set)."""


def pairwise_likelihood(codes, labels, bank, bank_labels):
    """Negative log-likelihood of the pairwise labels, mean over the ``B x N`` pairs.

    ``mean_ij [softplus(Theta_ij) - s_ij Theta_ij]``, ``Theta_ij = 1/2 <codes_i, bank_j>``.

    Args: codes float (B, K) (differentiable); labels int64 (B,); bank float (N, K) (treated as
    given: pass it detached); bank_labels int64 (N,). Returns: 0-d tensor.
    """
    theta = 0.5 * codes @ bank.t()
    # softplus(x) - x = softplus(-x): one softplus of +-theta (torch.where, not mask indexing)
    same = labels[:, None] == bank_labels[None, :]
    return F.softplus(torch.where(same, -theta, theta)).mean()


def quantization_error(codes):
    """``mean_i ||sign(u_i) - u_i||^2`` (sum over bits, mean over the batch), sign(0) = -1.

    Args: codes float (B, K). Returns: 0-d tensor; its gradient is ``2 (u - b) / B``.
    """
    return (codes - binarize(codes.detach())).pow(2).sum(1).mean()


def as_train_labels(train_labels, num_classes, name):
    """Validate and convert ``train_labels`` to an int64 CPU-or-device tensor (N,).

    Raises: ValueError when missing, not 1-D integer, empty, or outside [0, num_classes).
    """
    if train_labels is None:
        raise ValueError(f"{name} keeps a memory bank of the training codes and needs train_labels "
                         f"(the class of every training sample)")
    labels = torch.as_tensor(train_labels)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"train_labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"train_labels must be an integer tensor, got {labels.dtype}")
    labels = labels.long()
    low, high = int(labels.min()), int(labels.max())  # construction time, not a training step
    if low < 0 or high >= num_classes:
        raise ValueError(f"train_labels must lie in [0, {num_classes - 1}], got range [{low}, {high}]")
    return labels


def check_inputs(codes, labels, index, num_classes, bits, num_train):
    """``base.check_batch`` for a memory-bank method: ``index`` required, in [0, N); codes K wide.
    Raises ValueError naming the problem."""
    check_batch(codes, labels, num_classes, index, num_train=num_train, bits=bits)


class DPSH(HashingMethod):
    """DPSH loss against a memory bank of all training codes (see the module docstring).

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.
        train_labels (int64 tensor (N,)): class of every training sample, by training-set index.
        eta (float): weight of the quantization sum against the likelihood sum (paper's eta; 10).

    ``forward(codes, labels, index)``: codes float (B, K), labels int64 (B,), index int64 (B,)
    -> dict of 0-d tensors ``likelihood``, ``quant``, ``total`` (``likelihood + eta/N * quant``).
    Writes ``codes.detach()`` into ``bank[index]`` before computing the loss.

    Raises: ValueError (constructor) for bad sizes, hyperparameters or train_labels;
    ValueError (forward) for bad shapes, a missing index or out-of-range labels/index (CPU only).
    """
    name = "dpsh"
    hyperparameters = {
        "eta": Hyper(10.0, "weight of the quantization sum ||b - u||^2 against the pairwise likelihood "
                           "sum (paper's eta; 10 as in jiangqy/DPSH-pytorch on CIFAR-10)", minimum=0.0),
    }
    recipe = {}
    unsupported = {"ddp": "its memory bank of training codes is per process (no all-gather of codes)"}

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        self.eta = self.hparams["eta"]
        labels = as_train_labels(train_labels, self.num_classes, self.name)
        self.register_buffer("train_labels", labels, persistent=False)
        self.register_buffer("bank", torch.zeros(labels.numel(), self.bits))

    @classmethod
    def memory_estimate(cls, num_classes, bits, num_train, batch_size, hparams=None):
        """Bytes of DPSH's own memory for one step: the bank (N, K) float32 and the int64 labels
        (N,), and the B x N pair term: theta, the signed copy, softplus and their gradients
        (``PAIR_TENSORS`` float32) plus the boolean similarity. Linear in N, not in C."""
        n, k, b = int(num_train), int(bits), int(batch_size)
        return FLOAT32 * n * k + 8 * n + (FLOAT32 * PAIR_TENSORS + 1) * b * n

    @property
    def num_train(self):
        """N, the number of training samples (rows of the bank)."""
        return self.bank.shape[0]

    def forward(self, codes, labels, index=None):
        check_inputs(codes, labels, index, self.num_classes, self.bits, self.num_train)
        with torch.no_grad():
            self.bank.index_copy_(0, index.long(), codes.detach().to(self.bank.dtype))
        bank = self.bank.to(codes.dtype)
        likelihood = pairwise_likelihood(codes, labels, bank, self.train_labels)
        quant = quantization_error(codes)
        total = likelihood + (self.eta / self.num_train) * quant
        return {"likelihood": likelihood, "quant": quant, "total": total}

    def extra_repr(self):
        return super().extra_repr() + f", num_train={self.num_train}"
