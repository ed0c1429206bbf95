"""OrthoHash (Hoe, Ng, Zhang, Chan, Song, Xiang, "One Loss for All: Deep Hashing with a Single
Cosine Similarity based Learning Objective", NeurIPS 2021; arXiv 2109.14449). Reference code read
(not copied): kamwoh/orthohash (``functions/loss/orthohash.py``, ``models/alexnet.py``,
``scripts/train_hashing.py``, ``main.py``).

Each class ``j`` owns a fixed codeword ``o_j`` in {-1, +1}^K (the paper's "binary orthogonal
targets", near-orthogonal when random). The network's continuous code ``v`` (B, K) — in the paper
and the reference the output of a BatchNorm1d that ends the hash layer (Sec. 3, Fig. 2) — is
classified by scaled cosine similarity with an additive margin on the true class::

    cos_ij = <v_i, o_j> / (||v_i|| ||o_j||)                            (B, C)
    logit_ij = s * (cos_ij - m [j = y_i])                              ("cos" margin, the default)
    logit_ij = s * cos(arccos(clamp(cos_ij)) + m [j = y_i])            ("arc" margin, option)
    ce    = mean_i CE(logit_i, y_i)
    quant = mean_i (1 - cos(v_i, sign(v_i)))                           ("cs", the reference default;
                                                                        "l1", "l2": mean |v - sign v|, (v - sign v)^2)
    total = ce + quan * quant                                          (quan = 0 by default: one loss)

``sign(v)`` in the quantization term is detached (as in the reference) and uses this project's
``sign(0) = -1``. The paper's text was not reachable from here, so no equation numbers are given;
the formulas are those of the reference code, which its README says reproduces the paper.

Where the BatchNorm sits (the one design decision of this port): in the reference, the hash layer
is ``Linear(no bias) -> BatchNorm1d(K)``; the cosine loss and the retrieval codes both use that
BN output ``v`` (``sign(v)`` at test time, in eval mode). Our networks already end their hash
layer in ``BatchNorm1d(K)`` (DFHNet ``hash_layer``, SphereNet ``bn_last``, the torchvision hash
layer), and evaluation is ``sign(network output)``. So by default (``method_bn=False``) the loss
is applied to the network output itself — the reference's placement exactly, and the evaluated
codes are the signs of the very vector the loss trained. ``method_bn=True`` adds a
BatchNorm1d(K) (momentum 0.1, as the reference) owned by this method (its weight and bias go in
the method's optimizer group) between the network and the cosine: a second BN for our backbones,
and its per-bit shift (running mean, bias) is NOT applied at evaluation, which encodes
``sign(u)`` rather than ``sign(BN(u))`` — the trained and evaluated bits can differ. It exists
only for a backbone whose hash layer would lack a final BN.

Codewords (``codebook`` hyperparameter; a persistent buffer ``codebook`` (C, K) float32 of +-1,
built once on the CPU from a ``torch.Generator`` seeded with ``seed``, saved in and restored
from the checkpoint; ``min_distance`` attribute = their minimum pairwise Hamming distance):

* ``bernoulli`` (default): C independent Bernoulli(0.5) words, the reference's default
  (``--codebook-method B``). Duplicates are possible: at K = 12 with C = 299 about 11 pairs of
  classes share a codeword (C^2 / 2^(K+1) expected), which makes them inseparable.
* ``maxmin``: the greedy far-apart construction of ``methods.csq.far_apart_codes`` (the
  counterpart of the reference's ``--codebook-method O``, which the README says helps 1-2%).

Shapes/dtypes: ``forward(codes, labels, index=None)``: codes float (B, K), labels int64 (B,) in
[0, C), index ignored -> dict of 0-d tensors ``ce``, ``quant``, ``total``. No operation reads a
device value back to the host (the margin is placed with ``scatter``, not ``one_hot``, whose
range check reads back). Errors: ValueError for C < 2, K < 1, bad hyperparameters, bad shapes,
(CPU) labels out of range. Warning when C > 2^K with ``codebook=maxmin`` (words repeat).

Differences from the paper and the reference code (all stated):

* BatchNorm: the network's own final BN plays the reference's hash-layer BN (above); the
  reference's hash Linear has no bias, DFHNet's has one (BN removes it anyway).
* Zero vectors: the cosine normalises with ``F.normalize`` (norm clamped at 1e-12), so a zero
  code gives cosine 0 instead of the reference's NaN (0/0).
* ``sign(0) = -1`` in the quantization target (reference ``torch.sign``: 0).
* Not implemented: the multi-label losses (label smoothing, BCE, "imbalance"; faces are single
  label) and the ``ce`` weight (always 1, the reference default).
* Defaults s = 8, m = 0.2, cos margin, quan = 0 (no quantization term), Bernoulli codewords:
  the reference ``main.py`` defaults, which its README calls "the default parameters to get the
  performance in the paper" (its CIFAR-10 example uses m = 0.3).
* Optimisation recipe: the reference fine-tunes ImageNet-pretrained AlexNet with Adam, lr 1e-4
  (the README advises a 10x lower backbone lr), weight decay 5e-4, batch 256, 100 epochs, lr x0.1
  at 80%. That does not fit the from-scratch DFHNet, so ``recipe = {}``: the shared backbone
  recipe (a stated change).
* Distributed training: with ``method_bn=True`` the method's BN uses per-process batch
  statistics (the reference trains on one GPU).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.metrics import binarize

from .base import HashingMethod, Hyper, check_batch
from .csq import bernoulli_codes, far_apart_codes, min_hamming_distance

ARC_CLAMP = 0.99999
"""The reference clamps cosines to +-0.99999 before ``arccos`` (its gradient is infinite at +-1)."""


def cosine_logits(codes, codebook):
    """Cosine similarities ``cos(v_i, o_j)``. Args: codes float (B, K); codebook (C, K).
    Returns float (B, C) in [-1, 1]; a zero code row gives 0."""
    return F.normalize(codes, dim=1) @ F.normalize(codebook.to(codes.dtype), dim=1).t()


def margin_logits(cos, labels, scale, margin, margin_type="cos"):
    """Scaled logits with the margin on each sample's own class.

    ``cos``: ``s * (cos - m [j = y])``; ``arc``: ``s * cos(arccos(clamp(cos)) + m [j = y])``, every
    cosine clamped to +-``ARC_CLAMP`` as in the reference.
    Args: cos float (B, C); labels int64 (B,); scale s; margin m; margin_type "cos" | "arc".
    Returns float (B, C). Raises: ValueError for another margin type.
    """
    shift = torch.zeros_like(cos).scatter_(1, labels[:, None], margin)
    if margin_type == "cos":
        return scale * (cos - shift)
    if margin_type == "arc":
        return scale * torch.cos(torch.acos(cos.clamp(-ARC_CLAMP, ARC_CLAMP)) + shift)
    raise ValueError(f"unknown margin type {margin_type!r}; expected cos or arc")


def quantization_error(codes, kind="cs"):
    """Distance of ``v`` to its (detached) sign: ``cs`` mean(1 - cos(v, b)), ``l1`` mean|v - b|,
    ``l2`` mean (v - b)^2, with ``b = sign(v)`` (sign(0) = -1). Returns a 0-d tensor.
    Raises: ValueError for another kind."""
    target = binarize(codes.detach())
    if kind == "cs":
        return (1.0 - F.cosine_similarity(codes, target, dim=1)).mean()
    if kind == "l1":
        return (codes - target).abs().mean()
    if kind == "l2":
        return (codes - target).pow(2).mean()
    raise ValueError(f"unknown quantization type {kind!r}; expected cs, l1 or l2")


class OrthoHash(HashingMethod):
    """OrthoHash loss with fixed +-1 codewords (see the module docstring).

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.  train_labels: unused.
        scale (float): s (8).  margin (float): m (0.2).  margin_type: "cos" | "arc".
        quan (float): quantization weight (0).  quan_type: "cs" | "l1" | "l2".
        codebook: "bernoulli" | "maxmin".  seed (int): codebook seed (0).
        method_bn (bool): a BatchNorm1d(K) of the method before the cosine (False).

    Attributes: ``codebook`` buffer (C, K) float32 of +-1 (persistent); ``bn`` (BatchNorm1d or
    None); ``min_distance`` (int).

    ``forward(codes, labels, index=None)`` -> ``{"ce", "quant", "total"}`` (0-d tensors).
    """
    name = "orthohash"
    hyperparameters = {
        "scale": Hyper(8.0, "s, scale of the cosine logits", positive=True),
        "margin": Hyper(0.2, "m, margin subtracted from the true class's cosine (or added to its angle)",
                        minimum=0.0),
        "margin_type": Hyper("cos", "cos: s (cos - m); arc: s cos(theta + m)", choices=("cos", "arc")),
        "quan": Hyper(0.0, "weight of the quantization term (reference default 0: one loss)", minimum=0.0),
        "quan_type": Hyper("cs", "quantization term: cs (1 - cosine to sign), l1, l2",
                           choices=("cs", "l1", "l2")),
        "codebook": Hyper("bernoulli", "codewords: bernoulli (reference) or maxmin (greedy far-apart)",
                          choices=("bernoulli", "maxmin")),
        "seed": Hyper(0, "seed of the codebook", minimum=0),
        "method_bn": Hyper(False, "own BatchNorm1d(K) before the cosine (our backbones already end in BN; "
                                  "not applied at evaluation)"),
    }

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        hp = self.hparams
        self.scale, self.margin, self.margin_type = hp["scale"], hp["margin"], hp["margin_type"]
        self.quan, self.quan_type = hp["quan"], hp["quan_type"]
        generator = torch.Generator().manual_seed(hp["seed"])
        if hp["codebook"] == "maxmin":
            codebook = far_apart_codes(self.num_classes, self.bits, generator)
        else:
            codebook = bernoulli_codes(self.num_classes, self.bits, generator)
        self.register_buffer("codebook", codebook)
        self.min_distance = min_hamming_distance(codebook)
        self.register_load_state_dict_post_hook(_refresh_min_distance)
        self.bn = nn.BatchNorm1d(self.bits, momentum=0.1) if hp["method_bn"] else None

    def forward(self, codes, labels, index=None):
        check_batch(codes, labels, self.num_classes, index, bits=self.bits)
        v = self.bn(codes) if self.bn is not None else codes
        logits = margin_logits(cosine_logits(v, self.codebook), labels, self.scale, self.margin,
                               self.margin_type)
        ce = F.cross_entropy(logits, labels)
        quant = quantization_error(v, self.quan_type)
        total = ce + self.quan * quant
        return {"ce": ce, "quant": quant, "total": total}

    def extra_repr(self):
        return super().extra_repr() + f", min_distance={self.min_distance}"


def _refresh_min_distance(module, incompatible_keys):
    module.min_distance = min_hamming_distance(module.codebook.cpu())
