"""The hashing methods, one module each, behind one registry.

``build_method(name, num_classes, bits, train_labels, **hparams)`` is what the training loop
uses; ``parse_method_args`` turns ``--method-args key=value ...`` into typed hyperparameters.
A new method is a module with a ``HashingMethod`` subclass (see ``methods.base``) and one
line in ``METHODS``.
"""
from utils.codes import binarize

from .base import FEATURES, HashingMethod, Hyper, resolve_hparams
from .classifier import Classifier
from .csq import CSQ
from .dcdh import DCDH
from .dcwh import DCWH
from .ddah import DDAH
from .ddh import DDH
from .dpsh import DPSH
from .dsdh import DSDH
from .dtsh import DTSH
from .orthohash import OrthoHash

METHODS = {
    "dcdh": DCDH,
    "dcwh": DCWH,
    "dpsh": DPSH,
    "dtsh": DTSH,
    "dsdh": DSDH,
    "csq": CSQ,
    "orthohash": OrthoHash,
    "ddh": DDH,
    "ddah": DDAH,
    "classifier": Classifier,
}
"""Registry: ``--method`` name -> HashingMethod subclass."""

__all__ = ["FEATURES", "METHODS", "HashingMethod", "Hyper", "build_method", "checkpoint_encoder",
           "method_class", "parse_method_args", "resolve_hparams"]


def method_class(name):
    """The class registered as ``name``. Raises ValueError listing the known names."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def parse_method_args(name, items):
    """Parse ``["key=value", ...]`` for method ``name`` into a dict of typed hyperparameters.

    Raises: ValueError for an item without ``=``, a repeated or unknown key, or a bad value.
    """
    cls = method_class(name)
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected key=value")
        if key in out:
            raise ValueError(f"{key} is given twice")
        if key not in cls.hyperparameters:
            known = ", ".join(cls.hyperparameters) or "none"
            raise ValueError(f"method {name} has no hyperparameter {key!r} (it has: {known})")
        out[key] = cls.hyperparameters[key].parse(key, value)
    return out


def build_method(name, num_classes, bits, train_labels=None, **hparams):
    """Build the method registered as ``name``.

    Args: num_classes C >= 2; bits K >= 1; train_labels int64 (N,) class of every training
    sample (memory-bank methods); hparams: typed hyperparameters (missing: paper defaults).
    Returns: a HashingMethod. Raises: ValueError for an unknown name or bad hyperparameters.
    """
    return method_class(name)(num_classes, bits, train_labels=train_labels, **hparams)


def checkpoint_encoder(config, state, device="cpu"):
    """The ``encode`` step of the method a checkpoint was trained with (``HashingMethod.encode``).

    Args: config (dict): the checkpoint's config (``method``, default dcdh for the authors' files;
    ``method_args``, ``num_classes``, ``bits`` when the method overrides ``encode``); state (dict):
    the method's saved state (the checkpoint's ``centers``); device: where the codes are made.
    Returns: a callable float (B, K) -> +-1 codes (B, K). A method with the default encode is not
    built (``binarize``); one that overrides it is built and loads ``state``. A method this
    version does not know (a newer version's) gets the default: evaluation needs only the network.
    Raises: ValueError for missing config entries, bad hyperparameters or a state that does not fit.
    """
    cls = METHODS.get(config.get("method") or "dcdh")
    if cls is None or cls.encode is HashingMethod.encode:
        return binarize
    missing = [k for k in ("num_classes", "bits") if k not in config]
    if missing:
        raise ValueError(f"the config has no {' or '.join(missing)} (needed to rebuild method {cls.name})")
    method = cls(int(config["num_classes"]), int(config["bits"]), **dict(config.get("method_args") or {}))
    try:
        method.load_state_dict(state or {})
    except RuntimeError as e:
        raise ValueError(f"the method state does not fit {cls.name} ({str(e).splitlines()[0]})") from None
    return method.to(device).eval().encode
