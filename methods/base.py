"""The contract every hashing method follows, so one training loop trains them all.

A method is an ``nn.Module`` that owns its state — learned class centers, fixed codebooks,
memory banks of the training set's codes — and turns a batch of real-valued network outputs
into scalar loss terms::

    terms = method(codes, labels, index)     # codes float32 (B, K); labels, index int64 (B,)
    terms["total"].backward()

* ``codes`` are the network outputs ``u`` (before ``sign``), ``labels`` contiguous class
  indices in [0, C), ``index`` the positions of the samples in the training set (0..N-1),
  which memory-bank methods use to store the batch's codes.
* The returned dict holds 0-d float tensors; ``"total"`` is what is minimised, the other
  entries are logged as they are (``pull``, ``push``, ``quant``, ...).
* ``state_dict()`` is written to the checkpoint under the authors' key ``centers``
  (for DCDH exactly their ``{"centers": (C, K)}``); buffers registered as persistent
  (memory banks, codebooks) are restored on ``--resume``.
* Parameters of the method (learned centers, a BatchNorm) are optimised with the network,
  in their own optimizer group with the same weight decay (the DCDH recipe).

Hooks the training loop calls (all optional):

* ``epoch_end()`` — after each training epoch, under ``torch.no_grad()`` (DSDH's discrete
  code update, DCWH's center recomputation).
* ``all_reduce`` — attribute set by a distributed trainer to a function summing a tensor in
  place over processes; methods whose batch statistics must span the global batch use it.

Class attributes a method declares:

* ``name`` (str): the registry key (``--method NAME``).
* ``hyperparameters``: ``{name: Hyper(default, help, ...)}`` with the paper's defaults;
  set by ``--method-args key=value`` (and, for the authors' names, their flags).
* ``recipe``: overrides of the shared optimisation recipe where the paper's own fits this
  harness (keys of ``engine.recipes.RECIPE_KEYS``: optimizer, lr, weight_decay, lr_step,
  lr_factor, epochs, patience); ``{}`` keeps the backbone's default recipe.
* ``unsupported``: ``{feature: reason}`` for training features the method cannot offer
  (features: ``"ddp"``, ``"amp"``, ``"compile"``); the trainer refuses them in one line.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

FEATURES = ("ddp", "amp", "compile")
"""Training features a method may declare in ``unsupported``."""


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its paper default (its type is the parameter's type), a help text
    and the accepted range (``minimum``/``maximum`` inclusive, ``positive`` for > 0, ``choices``)."""
    default: object
    help: str
    minimum: float = None
    maximum: float = None
    positive: bool = False
    choices: tuple = None

    def parse(self, key, value):
        """Convert ``value`` (str from the command line, or already typed) and check the range.

        Returns the typed value. Raises ValueError naming ``key``, the value and what is expected.
        """
        kind = type(self.default)
        if isinstance(value, str):
            text = value.strip()
            try:
                if kind is bool:
                    low = text.lower()
                    if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError
                    value = low in ("true", "1", "yes", "on")
                elif kind is int:
                    value = int(text)
                elif kind is float:
                    value = float(text)
                else:
                    value = text
            except ValueError:
                raise ValueError(f"{key}={value}: expected {_kind_name(kind)}") from None
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{key}={value!r}: expected {_kind_name(kind)}")
        if kind in (int, float):
            if kind is float and not math.isfinite(value):
                raise ValueError(f"{key}={value}: expected a finite number")
            if self.positive and not value > 0:
                raise ValueError(f"{key}={value}: must be > 0")
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{key}={value}: must be >= {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{key}={value}: must be <= {self.maximum}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{key}={value}: expected one of {', '.join(map(str, self.choices))}")
        return value


def _kind_name(kind):
    return {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "a string")


class HashingMethod(nn.Module):
    """Base class of the registry's methods (see the module docstring for the contract).

    Args (every method's constructor):
        num_classes (int): C >= 2, identities of the training set.
        bits (int): code length K >= 1.
        train_labels (int64 tensor (N,) or None): the class of every training sample, by its
            index in the training set; memory-bank methods need it (others ignore it).
        **hparams: values for the method's ``hyperparameters`` (already parsed; missing keys
            take the paper defaults).

    Raises: ValueError for C < 2, K < 1, an unknown hyperparameter or a value out of range.
    """
    name = ""
    hyperparameters = {}
    recipe = {}
    unsupported = {}

    def __init__(self, num_classes, bits, train_labels=None, **hparams):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"{self.name or type(self).__name__} needs at least 2 identities (classes), "
                             f"got {num_classes}")
        if int(bits) < 1:
            raise ValueError(f"code length must be positive, got {bits}")
        self.num_classes, self.bits = int(num_classes), int(bits)
        self.hparams = resolve_hparams(type(self), hparams)
        self.all_reduce = None

    def forward(self, codes, labels, index=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def epoch_end(self):
        """Called after each training epoch under ``torch.no_grad()``; nothing by default."""

    def extra_repr(self):
        args = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"num_classes={self.num_classes}, bits={self.bits}" + (f", {args}" if args else "")


def resolve_hparams(cls, given):
    """The full hyperparameter dict of method class ``cls``: paper defaults updated by ``given``.

    Raises: ValueError for a key ``cls`` does not declare or a bad value.
    """
    unknown = sorted(set(given) - set(cls.hyperparameters))
    if unknown:
        known = ", ".join(cls.hyperparameters) or "none"
        raise ValueError(f"method {cls.name} has no hyperparameter {unknown[0]!r} (it has: {known})")
    out = {}
    for key, spec in cls.hyperparameters.items():
        out[key] = spec.parse(key, given[key]) if key in given else spec.default
    return out


def check_batch(codes, labels, num_classes, index=None):
    """Validate a batch: codes float (B, K), labels int (B,) in [0, C) (range checked on CPU
    only, so no device sync), index int (B,) or None. Raises ValueError naming the problem."""
    if codes.dim() != 2:
        raise ValueError(f"codes must have shape (B, K), got {tuple(codes.shape)}")
    if labels.dim() != 1 or labels.shape[0] != codes.shape[0]:
        raise ValueError(f"labels must have shape ({codes.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if index is not None and (index.dim() != 1 or index.shape[0] != codes.shape[0]):
        raise ValueError(f"index must have shape ({codes.shape[0]},), got {tuple(index.shape)}")
