"""DDH: Discriminative Deep Hashing (Jie Lin, Zechao Li, Jinhui Tang, "Discriminative Deep Hashing
for Scalable Face Image Retrieval", IJCAI 2017, Sec. 3.2-3.3). Reference code: xjcvip007/DDH
``DDH.py`` (Keras 1; its header calls the method DDQH), read for the loss and the recipe; written
anew. DDH brings its own network, ``models.ddhnet.DDHNet`` (``--backbone ddhnet``); this module is
the loss, which also trains any other backbone (``--backbone dfhnet``, the default, so that the
loss can be compared on the network every loss-only method uses; or ``ddhnet`` as published).

Loss, with ``u`` the network output (B x K; DDHNet's ends in tanh, so u is in (-1, 1)), ``W, c``
a softmax classifier on the codes (a Linear K -> C, a parameter of this method, optimised with it)::

    softmax = -1/B sum_i log softmax(W u_i + c)[y_i]          (cross-entropy of the classifier)
    quant   =  1/(B K) sum_i sum_k | |u_ik| - 1 |             (the reference's ``loss_01``)
    total   = softmax + weight_quant * quant                 (weight_quant = 0.01)

The reference's L2 penalty ``l2(1e-4)`` on the kernels is the recipe's weight decay (below).

Recipe (``recipe``, the reference's): Adam, lr 0.001 (Keras's default), weight decay 1e-4, a
constant learning rate (``lr_factor`` 1), 200 epochs, batch 256 (the harness's default), stop when
the epoch's training loss has not improved for more than 50 epochs (Keras ``EarlyStopping(monitor=
'loss', patience=50)``), keep the checkpoint with the lowest training loss (its
``ModelCheckpoint(save_best_only=True, monitor='loss')``). The recipe follows the method to any
backbone; ``--lr``, ``--epochs``, ``--patience``, ``--optimizer`` override it.

Shapes and dtypes: ``forward(codes, labels, index=None)`` takes codes float (B, K), labels int64
(B,) in [0, C), index unused; returns 0-d tensors ``softmax``, ``quant``, ``total``.
``state_dict()``: ``classifier.weight`` (C, K), ``classifier.bias`` (C,).

Errors: ValueError for C < 2, K < 1, a bad hyperparameter (``methods.base``), a batch of the wrong
shape or CPU labels out of range (``check_batch``).

Differences from the reference code:

1. Weight decay: Keras's ``l2(1e-4)`` adds ``1e-4 ||w||^2`` to the loss for the kernels of the
   convolutions, the locally connected layer and the dense layers (the classifier included),
   a gradient ``2e-4 w``, and spares biases and BatchNorm; the harness's Adam weight decay 1e-4
   adds ``1e-4 w`` to the gradient of every parameter (the DCDH recipe's convention).
2. Adam: the harness's Adam uses amsgrad on the network's parameter group (the DCDH authors'
   choice, shared by every method); Keras's Adam has none.
3. Validation split: the reference fits with ``validation_split=0.1``, so Keras trains on the
   first 90% of the training arrays and never uses the last 10% (the early stopping watches the
   training loss anyway); here the whole training split is trained on, as for every method.

The classifier starts as the reference's does (Keras's ``Dense`` default): Glorot-uniform weights,
zero bias.
"""
import torch.nn as nn
import torch.nn.functional as F

from .base import HashingMethod, Hyper, check_batch

__all__ = ["DDH", "quantization_loss"]


def quantization_loss(codes):
    """DDH's ``loss_01``: ``mean_ik | |u_ik| - 1 |`` over the batch and the bits.

    Args: codes float (B, K). Returns: a 0-d tensor, differentiable w.r.t. codes.
    """
    return (codes.abs() - 1).abs().mean()


class DDH(HashingMethod):
    """DDH loss: softmax cross-entropy of a classifier on the codes plus ``| |u| - 1 |``.

    Args:
        num_classes (int): C >= 2.  bits (int): K >= 1.  train_labels: unused.
        weight_quant (float): weight of the quantization term (0.01, the reference's
            ``LOSS_01_LAYER_PARAMS``).

    ``forward(codes, labels, index=None)`` -> ``{"softmax", "quant", "total"}`` (see the module
    docstring for the loss, the recipe and the differences from the reference).
    """
    name = "ddh"
    hyperparameters = {
        "weight_quant": Hyper(0.01, "weight of the quantization term mean | |u| - 1 |", minimum=0.0),
    }
    recipe = {"optimizer": "adam", "lr": 0.001, "weight_decay": 1e-4, "lr_step": 200, "lr_factor": 1.0,
              "epochs": 200, "patience": 50}
    unsupported = {}

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__(num_classes, bits, train_labels, **hparams)
        self.weight_quant = self.hparams["weight_quant"]
        self.classifier = nn.Linear(self.bits, self.num_classes)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, codes, labels, index=None):
        check_batch(codes, labels, self.num_classes, index, bits=self.bits)
        softmax = F.cross_entropy(self.classifier(codes), labels)
        quant = quantization_loss(codes)
        return {"softmax": softmax, "quant": quant, "total": softmax + self.weight_quant * quant}
