"""DDAH: Discriminative Deep Attention-Aware Hashing (Zhi Xiong, Bo Li, Xiaoyan Gu, Wen Gu, Weiping
Wang, "Discriminative Deep Attention-Aware Hashing for Face Image Retrieval", PRICAI 2019).
Reference code: deephashface/DDAH ``train.py`` (loss, optimizers, recipe) and ``model.py``
(network), read for their behaviour; written anew. The paper's body was not reachable while this
was written: the terms below are named after the reference code and the paper's abstract (a face
spatial network with a "face spatial loss", an attention-aware hash network).

DDAH needs its own network, ``models.ddahnet.DDAHNet`` (``requires_backbone = "ddahnet"``): its
loss compares two branches of it, A (hash network on the image weighted by the spatial attention
map) and B (the same hash network on the plain image). In training mode the network returns
``[u_a, u_b]`` (B x 2K); retrieval uses ``u_a`` (eval mode returns it alone).

Loss, per branch ``x`` in {a, b}, with ``W, c`` one softmax classifier on ``tanh(u)`` shared by
both branches (the reference's ``classifier``: Tanh, Linear K -> C; a parameter of this method)::

    softmax_x = -1/B sum_i log softmax(W tanh(u_x,i) + c)[y_i]
    quant_x   =  1/B sum_i sum_k | |u_x,ik| - 1 |
    L_x       = softmax_x + weight_quant * quant_x                 (weight_quant = 0.001)
    hinge     = max(0, margin + L_a - L_b)                         (margin = 0)

Two optimizers (``build_optimizer``, the registry's hook for a method's own optimisation step):
the **trunk** optimizer (hash network and classifier) minimises ``L_a + L_b``; the **attention**
optimizer (face spatial network) minimises ``L_a + L_b + hinge``: the spatial network is trained
to make the attended branch better than the plain one. ``total`` (what the loop back-propagates
and logs, and what the best checkpoint is chosen by) is ``L_a + L_b``; ``hinge`` is logged.

How one backward pass gives both gradients: ``L_b`` does not depend on the spatial network, so
``grad_att(hinge) = [margin + L_a - L_b > 0] grad_att(L_a)`` and the attention optimizer's
gradient is ``grad_att(L_a + L_b) * (1 + [margin + L_a - L_b > 0])``. ``forward`` leaves that
factor on the device (a 0-d tensor; no host read) and the optimizer set's ``step()`` multiplies
the spatial network's gradients by it before both optimizers step. ``tests/test_method_ddah.py``
checks the result against the reference's two backward passes.

Recipe (``recipe``, the reference's): Adam (plain, for both optimizers), lr 0.001, weight decay
1e-4, lr halved every 100 epochs, 1000 epochs, batch 256; no early stopping in the reference, so
``patience`` is 1000. ``--optimizer sgd`` builds two SGD optimizers (momentum 0.9) instead.

Shapes and dtypes: ``forward(codes, labels, index=None)`` takes codes float (B, 2K) (both
branches), labels int64 (B,) in [0, C), index unused; returns 0-d tensors ``softmax_a``,
``quant_a``, ``softmax_b``, ``quant_b``, ``hinge``, ``total``. ``state_dict()``:
``classifier.weight`` (C, K), ``classifier.bias`` (C,).

Errors: ValueError for C < 2, K < 1, a bad hyperparameter, codes without 2K columns (a network
other than ``ddahnet``) or CPU labels out of range; ``build_optimizer`` raises ValueError for a
network without ``branch_parameters()``.

DDP: the hinge's indicator is computed from the global batch's mean losses (``all_reduce``), so
every process scales by the same factor; gradients are averaged as for every method.

Differences from the reference code:

1. The reference steps the trunk optimizer between its two backward passes (``loss_c.backward(
   retain_graph=True)``, ``optimizer_b.step()``, then ``loss_s.backward()``), so its hinge
   gradient is computed through a graph whose weights were partly updated in place (which current
   PyTorch refuses). Here both gradients are those of the same, pre-step weights.
2. ``bn1`` and ``bn2`` of the spatial network are in the attention optimizer (the reference lists
   them in neither, so they never train); see ``models.ddahnet``.
3. At ``margin + L_a - L_b == 0`` exactly the hinge passes no gradient (``torch.clamp``'s
   subgradient in the reference passes it); a measure-zero case.
4. The best checkpoint is the one with the lowest ``L_a + L_b`` (the harness's rule); the
   reference saves the last epoch's weights.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.optimizers import OptimizerSet

from .base import HashingMethod, Hyper, check_batch

__all__ = ["DDAH", "branch_loss"]


def branch_loss(codes, labels, classifier):
    """One branch's terms ``(softmax, quant)`` (its loss is ``softmax + weight_quant * quant``).

    Args: codes float (B, K); labels int64 (B,); classifier: the Linear K -> C applied to
    ``tanh(codes)``. Returns: two 0-d tensors, differentiable.
    """
    softmax = F.cross_entropy(classifier(torch.tanh(codes)), labels)
    quant = (codes.abs() - 1).abs().sum(1).mean()
    return softmax, quant


class DDAH(HashingMethod):
    """DDAH loss and its two optimizers (module docstring).

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1 (the network returns 2K columns while
            training).  train_labels: unused.
        weight_quant (float): weight of each branch's quantization term (0.001, the reference's
            ``LOSS_01``).
        margin (float): margin of the hinge between the branches (0, the reference's ``m``).
    """
    name = "ddah"
    hyperparameters = {
        "weight_quant": Hyper(0.001, "weight of each branch's quantization term sum_k | |u_k| - 1 |",
                              minimum=0.0),
        "margin": Hyper(0.0, "margin m of the hinge max(0, m + L_a - L_b) that trains the spatial attention"),
    }
    recipe = {"optimizer": "adam", "lr": 0.001, "weight_decay": 1e-4, "lr_step": 100, "lr_factor": 0.5,
              "epochs": 1000, "patience": 1000}
    unsupported = {}
    requires_backbone = "ddahnet"

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        self.weight_quant, self.margin = self.hparams["weight_quant"], self.hparams["margin"]
        self.classifier = nn.Linear(self.bits, self.num_classes)
        nn.init.xavier_normal_(self.classifier.weight)  # the reference's initialisation
        nn.init.zeros_(self.classifier.bias)
        self.attention_grad_scale = None  # 1 + [hinge active], set by forward, read by the optimizers

    def forward(self, codes, labels, index=None):
        if codes.dim() == 2 and codes.shape[1] != 2 * self.bits:
            raise ValueError(f"ddah needs both branches' codes, (B, {2 * self.bits}), from the ddahnet network in "
                             f"training mode; got {codes.shape[1]} columns")
        check_batch(codes, labels, self.num_classes, index, bits=2 * self.bits)
        softmax_a, quant_a = branch_loss(codes[:, :self.bits], labels, self.classifier)
        softmax_b, quant_b = branch_loss(codes[:, self.bits:], labels, self.classifier)
        loss_a = softmax_a + self.weight_quant * quant_a
        loss_b = softmax_b + self.weight_quant * quant_b
        with torch.no_grad():
            gap = self.margin + loss_a - loss_b
            hinge = gap.clamp_min(0.0)
            if self.all_reduce is not None:  # the global batch's mean losses decide, the same everywhere
                stats = torch.stack([loss_a, loss_b, torch.ones_like(loss_a)])
                self.all_reduce(stats)
                gap = self.margin + (stats[0] - stats[1]) / stats[2]
            self.attention_grad_scale = 1.0 + (gap > 0).to(torch.float32)
        return {"softmax_a": softmax_a, "quant_a": quant_a, "softmax_b": softmax_b, "quant_b": quant_b,
                "hinge": hinge, "total": loss_a + loss_b}

    def scale_attention_gradients(self, params):
        """Multiply the gradients of ``params`` (the spatial network's) by the factor the last
        ``forward`` left (nothing before the first); in place, no host read."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads and self.attention_grad_scale is not None:
            torch._foreach_mul_(grads, self.attention_grad_scale.to(grads[0].device))

    def build_optimizer(self, model, recipe):
        """The two optimizers, as one ``OptimizerSet``: ``attention`` over the network's face spatial
        network, ``trunk`` over its hash network and this method's classifier; the recipe's
        optimizer (Adam without amsgrad, or SGD momentum 0.9), lr and weight decay for both.

        Raises: ValueError when ``model`` has no ``branch_parameters()`` (not a DDAHNet) or the
        recipe names another optimizer.
        """
        branches = getattr(model, "branch_parameters", None)
        if branches is None:
            raise ValueError(f"ddah trains the two-branch ddahnet network, not {type(model).__name__}")
        parts = branches()
        lr, wd = recipe["lr"], recipe["weight_decay"]
        if recipe["optimizer"] == "adam":
            def make(params):
                return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=True)
        elif recipe["optimizer"] == "sgd":
            def make(params):
                return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, fused=True)
        else:
            raise ValueError(f"unknown optimizer {recipe['optimizer']!r}; expected adam or sgd")
        own = [p for p in self.parameters() if p.requires_grad]
        optimizers = {"attention": make(parts["attention"]), "trunk": make(parts["trunk"] + own)}
        return OptimizerSet(optimizers, before_step=functools.partial(self.scale_attention_gradients,
                                                                      parts["attention"]))
