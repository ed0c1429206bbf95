"""DCWH: Deep Class-Wise Hashing (Xuefei Zhe, Shifeng Chen, Hong Yan, "Deep Class-Wise Hashing:
Semantics-Preserving Hashing via Class-wise Loss", IEEE Transactions on Neural Networks and
Learning Systems, 2019 (early access); arXiv:1803.04137). Reference code: mzhang367/dcwh,
``loss.py`` (``ClassWiseLoss``) and ``dcwh.py`` (training script).

Equation numbers: the paper's body was not reachable while this was written, so the terms are
named after the paper's wording and the reference code (class-wise loss; "Stage I:
establishment with cubic constraint"; "Stage II: refine with vertex constraint"), not numbered.

Loss as implemented, with ``u`` the network output (B x K), ``b = sign(u)`` (sign(0) = -1, the
project's convention), ``m_c`` the class centers (C x K) and ``d_ic = ||u_i - m_c||^2``::

    pull   = -1/B sum_i log softmax_c(-inv_var/2 * d_ic)[y_i]   (normalised Gaussian over centers)
    cubic  =  1/B sum_i sum_k relu(|u_ik| - cubic_bound)        (keep u inside the cube [-1.1, 1.1]^K)
    vertex =  1/B sum_i ||b_i - u_i||^2                         (pull u to the cube's vertices; b no gradient)
    total  = pull + weight_cubic * cubic + weight_vertex * vertex

* ``pull`` is DCDH's pull term (``methods.dcdh.pull_loss``) with ``sigma = inv_var``: the paper's
  Gaussian ``exp(-||u - m||^2 / (2 s^2))`` and the reference's ``exp(-0.5 * inv_var * d)`` are
  the same with ``inv_var = 1/s^2``, and ``pull_loss`` uses logits ``-sigma/2 * d``. The default
  ``inv_var = 0.5`` (the reference flag's default) is ``s^2 = 2`` (``s = sqrt 2``).
* Centers (hyperparameter ``centers``):
  ``"mean"`` (the reference's default; its ``-u`` flag is off): a buffer, N(0, 1) at the start,
  replaced every ``update_every`` (2) epochs by the per-class means of ``u``; no gradient.
  ``"learned"``: an ``nn.Parameter`` (C, K), N(0, 1), optimised with the network (the harness
  puts it in its own optimizer group with the network's weight decay), as in DCDH.
* Mean mode bookkeeping: ``forward`` (in training mode only, ``self.training``) adds the
  detached codes into the persistent buffers ``class_sums`` (C, K) and ``class_counts`` (C,) with
  ``index_add_`` (no host reads); ``epoch_end()`` (called by the loop under ``torch.no_grad``
  after every epoch) increments the persistent 0-d int64 buffer ``epochs_done``, all-reduces
  sums and counts when ``self.all_reduce`` is set (distributed runs: every process then holds
  the same global means), and when ``epochs_done % update_every == 0`` sets each center to its
  class mean (a class with no sample in the epoch keeps its center); the accumulators are then
  zeroed, so each update uses the codes of the epoch that just ended. The update is branch-free
  (``torch.where`` on a 0-d flag), so ``epoch_end`` reads nothing back to the host and calls
  ``all_reduce`` at every epoch on every process (the same collectives everywhere). All of this
  state is in ``state_dict()``, so ``--resume`` restores it.

Shapes and dtypes: ``forward(codes, labels, index=None)`` takes codes float (B, K) (float32 from
the loop; float64 after ``.double()``), labels int64 (B,) in [0, C), index int64 (B,) or None
(unused) and returns a dict of 0-d tensors ``pull``, ``cubic``, ``vertex``, ``total``.
``state_dict()``: ``centers`` (C, K) float in both modes; in mean mode also ``class_sums``
(C, K) float, ``class_counts`` (C,) float (exact counts below 2^24 per class in float32) and
``epochs_done`` () int64.

Errors: ValueError for C < 2, K < 1, an unknown hyperparameter or a value out of range (from
``methods.base``), and for a batch of the wrong shape or labels out of range (``check_batch``;
the range is checked only for CPU labels, so a GPU step never syncs).

Differences from the paper and the reference code:

1. Cubic and vertex weighting. The reference computes
   ``loss_cubic = relu(-1.1 - u).sum() + relu(u - 1.1).sum() / B`` (operator precedence: only the
   upper side is divided by B), ``loss_l3 = (sign(u) - u).pow(2).sum() / B`` and
   ``loss = pull + (10 * loss_cubic + 0.01 * loss_l3) / B``. Per-sample (mean over the batch)
   that is weight 10 on the lower side ``relu(-1.1 - u)``, 10/B on the upper side
   ``relu(u - 1.1)`` and 0.01/B on the vertex term (with the reference's B = 128: 10, 0.078 and
   7.8e-5) — an asymmetric penalty and a vertex weight that changes with the batch size. We
   compute the stated form, ``relu(|u| - 1.1) = relu(-1.1 - u) + relu(u - 1.1)`` on both sides
   with weight 10 and the vertex term with weight 0.01, each averaged over the batch.
   ``authors_scaling=True`` reproduces the reference's scaling exactly (``cubic`` and ``vertex``
   are then the reference's ``loss_cubic / B`` and ``loss_l3 / B``).
2. Pull term: ``log_softmax`` (via ``pull_loss``) instead of the reference's
   ``log(exp(.) / (sum exp(.) + 1e-6) + 1e-6)``, which underflows to a constant loss with zero
   gradient when every distance is large (the same change as in DCDH).
3. ``inv_var``: the reference parses ``--inv_var`` (default 0.5) and prints it, but never passes
   it to ``ClassWiseLoss``, whose own default ``inv_var=1`` is what its training uses. We use
   the flag's 0.5 (the stated hyperparameter); ``inv_var=1`` reproduces the code's behaviour.
4. Mean centers: the reference recomputes them after epochs 2, 4, ... by an extra pass over the
   training loader (training augmentation, network in eval mode); we average the codes the
   training step already computed during that epoch (network in train mode, its parameters
   changing through the epoch), which saves that pass. The reference leaves the row of a class
   absent from the pass uninitialised (``torch.Tensor(C, K)``); we keep its previous center.
   Under DDP the means span all processes (``all_reduce``); a DistributedSampler's padding
   repeats a few samples in them.
5. Learned centers: in the reference's ``-u`` mode the optimizer branches are swapped (with
   ``-u`` only the network's parameters are optimised; without it the centers' group is empty),
   so its "learned" centers stay at their random initialisation. Ours are optimised.
6. ``b = sign(u)`` maps 0 to -1 (the project's ``binarize``); ``torch.sign`` in the reference
   maps it to 0. Only exact zeros differ.
7. Training stages: the abstract describes a two-step optimisation (Stage I with the cubic
   constraint, Stage II refining with the vertex constraint); the reference code, and this
   module, add both terms at every step from the first epoch.
8. Recipe: ``recipe = {}`` (the harness's backbone recipe, DCDH's on DFHNet). The only
   optimiser recipe available for DCWH, the reference script's, trains ImageNet-pretrained
   ResNet-50 / GoogLeNet / VGG-19 on 224 x 224 CIFAR-10/100 (SGD momentum 0.9, weight decay
   5e-4, lr 0.001 x 0.1 every 50 epochs, 150 epochs, batch 128, stop after 50 epochs without a
   lower training loss), not a small network trained from scratch on 32 x 32 faces; the paper's
   own face settings could not be checked here.

DDP: supported (see the mean-mode notes above; learned centers' gradients are averaged by the
loop like DCDH's). The method must not be wrapped in DistributedDataParallel with
``broadcast_buffers`` (the harness does not wrap it), or rank 0's accumulators would replace
the others' at every step.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.metrics import binarize

from .base import FLOAT32, LOGIT_TENSORS, HashingMethod, Hyper, check_batch
from .dcdh import pull_loss

__all__ = ["DCWH", "cubic_loss", "vertex_loss"]


def cubic_loss(codes, bound=1.1, authors_scaling=False):
    """Cubic constraint: ``1/B sum_i sum_k relu(|u_ik| - bound)``.

    Args: codes float (B, K); bound float >= 0; authors_scaling: the reference's
    ``(relu(-bound - u).sum() + relu(u - bound).sum() / B) / B`` instead (see the module notes).
    Returns: a 0-d tensor, differentiable w.r.t. codes.
    """
    b = codes.shape[0]
    if authors_scaling:
        return (F.relu(-bound - codes).sum() + F.relu(codes - bound).sum() / b) / b
    return F.relu(codes.abs() - bound).sum() / b


def vertex_loss(codes, authors_scaling=False):
    """Vertex constraint: ``1/B sum_i ||b_i - u_i||^2`` with ``b = sign(u)`` (0 -> -1, no gradient).

    Args: codes float (B, K); authors_scaling: divide by ``B^2`` as the reference does.
    Returns: a 0-d tensor, differentiable w.r.t. codes.
    """
    b = codes.shape[0]
    loss = (binarize(codes.detach()) - codes).pow(2).sum() / b
    return loss / b if authors_scaling else loss


class DCWH(HashingMethod):
    """DCWH loss: Gaussian class-center likelihood plus cubic and vertex constraints.

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.  train_labels: unused.
        inv_var (float): 1/s^2 of the Gaussian, the ``sigma`` of ``pull_loss`` (0.5).
        weight_cubic (float): weight of the cubic term (10).
        weight_vertex (float): weight of the vertex term (0.01).
        cubic_bound (float): half-width of the cube the cubic term keeps codes in (1.1).
        centers (str): ``"mean"`` (per-class means of u, recomputed; the reference's default)
            or ``"learned"`` (a parameter optimised with the network).
        update_every (int): epochs between mean-center updates (2); mean mode only.
        authors_scaling (bool): the reference's cubic/vertex scaling, precedence slip included.

    ``forward(codes, labels, index=None)`` -> ``{"pull", "cubic", "vertex", "total"}`` (0-d tensors);
    ``epoch_end()`` updates the mean centers. See the module docstring for details and
    every difference from the paper and the reference code.
    """
    name = "dcwh"
    hyperparameters = {
        "inv_var": Hyper(0.5, "1/sigma^2 of the Gaussian over class centers (logits -inv_var/2 * d)",
                         positive=True),
        "weight_cubic": Hyper(10.0, "weight of the cubic constraint relu(|u| - cubic_bound)", minimum=0.0),
        "weight_vertex": Hyper(0.01, "weight of the vertex constraint ||sign(u) - u||^2", minimum=0.0),
        "cubic_bound": Hyper(1.1, "half-width of the cube of the cubic constraint", minimum=0.0),
        "centers": Hyper("mean", "class centers: per-class means of u recomputed every update_every "
                                 "epochs, or learned with the network", choices=("mean", "learned")),
        "update_every": Hyper(2, "epochs between recomputations of the mean centers", minimum=1),
        "authors_scaling": Hyper(False, "scale the cubic and vertex terms as the reference code does "
                                        "(upper cubic side and vertex term divided by the batch size again)"),
    }
    recipe = {}
    unsupported = {}

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        h = self.hparams
        self.inv_var, self.cubic_bound = h["inv_var"], h["cubic_bound"]
        self.weight_cubic, self.weight_vertex = h["weight_cubic"], h["weight_vertex"]
        self.update_every, self.authors_scaling = h["update_every"], h["authors_scaling"]
        self.mean_centers = h["centers"] == "mean"
        init = torch.randn(self.num_classes, self.bits)
        if self.mean_centers:
            self.register_buffer("centers", init)
            self.register_buffer("class_sums", torch.zeros(self.num_classes, self.bits))
            self.register_buffer("class_counts", torch.zeros(self.num_classes))
            self.register_buffer("epochs_done", torch.zeros((), dtype=torch.int64))
        else:
            self.centers = nn.Parameter(init)

    @classmethod
    def memory_estimate(cls, num_classes, bits, num_train, batch_size, hparams=None):
        """Bytes of DCWH's own memory for one step: centers (C, K) with, when learned, their
        gradient and two Adam moments, or, for mean centers, the per-class sums and counts; plus
        ``LOGIT_TENSORS`` B x C tensors of the pull term. Linear in C."""
        c, k, b = int(num_classes), int(bits), int(batch_size)
        mean = (hparams or {}).get("centers", cls.hyperparameters["centers"].default) == "mean"
        state = 2 * c * k + c if mean else 4 * c * k
        return FLOAT32 * (state + LOGIT_TENSORS * b * c)

    def forward(self, codes, labels, index=None):
        check_batch(codes, labels, self.num_classes, index)
        pull = pull_loss(codes, labels, self.centers, self.inv_var)
        cubic = cubic_loss(codes, self.cubic_bound, self.authors_scaling)
        vertex = vertex_loss(codes, self.authors_scaling)
        total = pull + self.weight_cubic * cubic + self.weight_vertex * vertex
        if self.mean_centers and self.training:
            with torch.no_grad():
                self.class_sums.index_add_(0, labels, codes.detach().to(self.class_sums.dtype))
                self.class_counts.index_add_(0, labels, self.class_counts.new_ones(labels.shape[0]))
        return {"pull": pull, "cubic": cubic, "vertex": vertex, "total": total}

    @torch.no_grad()
    def epoch_end(self):
        """Count the epoch; every ``update_every`` epochs set the mean centers to the per-class
        means accumulated during the epoch (all-reduced first when ``all_reduce`` is set); zero
        the accumulators. Nothing in learned mode. No host reads."""
        if not self.mean_centers:
            return
        self.epochs_done.add_(1)
        if self.all_reduce is not None:
            self.all_reduce(self.class_sums)
            self.all_reduce(self.class_counts)
        due = torch.remainder(self.epochs_done, self.update_every) == 0
        update = due & (self.class_counts > 0)[:, None]
        means = self.class_sums / self.class_counts.clamp_min(1.0)[:, None]
        self.centers.copy_(torch.where(update, means.to(self.centers.dtype), self.centers))
        self.class_sums.zero_()
        self.class_counts.zero_()
