"""Choosing the compute device from ``--device``, and compiling the network for it."""
import shutil

import torch

from .errors import UserInputError


def parse_device(name):
    """``--device`` value -> torch.device, checking only the name (cpu, cuda or cuda:N), not whether
    this machine has it (an experiment file may be checked on a machine without its GPU).

    Raises: UserInputError for an unparsable name or another device type.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return device


def resolve_device(name=None):
    """``--device`` value -> torch.device; None picks CUDA when available, else CPU.

    Raises: UserInputError for an unparsable name or a CUDA device this machine lacks.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
"""Values of ``--compile``: off, or a ``torch.compile`` mode (reduce-overhead adds CUDA graphs)."""


def has_cxx_compiler():
    """Whether a C++ compiler (c++, g++ or clang++) is on PATH, as torch.compile needs on the CPU."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def compile_model(model, mode, device):
    """``torch.compile(model, mode=mode, dynamic=False)``, or ``model`` itself for mode "off".

    The compiled module shares parameters and buffers with ``model``, so checkpoints are still
    written from ``model`` (no ``_orig_mod.`` prefixes). Compilation happens at the first call
    (tens of seconds); the last, smaller batch of an epoch compiles once more.

    Raises: UserInputError if the toolchain for ``device`` is missing (a C++ compiler on the
    CPU, Triton on a GPU) or ``mode`` is not one of ``COMPILE_MODES``.
    """
    if mode not in COMPILE_MODES:
        raise UserInputError(f"--compile {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return model
    if device.type == "cpu" and not has_cxx_compiler():
        raise UserInputError(f"--compile {mode} on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
                             "install one or use --compile off")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserInputError(f"--compile {mode} on a GPU needs the triton package; "
                                 "install it or use --compile off") from None
    return torch.compile(model, mode=mode, dynamic=False)
