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
* ``build_optimizer(model, recipe)`` — the one hook for a method that needs its own optimisation
  step (DDAH: two optimizers, a hinge whose gradient reaches one part of the network only).
  Called once by ``engine.recipes.build_optimizer`` with the unwrapped network and the resolved
  recipe (``lr`` already overridden); returns an optimizer-like object offering ``param_groups``
  (the loop's learning-rate schedule sets ``group["lr"]``), ``zero_grad(set_to_none=True)``,
  ``step()``, ``state_dict()`` and ``load_state_dict()`` (checkpoints, ``--resume``), e.g.
  ``utils.optimizers.OptimizerSet``. The loop's step is unchanged: ``zero_grad``, backward of
  ``terms["total"]``, ``step()``; what differs is done in ``step()`` (rescaling gradients from
  statistics the method's forward left on the device, without host reads). The default
  returns None: the shared optimizer (one group for the network, one for the method).

Class attributes a method declares:

* ``name`` (str): the registry key (``--method NAME``).
* ``hyperparameters``: ``{name: Hyper(default, help, ...)}`` with the paper's defaults;
  set by ``--method-args key=value`` (and, for the authors' names, their flags).
* ``recipe``: overrides of the shared optimisation recipe where the paper's own fits this
  harness (keys of ``engine.recipes.RECIPE_KEYS``: optimizer, lr, weight_decay, lr_step,
  lr_factor, epochs, patience); ``{}`` keeps the backbone's default recipe.
* ``unsupported``: ``{feature: reason}`` for training features the method cannot offer
  (features: ``"ddp"``, ``"amp"``, ``"compile"``); the trainer refuses them in one line.
* ``requires_backbone`` (str or None): the network the method cannot do without (DDAH's
  two-branch ``ddahnet``); the trainer uses it when ``--backbone`` is not given and refuses any
  other in one line. None (the default): any backbone whose output is (B, K).

The encode step (what evaluation, search and the grid turn network outputs into):

* ``encode(outputs)`` — float (B, K) network outputs -> float (B, K) codes of +-1. Default:
  ``sign(u)`` with 0 -> -1 (``utils.codes.binarize``), the code of every method that trains its
  outputs towards their bits. A method whose code is something else overrides it (the classifier
  baseline: the codeword of its predicted class); evaluation rebuilds such a method from the
  checkpoint's config and saved state (``methods.checkpoint_encoder``), so its constructor must
  not need ``train_labels``.

Class method the trainer calls before building anything (``engine.preflight``):

* ``memory_estimate(num_classes, bits, num_train, batch_size, hparams=None)`` — bytes of the
  method's own state (with gradients and optimizer moments) plus one step's working memory, the
  network excluded. The default assumes a (C, K) float32 learned state and a few (B, C) logit
  tensors; methods whose memory grows otherwise (memory banks of N codes, pairwise terms) override it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from utils.codes import binarize

FEATURES = ("ddp", "amp", "compile")
"""Training features a method may declare in ``unsupported``."""

FLOAT32 = 4
"""Bytes per float32 element, for ``memory_estimate``."""
INT_MAX = 2 ** 31 - 1
"""Largest value of an integer hyperparameter without a ``maximum`` of its own (seeds, epoch
counts and sample counts beyond it overflow the C integers they end up in)."""
LOGIT_TENSORS = 8
"""float32 (B, C) tensors alive at the peak of a step with a B x C class-score term: scores, the
distance parts, log-softmax and the gradients of the backward pass (measured for DCDH's pull
term with ``benchmarks/class_scale.py``)."""


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its paper default (its type is the parameter's type), a help text
    and the accepted range (``minimum``/``maximum`` inclusive, ``positive`` for > 0, ``choices``);
    an integer hyperparameter without a ``maximum`` is at most ``INT_MAX``."""
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
            maximum = INT_MAX if kind is int and self.maximum is None else self.maximum
            if maximum is not None and value > maximum:
                raise ValueError(f"{key}={value}: must be <= {maximum}")
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
    requires_backbone = None

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

    @classmethod
    def memory_estimate(cls, num_classes, bits, num_train, batch_size, hparams=None):
        """Bytes the method needs beyond the network: its state and one step's working memory.

        Args: num_classes C; bits K; num_train N (training samples); batch_size B (per process);
        hparams: the run's hyperparameters (None: the paper defaults).
        Returns: int. The default: a (C, K) float32 state with its gradient and two optimizer
        moments (``4 C K`` floats) and ``LOGIT_TENSORS`` float32 (B, C) tensors (class scores,
        softmax and their gradients). Overridden where the method's memory grows otherwise.
        """
        c, k, b = int(num_classes), int(bits), int(batch_size)
        return FLOAT32 * (4 * c * k + LOGIT_TENSORS * b * c)

    def encode(self, outputs):
        """Codes of network outputs: float (B, K) -> +-1 of the same shape, dtype and device.
        Default: ``sign(u)`` with 0 -> -1 (``utils.codes.binarize``); see the module docstring."""
        return binarize(outputs)

    def epoch_end(self):
        """Called after each training epoch under ``torch.no_grad()``; nothing by default."""

    def build_optimizer(self, model, recipe):
        """Hook: the method's own optimizer over ``model`` and its parameters (module docstring).
        None by default: the shared optimizer of ``engine.recipes.build_optimizer``."""
        return None

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


CHECK_VALUES = True
"""Check label and index ranges of CPU batches (a host read); tests that prove a step reads
nothing back to the host switch it off. On a GPU the ranges are never checked."""


def check_batch(codes, labels, num_classes, index=None, num_train=None, bits=None):
    """Validate a batch and raise ValueError naming the problem.

    Args: codes float (B, K) (K == ``bits`` when given); labels int64 (B,) in [0, C); index int64
    (B,) or None; num_train: when given, the method keeps a memory bank of N training codes, so
    ``index`` is required and must lie in [0, N). Value ranges are checked for CPU tensors only
    (no device sync) and while ``CHECK_VALUES`` is true.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must have shape (B, K), got {tuple(codes.shape)}")
    if not codes.is_floating_point():
        raise ValueError(f"codes must be a float tensor, got {codes.dtype}")
    if bits is not None and codes.shape[1] != bits:
        raise ValueError(f"codes must have {bits} columns (the code length), got {codes.shape[1]}")
    if labels.dim() != 1 or labels.shape[0] != codes.shape[0]:
        raise ValueError(f"labels must have shape ({codes.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 tensor, got {labels.dtype}")
    _check_range(labels, num_classes, "labels")
    if index is None:
        if num_train is not None:
            raise ValueError("this method keeps a memory bank and needs index (positions in the training set)")
        return
    if index.dim() != 1 or index.shape[0] != codes.shape[0]:
        raise ValueError(f"index must have shape ({codes.shape[0]},), got {tuple(index.shape)}")
    if index.dtype != torch.int64:
        raise ValueError(f"index must be an int64 tensor, got {index.dtype}")
    if num_train is not None:
        _check_range(index, num_train, "index")


def _check_range(values, upper, name):
    if CHECK_VALUES and values.device.type == "cpu" and values.numel() and (
            values.min() < 0 or values.max() >= upper):
        raise ValueError(f"{name} must lie in [0, {upper - 1}], got range "
                         f"[{int(values.min())}, {int(values.max())}]")
